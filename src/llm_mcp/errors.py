"""Errors an agent can act on. Each message names the parameter, what it got and what is allowed.

    LlmMcpError
     +-- InvalidArgument      a parameter value is not allowed
     +-- ModelNotLoaded       unknown model_id
     +-- ModelIdTaken         model_id already in use
     +-- DatasetError         a dataset cannot be read or has no usable rows
     +-- WorkerBusy           the model's worker is running another command
     +-- WorkerDied           the model's worker process ended unexpectedly
     +-- TrainingFailed       a training job ended in failure (message carries the job and the cause)
     +-- OutOfMemory          training ran out of GPU memory (message carries concrete advice)
     +-- EngineError          loading/training failed inside the worker (message carries the cause)
     +-- ExportError          exporting a merged model (GGUF) failed; .kind says why
     +-- DiskFull             a folder's file system has too little free space (folder, bytes needed and free)
     +-- OutputDirBusy        another live run or export holds the output folder's lock (names the holder)
     +-- Cancelled            a command was stopped (cancel_training, unload) before it finished

Only server/common.py (agent_tool) turns these into MCP tool errors. Leaf module: imports nothing from the package.
"""

from __future__ import annotations

import os
from typing import Any


class LlmMcpError(Exception):
    """Base of every error whose message is meant for the agent."""


_SHOWN_CHARS = 200  # a value echoed in a message: enough to recognise it, never a 5 MB string back


def shown(value: object) -> str:
    """repr of an agent-supplied value, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


class InvalidArgument(LlmMcpError, ValueError):  # a ValueError so pydantic validation reports it per field
    def __init__(self, name: str, got: object, allowed: str) -> None:
        self.name = name
        self.allowed: str | None = allowed
        super().__init__(f"{name}={shown(got)} is not valid; expected {allowed}.")

    @classmethod
    def from_validation(cls, exc: Any, *, where: str) -> "InvalidArgument":
        """Turn a pydantic ValidationError into one message that names every bad field."""
        parts, named = [], None  # named: the first bad field, and what it allows where our check said
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__") or where
            if err.get("type") in ("unexpected_keyword_argument", "extra_forbidden"):
                parts.append(f"{where}.{loc} is not a known parameter")
            elif err.get("type") == "value_error" and isinstance(err.get("ctx", {}).get("error"), LlmMcpError):
                cause = err["ctx"]["error"]
                parts.append(str(cause).rstrip("."))  # our own check: its message names the field
                named = named or (getattr(cause, "name", None), getattr(cause, "allowed", None))
            else:
                parts.append(f"{where}.{loc}={shown(err.get('input'))}: {err.get('msg')}")
        inst = cls.__new__(cls)
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        inst.name, inst.allowed = named or (".".join(str(p) for p in first) or where, None)
        LlmMcpError.__init__(inst, "; ".join(parts) + ".")
        return inst


class ModelNotLoaded(LlmMcpError):
    def __init__(self, model_id: str, loaded: list[str], load_tool: str) -> None:
        self.name, self.allowed = "model_id", f"a loaded model's id: {sorted(loaded)}"
        super().__init__(
            f"model_id={shown(model_id)} is not loaded; loaded: {sorted(loaded)}. Call {load_tool} first."
        )


class ModelIdTaken(LlmMcpError):
    def __init__(self, model_id: str, unload_tool: str) -> None:
        self.name, self.allowed = "model_id", "an id not in use"
        super().__init__(
            f"model_id={model_id!r} is already loaded; pick another model_id, omit it for a generated one, "
            f"or call {unload_tool}(model_id={model_id!r}) first."
        )


class DatasetError(LlmMcpError):
    """A dataset could not be read or has no usable rows."""


class WorkerBusy(LlmMcpError):
    def __init__(self, model_id: str, running: str) -> None:
        super().__init__(f"model {model_id!r} is busy running {running}; wait for it to finish and call again.")


class WorkerDied(LlmMcpError):
    """The worker process holding a model ended unexpectedly; the model must be loaded again."""


class TrainingFailed(LlmMcpError):
    """A training job failed; the message names the job and the cause."""


class OutOfMemory(LlmMcpError):
    """Training ran out of memory; the message says what to lower. The model stays loaded."""


class EngineError(LlmMcpError):
    """Loading, preparing or training failed inside the worker; the message carries the cause."""


class ExportError(LlmMcpError):
    """Exporting a merged model (e.g. to GGUF) failed; `kind` says why, the message says what to do next.

    kind: "unsupported_architecture" | "quantizer_missing" | "quantize_failed" | "unreadable_output" | "export_failed"
    """

    kind: str = "export_failed"  # class default, so an ExportError rebuilt from (name, message) still has one

    def __init__(self, message: str, kind: str = "export_failed") -> None:
        self.kind = kind
        super().__init__(message)


class DiskFull(LlmMcpError):
    """Too little free space in a folder's file system. The message names the folder, the bytes needed and free;
    nothing half-written is left behind by the code that raises it."""

    def __init__(self, folder: object, *, needed: int | None, free: int | None, doing: str) -> None:
        self.folder, self.needed, self.free = os.path.abspath(str(folder)), needed, free
        need = f"~{_size(needed)} needed" if needed else "more space needed"
        have = f"{_size(free)} free" if free is not None else "free space unknown"
        super().__init__(f"disk full: {doing} in {self.folder} stopped ({need}, {have}). Free space on that file "
                         "system (or use another output_dir / --workspace) and try again.")


class OutputDirBusy(LlmMcpError):
    """Another live training or export holds the output folder (its lock file names the holder)."""


class Cancelled(LlmMcpError):
    """A command was stopped (cancel_training, unload, shutdown) before it finished."""


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# Worker -> server: errors cross the process boundary as (class name, message) and are rebuilt here.
_BY_NAME = {c.__name__: c for c in (InvalidArgument, DatasetError, EngineError, ExportError, OutOfMemory, WorkerBusy,
                                     WorkerDied, DiskFull, OutputDirBusy, Cancelled)}


def rebuild(kind: str, message: str) -> LlmMcpError:
    cls = _BY_NAME.get(kind, EngineError)
    err = cls.__new__(cls)
    LlmMcpError.__init__(err, message)
    return err
