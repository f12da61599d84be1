"""Checkpoints a resume can trust.

The trainer writes `checkpoint-N` in place and fsyncs nothing, so a crash or a power loss can leave it torn.
`CheckpointSeal` checks each new checkpoint reads back, fsyncs it and writes `.complete` (its files and sizes) last:
a checkpoint counts once sealed; checkpoints from before seals existed count when they read back. The seal also
rotates save_total_limit among complete checkpoints (the trainer's own rotation runs before any callback could seal,
and could keep a torn folder over the only complete one). `CheckpointSpace` checks free space before each save and
stops the run with DiskFull instead of starting a checkpoint that cannot fit. A resume continues from the newest
complete checkpoint and removes the torn ones, saying why.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm_mcp import disk
from llm_mcp.engine.durable import fsync_dir, fsync_tree, write_json
from llm_mcp.engine.train import ranks
from llm_mcp.errors import EngineError, InvalidArgument

SEAL = ".complete"  # written last into a checkpoint: its files and their sizes
_SAFETENSORS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
_TORCH_FILES = ("*.pt", "*.pth", "*.bin")  # torch.save's zip archives: optimizer, scheduler, RNG, training args
# Optimizer state a checkpoint holds per trainable value, where it is not two copies of the value (AdamW's moments)
_STATE_BYTES_PER_VALUE = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    problem: str | None  # None: complete

    @property
    def is_complete(self) -> bool:
        return self.problem is None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def survey(out: Path) -> list[Checkpoint]:
    """Every checkpoint-N folder of `out`, oldest first, each with what is wrong with it. One without a seal is torn
    once an older one has a seal (it was saved since seals exist, and its save did not finish)."""
    found, sealed_before = [], False
    for step, path in _folders(out):
        found.append(Checkpoint(path, step, problem_of(path, sealed_before=sealed_before)))
        sealed_before = sealed_before or (path / SEAL).is_file()
    return found


def _folders(out: Path) -> list[tuple[int, Path]]:
    if not out.is_dir():
        return []
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return sorted((int(p.name[len(prefix):]), p) for p in out.glob(f"{prefix}*")
                  if p.is_dir() and p.name[len(prefix):].isdigit())


def problem_of(folder: Path, *, sealed_before: bool = False) -> str | None:
    """What makes a checkpoint unusable (a file named, and what is wrong with it), or None. Reads JSON and file
    headers only."""
    if (folder / SEAL).is_file():
        return _state_problem(folder) or _weights_problem(folder) or _seal_problem(folder)
    if sealed_before:
        return f"it has no {SEAL} seal, which is written last: its save did not finish"
    return _state_problem(folder) or _weights_problem(folder)


def _seal_problem(folder: Path) -> str | None:
    try:
        files = json.loads((folder / SEAL).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {SEAL} seal is unreadable ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (the seal lists it)"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, not the {size} sealed (cut short or changed since)"
    return None


def _state_problem(folder: Path) -> str | None:
    path = folder / TRAINER_STATE_NAME
    if not path.is_file():
        return f"{TRAINER_STATE_NAME} is missing"
    text = path.read_text(errors="replace")
    if not text.strip():
        return f"{TRAINER_STATE_NAME} is empty"
    try:
        state = json.loads(text)
    except ValueError as exc:
        return f"{TRAINER_STATE_NAME} is not valid JSON ({exc})"
    return None if isinstance(state, dict) else f"{TRAINER_STATE_NAME} holds no JSON object"


def _weights_problem(folder: Path) -> str | None:
    """The adapter's safetensors header must cover the file exactly; torch files must end in a zip directory (a
    truncated one does not)."""
    from safetensors import safe_open

    weights = folder / _SAFETENSORS
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError
            return f"{_SAFETENSORS} is truncated or corrupt ({exc})"
    for pattern in _TORCH_FILES:
        for path in sorted(folder.glob(pattern)):
            if not zipfile.is_zipfile(path):
                return f"{path.name} is truncated or corrupt (not a complete torch.save archive)"
    return None


# -- resuming ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResumePoint:
    path: str | None  # the checkpoint to resume from; None: a new run
    torn: tuple[Checkpoint, ...] = ()  # incomplete checkpoints of output_dir, to be removed

    def warnings(self) -> list[str]:
        return [f"resume: skipped {c.path.name}: {c.problem}; removed it, so checkpoint rotation and later resumes "
                "never take it for a complete one." for c in self.torn]

    def remove_torn(self) -> None:
        for checkpoint in self.torn:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def resolve_resume(out: Path, resume: bool | str) -> ResumePoint:
    """true: the newest complete checkpoint of `out`; a path: that checkpoint, refused when incomplete."""
    if resume is False:
        return ResumePoint(None)
    found = survey(out)
    torn = tuple(c for c in found if not c.is_complete)
    if resume is True:
        complete = [c for c in found if c.is_complete]
        if not complete:
            none = (f"none is complete there ({'; '.join(f'{c.path.name}: {c.problem}' for c in torn)})" if torn
                    else "none found there")
            raise InvalidArgument("resume_from_checkpoint", True, f"a run with checkpoints in output_dir="
                                                                  f"{str(out)!r}; {none} (use false to start a "
                                                                  "new run)")
        return ResumePoint(str(complete[-1].path), torn)
    return ResumePoint(str(_explicit_checkpoint(resume)), torn)


def _explicit_checkpoint(resume: str) -> Path:
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file() and not (path / SEAL).is_file():
        raise InvalidArgument("resume_from_checkpoint", resume,
                              "true, false, or a checkpoint folder (one holding trainer_state.json)")
    known = [c for c in survey(path.parent) if c.path.resolve() == path.resolve()]
    problem = known[0].problem if known else problem_of(path)
    if problem is not None:
        raise InvalidArgument("resume_from_checkpoint", resume,
                              f"a complete checkpoint folder; in {path.name}, {problem}. Pass true to resume from "
                              "the newest complete checkpoint of output_dir, or name another checkpoint")
    return path


# -- writing -----------------------------------------------------------------------------------------------------

def seal(folder: Path, step: int) -> None:
    """Check that a checkpoint the trainer just wrote reads back, make it durable, then write its seal last."""
    problem = problem_of(folder)
    if problem is not None:
        raise EngineError(f"checkpoint {folder} did not read back after saving: {problem}")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != SEAL}
    fsync_tree(folder)
    write_json(folder / SEAL, {"step": step, "files": files})
    fsync_dir(folder.parent)


def rotate(out: Path, keep: int, *, newest: Path) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, never `newest` (the one just sealed)."""
    older = [c.path for c in survey(out) if c.is_complete and c.path != newest]
    for path in older[:max(0, len(older) + 1 - keep)]:
        shutil.rmtree(path, ignore_errors=True)


