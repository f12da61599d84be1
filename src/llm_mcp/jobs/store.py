"""SQLite job records: schema, state transitions, progress points, and recovery after a server restart.

Written as a job goes (the worker pump thread writes, tool calls read), so status and history survive the
server. One connection guarded by a lock; WAL so reads never wait on the disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm_mcp.errors import InvalidArgument

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_ALLOWED: dict[str, set[str]] = {"queued": {"running", "failed", "cancelled"},
                                 "running": {"succeeded", "failed", "cancelled"}}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    family TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    config TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    log_path TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    learning_rate REAL,
    epoch REAL,
    last_checkpoint TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    server_pid INTEGER
);
CREATE TABLE IF NOT EXISTS job_points (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    at REAL NOT NULL,
    loss REAL,
    eval_loss REAL,
    learning_rate REAL
);
CREATE INDEX IF NOT EXISTS job_points_by_job ON job_points (job_id, step);
"""


def _process_alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ADDED_COLUMNS = [("server_pid", "INTEGER")]  # columns added after the first release of SCHEMA


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    model_id: str
    family: str
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    config: dict[str, Any]
    output_dir: str
    log_path: str | None
    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    epoch: float | None
    last_checkpoint: str | None
    cancel_requested: bool
    error: str | None
    result: dict[str, Any] | None
    server_pid: int | None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        data = dict(row)
        data["config"] = json.loads(data["config"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, no fsync per write
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Older state folders lack columns added since; add them (new columns are all nullable)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, *, model_id: str, family: str, config: dict[str, Any], output_dir: str,
               log_path: str | None) -> JobRecord:
        job_id = f"j-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, model_id, family, state, created_at, config, output_dir, log_path, "
                "server_pid) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, model_id, family, time.time(), json.dumps(config), output_dir, log_path, os.getpid()))
        return self.get(job_id)

    def transition(self, job_id: str, state: JobState, *, error: str | None = None,
                   result: dict[str, Any] | None = None) -> JobRecord:
        """Move a job to `state`; illegal moves (e.g. out of a terminal state) are refused."""
        sources = [s for s, targets in _ALLOWED.items() if state in targets]
        now = time.time()
        with self._lock:  # check and write in one statement: the pump thread and tool calls both transition
            changed = self._db.execute(
                "UPDATE jobs SET state = ?, error = COALESCE(?, error), result = COALESCE(?, result), "
                "started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END, "
                "finished_at = CASE WHEN ? IN ('succeeded', 'failed', 'cancelled') THEN ? ELSE finished_at END "
                f"WHERE job_id = ? AND state IN ({', '.join('?' * len(sources))})",
                (state, error, json.dumps(result) if result is not None else None, state, now, state, now, job_id,
                 *sources)).rowcount
        if not changed:
            raise AssertionError(f"job {job_id}: illegal transition {self.get(job_id).state} -> {state}")
        return self.get(job_id)

    def record_progress(self, job_id: str, *, step: int, total_steps: int, loss: float | None,
                        learning_rate: float | None, epoch: float | None, eval_loss: float | None,
                        checkpoint: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, loss = COALESCE(?, loss), "
                "learning_rate = COALESCE(?, learning_rate), epoch = COALESCE(?, epoch), "
                "last_checkpoint = COALESCE(?, last_checkpoint) WHERE job_id = ?",
                (step, total_steps, loss, learning_rate, epoch, checkpoint, job_id))
            if loss is not None or eval_loss is not None:
                self._db.execute(
                    "INSERT INTO job_points (job_id, step, at, loss, eval_loss, learning_rate) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, step, time.time(), loss, eval_loss, learning_rate))

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise InvalidArgument("job_id", job_id, "an id returned by a train call (see the list_jobs tool)")
        return JobRecord.from_row(row)

    def latest_for_model(self, model_id: str, family: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE model_id = ? AND family = ? "
                                   "ORDER BY created_at DESC LIMIT 1", (model_id, family)).fetchone()
        return JobRecord.from_row(row) if row else None

    def list(self, family: str | None = None) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE ? IS NULL OR family = ? ORDER BY created_at",
                                    (family, family)).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def points(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT step, at, loss, eval_loss, learning_rate FROM job_points "
                                    "WHERE job_id = ? ORDER BY step, at", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def recover_after_restart(self) -> int:
        """Jobs left queued or running by a server that is gone can no longer finish: mark them failed. Jobs of
        another live server on the same workspace are left alone."""
        with self._lock:
            rows = [r for r in self._db.execute("SELECT job_id, last_checkpoint, server_pid FROM jobs "
                                                "WHERE state IN ('queued', 'running')").fetchall()
                    if not _process_alive(r["server_pid"])]
            for row in rows:
                hint = (f" The last checkpoint is {row['last_checkpoint']}: load the model again and call train with "
                        "resume_from_checkpoint=true to continue from it." if row["last_checkpoint"] else "")
                self._db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE job_id = ?",
                                 (time.time(), "the server stopped while this job ran." + hint, row["job_id"]))
        return len(rows)
