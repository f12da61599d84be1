"""The end of a training job as its worker saw it, in a small file beside the job store
(`<state>/job-ends/<job_id>.json`): written by the worker when a run ends, whether or not the server is still
there to hear it, and read by the server when the store could not record the end (the server died, or its disk was
full). Leaf module, no torch: the worker writes it, the server reads it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "LLM_MCP_STATE_DIR"  # the server tells its workers where its state lives
_FOLDER = "job-ends"


def path_of(state_dir: str | Path, job_id: str) -> Path:
    return Path(state_dir) / _FOLDER / f"{job_id}.json"


def write(state_dir: str | Path | None, job_id: str | None, *, state: str, error: str | None = None,
          result: dict[str, Any] | None = None, step: int | None = None, last_checkpoint: str | None = None) -> bool:
    """Record a job's end atomically (temporary file, fsync, rename); False when it cannot be written (no state
    folder given, or the disk is full): the server then marks the job failed on its next start."""
    if not state_dir or not job_id:
        return False
    target = path_of(state_dir, job_id)
    temporary = target.with_suffix(f".tmp-{os.getpid()}")
    record = {"job_id": job_id, "state": state, "error": error, "result": result, "step": step,
              "last_checkpoint": last_checkpoint, "finished_at": time.time()}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(record, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
        return True
    except OSError:
        temporary.unlink(missing_ok=True)
        return False


def read(state_dir: str | Path, job_id: str) -> dict[str, Any] | None:
    """The recorded end, or None when there is none or it cannot be read."""
    try:
        record = json.loads(path_of(state_dir, job_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("state") not in ("succeeded", "failed", "cancelled"):
        return None
    return record


def remove(state_dir: str | Path, job_id: str) -> None:
    """Forget an end the store has recorded."""
    try:
        path_of(state_dir, job_id).unlink(missing_ok=True)
    except OSError:
        pass
