"""Model sources beyond a model folder or hub id: a `.gguf` file and a finished LoRA adapter folder.

A `.gguf` is converted once with transformers' GGUF loader (dequantized) into an ordinary HF folder, cached by the
file's path, size and mtime; an adapter folder (adapter_config.json naming its base) loads that base with the
adapter on top, trainable. Worker side: torch and transformers are imported inside the functions, so the unsloth
worker can import Unsloth first. The server checks the same paths without this module (server/sandbox.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.errors import InvalidArgument
from llm_mcp.paths import adapter_base, stat_kind

log = logging.getLogger(__name__)

# Dequantized float32 is exact for every GGUF block type; past this file size bf16 halves the folder instead.
FLOAT32_UP_TO_BYTES = 1 << 30
CONVERTED_MARKER = "converted_from_gguf.json"  # written last: a folder without it is not a finished conversion


@dataclass(frozen=True)
class Source:
    """What a model_name means: the folder (or hub id) transformers loads, and an adapter to put on top."""

    model_dir: str
    adapter_dir: str | None = None
    notes: list[str] = field(default_factory=list)  # sentences for the load answer's warnings


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf") and stat_kind(Path(os.path.expanduser(name))) == "file"


def resolve(name: str, cache_root: Path) -> Source:
    """A .gguf -> its converted folder under cache_root; an adapter folder -> its base (a .gguf base converted
    the same way) and the adapter; anything else unchanged."""
    path = Path(os.path.expanduser(name))
    base = adapter_base(path) if stat_kind(path) == "dir" else None
    if base is None:
        return _model_source(name, cache_root)
    base_path = Path(os.path.expanduser(base))
    if stat_kind(base_path) == "dir" and adapter_base(base_path) is not None:
        raise InvalidArgument("model_name", name, f"an adapter folder whose base is a model; {base!r} in its "
                                                  "adapter_config.json is another adapter folder")
    inner = _model_source(base, cache_root)
    note = (f"model_name is a LoRA adapter folder: its base {base!r} was loaded with this adapter on top "
            "(trainable; its LoRA settings come from adapter_config.json).")
    return Source(inner.model_dir, str(path.resolve()), [*inner.notes, note])


def _model_source(name: str, cache_root: Path) -> Source:
    if not is_gguf(name):
        return Source(name)
    folder, converted = cached_conversion(Path(os.path.expanduser(name)).resolve(), cache_root)
    how = "converted" if converted else "converted earlier; reused"
    return Source(str(folder), notes=[f"model_name is a GGUF file: {how} (dequantized) into the folder {folder}, "
                                      "which is what is loaded."])


# -- GGUF -> HF folder ---------------------------------------------------------------------------------------
def cache_key(gguf_file: Path) -> str:
    st = gguf_file.stat()
    return hashlib.sha256(f"{gguf_file}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cached_conversion(gguf_file: Path, cache_root: Path) -> tuple[Path, bool]:
    """(folder, converted now): the conversion of gguf_file in cache_root, made once per path+size+mtime."""
    folder = cache_root / f"{gguf_file.stem[:80]}-{cache_key(gguf_file)}"
    if stat_kind(folder / CONVERTED_MARKER) == "file":
        return folder, False
    convert_gguf(gguf_file, folder)
    return folder, True


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Write an ordinary HF folder (safetensors, tokenizer, generation_config) from a GGUF file, atomically:
    built in a temporary sibling and renamed into place. dtype: None picks float32 for files up to 1 GiB."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or ("float32" if gguf_file.stat().st_size <= FLOAT32_UP_TO_BYTES else "bfloat16")
    log.info("converting %s to a %s Hugging Face folder at %s", gguf_file, dtype, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=getattr(torch, dtype))
    except (ValueError, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise InvalidArgument("model_name", str(gguf_file), "a .gguf file transformers' GGUF loader can read (a "
                              f"supported architecture); it failed with {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    _drop_gguf_quantizer(model)
    _set_generation_stop(model, tokenizer)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / CONVERTED_MARKER).write_text(json.dumps({
            "gguf_file": str(gguf_file), "size": gguf_file.stat().st_size, "dtype": dtype}, indent=1),
            encoding="utf-8")
    except BaseException:  # a full disk, or a stop: no half-written conversion is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another worker finished the same conversion first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if stat_kind(out_dir / CONVERTED_MARKER) != "file":
            raise
    return out_dir


def _drop_gguf_quantizer(model: Any) -> None:
    # The weights are dequantized dense tensors now; the marker only makes save_pretrained refuse ("quantized
    # with gguf and is not serializable") and would send a reload back to the GGUF loader.
    model.hf_quantizer = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config


def _set_generation_stop(model: Any, tokenizer: Any) -> None:
    """The GGUF's EOS (and pad) become the folder's generation defaults, so generate stops where llama.cpp does."""
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


# -- adapter folder -> base + adapter ------------------------------------------------------------------------
def attach_adapter(bundle: Any, adapter_dir: str) -> None:
    """Put a saved LoRA adapter on the loaded base, trainable, as attach_lora would have put a new one."""
    from peft import PeftModel

    try:
        bundle.model = PeftModel.from_pretrained(bundle.model, adapter_dir, is_trainable=True)
    except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:  # a bad config, files, or shapes
        raise InvalidArgument("model_name", adapter_dir, "a LoRA adapter folder peft can load onto its base "
                              "(adapter_config.json and adapter_model.safetensors, saved from that base); it "
                              f"failed with {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    lora = bundle.model.peft_config["default"]
    targets = lora.target_modules
    bundle.target_modules = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
    if hasattr(bundle, "target_parameters"):
        bundle.target_parameters = sorted(getattr(lora, "target_parameters", None) or [])


def state_dir() -> Path:
    """The server's state folder: workers run with the workspace as their working directory."""
    return Path(os.environ.get("LLM_MCP_STATE_DIR") or Path.cwd() / ".llm-mcp")


def load_qlora(config: Any, *, shardable: bool = False) -> Any:
    """The qloraevolved load for any model_name (folder, hub id, .gguf, adapter folder); shardable: for FSDP2."""
    from llm_mcp.engine.load import model as engine_model

    source = resolve(config.model_name, state_dir() / "converted")
    bundle = engine_model.load_model(dataclasses.replace(config, model_name=source.model_dir),
                                     adapter_dir=source.adapter_dir, shardable=shardable)
    bundle.warnings[:0] = source.notes
    bundle.load_config = config
    return bundle


def load_unsloth(config: Any) -> Any:
    """The unsloth load for any model_name; an adapter is attached now (LoRA otherwise comes at prepare)."""
    from llm_mcp.engine.load import unsloth_backend  # first: Unsloth must be imported before transformers

    source = resolve(config.model_name, state_dir() / "converted")
    bundle = unsloth_backend.load_model(dataclasses.replace(config, model_name=source.model_dir))
    if source.adapter_dir is not None:
        attach_adapter(bundle, source.adapter_dir)
    bundle.warnings[:0] = source.notes
    return bundle