class CheckpointSeal(TrainerCallback):
    """Seal each checkpoint the trainer saved, then rotate save_total_limit among complete ones. Listed before
    callbacks that report a checkpoint, so none is reported before it is sealed."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        ranks.barrier()  # across processes, every rank has written its part (its RNG state) before rank 0 seals
        if not ranks.is_main():
            return
        out = Path(args.output_dir)
        folder = out / checkpoint_name(state.global_step)
        seal(folder, state.global_step)
        if self.keep:
            rotate(out, self.keep, newest=folder)


# -- disk space --------------------------------------------------------------------------------------------------

@dataclass
class SaveSizes:
    """Bytes a checkpoint and the final adapter take: estimated first, the checkpoint measured once one is saved."""

    checkpoint: int
    final: int


def save_sizes(model: Any, tokenizer: Any, optim: str) -> SaveSizes:
    """The adapter's trainable tensors, the optimizer's state for them, and the tokenizer's files."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    values = sum(p.numel() for p in trainable)
    per_value = _STATE_BYTES_PER_VALUE.get(optim)
    optimizer = 2 * adapter if per_value is None else per_value * values
    tokenizer_bytes = _tokenizer_bytes(tokenizer)
    return SaveSizes(checkpoint=adapter + optimizer + tokenizer_bytes, final=adapter + tokenizer_bytes)


def _tokenizer_bytes(tokenizer: Any) -> int:
    """tokenizer.json as save_pretrained writes it (the bulk of a tokenizer's files); 0 where it has none."""
    try:
        return len(tokenizer.backend_tokenizer.to_str())
    except Exception:  # a slow tokenizer: its vocabulary files are small
        return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class CheckpointSpace(TrainerCallback):
    """Room for each checkpoint (and the final adapter after it) before the trainer writes it: a save cut short by a
    full disk leaves a torn checkpoint, so the run stops with DiskFull first. Listed after callbacks that ask for a
    save at the step's end (a stop). Remembers the folder being written, so a save failing anyway is removed."""

    def __init__(self, out: Path, sizes: SaveSizes, keep: int | None, warnings: list[str]) -> None:
        self.out, self.sizes, self.keep, self.warnings = out, sizes, keep, warnings
        self.writing: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not ranks.is_main():
            return
        saves = _saves_left(state.global_step, state.max_steps, state.save_steps)
        at_once = min(saves, self.keep + 1) if self.keep else saves  # a new one is sealed before rotation
        needed = at_once * self.sizes.checkpoint + self.sizes.final
        free = disk.free_bytes(self.out)
        if free is not None and free < needed + disk.MARGIN_BYTES:
            self.warnings.append(
                f"disk space: output_dir {str(self.out)!r} has {_mib(free)} free; this run's checkpoints ({at_once} "
                f"kept at once, ~{_mib(self.sizes.checkpoint)} each) and final adapter need ~{_mib(needed)}. It "
                "stops with a disk-full error before a checkpoint that would not fit (complete ones stay): free "
                "space, lower save_total_limit or raise save_steps.")

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_save:
            return
        if ranks.is_main():  # rank 0 writes the checkpoints
            folder = self.out / checkpoint_name(state.global_step)
            if folder.exists():  # a superseded run's checkpoint of this step: the trainer would overwrite it in place
                shutil.rmtree(folder)
            disk.require_free(self.out, self.sizes.checkpoint + self.sizes.final, doing=f"saving {folder.name}")
            self.writing = folder
        ranks.barrier()  # across processes, no rank writes its part into a folder still being removed

    def on_save(self, args, state, control, **kwargs):
        if self.writing is not None and self.writing.is_dir():
            self.sizes.checkpoint = folder_bytes(self.writing)  # measured: the next checks need no estimate
        self.writing = None

    def discard_unfinished(self) -> None:
        """Remove the checkpoint a failed save left unsealed (it would be torn); complete ones stay."""
        if self.writing is not None and self.writing.is_dir() and not (self.writing / SEAL).is_file():
            shutil.rmtree(self.writing, ignore_errors=True)
        self.writing = None


def _saves_left(start: int, end: int, every: int) -> int:
    """Checkpoints saved from step `start` to `end`: each multiple of `every`, and one at the end."""
    if every <= 0:
        return 1
    return end // every - start // every + (0 if end % every == 0 else 1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
