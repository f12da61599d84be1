"""SQLite job records: schema, state transitions, progress points, and recovery after a server restart.

Written as a job goes (the worker pump thread writes, tool calls read), so status and history survive the
server. One connection guarded by a lock; WAL so reads never wait on the disk.

A full disk never leaves a job `running` when it has ended: an end the database cannot take is kept in memory
(and read back through `get`/`list`) and written at the next chance, and progress points that cannot be written
are dropped. After a restart, a job's end recorded by its worker in a job-end file (jobs/ends.py) wins over
"the server stopped".
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm_mcp.disk import MARGIN_BYTES, free_bytes, is_disk_full
from llm_mcp.errors import DiskFull, InvalidArgument
from llm_mcp.jobs import ends

log = logging.getLogger(__name__)

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
    server_pid INTEGER,
    worker_pid INTEGER
);
CREATE TABLE IF NOT EXISTS job_points (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    at REAL NOT NULL,
    loss REAL,
    eval_loss REAL,
    learning_rate REAL,
    metrics TEXT
);
CREATE INDEX IF NOT EXISTS job_points_by_job ON job_points (job_id, step);
"""


def worker_alive(pid: int | None) -> bool:
    """Whether pid is a live model worker (not a process that reused the number)."""
    if not process_alive(pid):
        return False
    try:
        return b"llm_mcp.workers.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to tell: trust the pid


def process_alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ADDED_COLUMNS = [("server_pid", "INTEGER"), ("worker_pid", "INTEGER")]  # columns added after the first release of SCHEMA


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
    worker_pid: int | None = None  # the worker running it: a job is not settled while that process lives

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
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, no fsync per write
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
        except (sqlite3.Error, OSError) as exc:  # SQLite says "disk I/O error" when it cannot even open the WAL
            if is_disk_full(exc) or (free_bytes(path.parent) or 0) < MARGIN_BYTES:
                raise DiskFull(path.parent, needed=MARGIN_BYTES, free=free_bytes(path.parent),
                               doing="opening the job store") from exc
            raise
        # job_id -> (state, error, result, finished_at): ends the database could not take (a full disk)
        self._pending_ends: dict[str, tuple[str, str | None, dict[str, Any] | None, float]] = {}
        self._progress_dropped = False

    def _add_missing_columns(self) -> None:
        """Older state folders lack columns added since; add them (new columns are all nullable)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        if "metrics" not in {r["name"] for r in self._db.execute("PRAGMA table_info(job_points)")}:
            self._db.execute("ALTER TABLE job_points ADD COLUMN metrics TEXT")

    def close(self) -> None:
        """Close the database; ends it still could not take go to job-end files, read at the next start."""
        self.flush_pending()
        for job_id, (state, error, result, _) in self._pending_ends.items():
            if not ends.write(self.path.parent, job_id, state=state, error=error, result=result):
                log.error("job %s ended %s but neither the job store nor a job-end file could record it",
                          job_id, state)
        with self._lock:
            self._db.close()

    def create(self, *, model_id: str, family: str, config: dict[str, Any], output_dir: str,
               log_path: str | None, worker_pid: int | None = None) -> JobRecord:
        job_id = f"j-{uuid.uuid4().hex[:8]}"
        self.flush_pending()
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO jobs (job_id, model_id, family, state, created_at, config, output_dir, log_path, "
                    "server_pid, worker_pid) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (job_id, model_id, family, time.time(), json.dumps(config), output_dir, log_path, os.getpid(),
                     worker_pid))
        except sqlite3.Error as exc:
            raise self._disk_full(exc, "recording a new training job") from exc
        return self.get(job_id)

    def _disk_full(self, exc: sqlite3.Error, doing: str) -> Exception:
        """A full disk as DiskFull naming the state folder; any other database error unchanged."""
        if is_disk_full(exc):
            return DiskFull(self.path.parent, needed=None, free=free_bytes(self.path.parent), doing=doing)
        return exc

    def transition(self, job_id: str, state: JobState, *, error: str | None = None,
                   result: dict[str, Any] | None = None) -> JobRecord:
        """Move a job to `state`; illegal moves (e.g. out of a terminal state) are refused."""
        if job_id in self._pending_ends:
            raise AssertionError(f"job {job_id}: illegal transition {self._pending_ends[job_id][0]} -> {state}")
        try:
            changed = self._write_transition(job_id, state, error, result, time.time())
        except sqlite3.Error as exc:
            if state not in TERMINAL or not is_disk_full(exc):
                raise self._disk_full(exc, f"recording job {job_id} as {state}") from exc
            # The end must not be lost to a full disk: keep it here, where get/list read it, until it can be written
            log.warning("job %s ended %s but the job store cannot write it (%s); kept in memory until it can",
                        job_id, state, exc)
            self._pending_ends[job_id] = (state, error, result, time.time())
            return self.get(job_id)
        if not changed:
            raise AssertionError(f"job {job_id}: illegal transition {self.get(job_id).state} -> {state}")
        self.flush_pending()
        return self.get(job_id)

    def _write_transition(self, job_id: str, state: str, error: str | None, result: dict[str, Any] | None,
                          now: float) -> bool:
        sources = [s for s, targets in _ALLOWED.items() if state in targets]
        with self._lock:  # check and write in one statement: the pump thread and tool calls both transition
            return bool(self._db.execute(
                "UPDATE jobs SET state = ?, error = COALESCE(?, error), result = COALESCE(?, result), "
                "started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END, "
                "finished_at = CASE WHEN ? IN ('succeeded', 'failed', 'cancelled') THEN ? ELSE finished_at END "
                f"WHERE job_id = ? AND state IN ({', '.join('?' * len(sources))})",
                (state, error, json.dumps(result) if result is not None else None, state, now, state, now, job_id,
                 *sources)).rowcount)

    def flush_pending(self) -> None:
        """Write the ends kept in memory, now that the disk may have room again."""
        for job_id, (state, error, result, at) in list(self._pending_ends.items()):
            try:
                written = self._write_transition(job_id, state, error, result, at)
            except sqlite3.Error:
                return  # still full: try again at the next call
            self._pending_ends.pop(job_id, None)
            if written:
                log.info("job %s: its end (%s) is now recorded", job_id, state)
                ends.remove(self.path.parent, job_id)
            else:
                log.warning("job %s: its end (%s) kept in memory matched no running job; dropped", job_id, state)

    def is_pending(self, job_id: str) -> bool:
        """Whether the job's end is held in memory only (the database could not take it yet)."""
        return job_id in self._pending_ends

    def _overlay(self, record: JobRecord) -> JobRecord:
        pending = self._pending_ends.get(record.job_id)
        if pending is None:
            return record
        state, error, result, at = pending
        return dataclasses.replace(record, state=state, error=error or record.error,
                                   result=result if result is not None else record.result, finished_at=at)

    def record_progress(self, job_id: str, *, step: int, total_steps: int, loss: float | None,
                        learning_rate: float | None, epoch: float | None, eval_loss: float | None,
                        checkpoint: str | None, metrics: dict[str, float] | None = None) -> None:
        try:
            self._write_progress(job_id, step=step, total_steps=total_steps, loss=loss, learning_rate=learning_rate,
                                 epoch=epoch, eval_loss=eval_loss, checkpoint=checkpoint, metrics=metrics)
        except sqlite3.Error as exc:  # a full disk loses progress points, never the job
            if not is_disk_full(exc):
                raise
            if not self._progress_dropped:
                log.warning("the job store cannot write progress (%s); points are dropped until it can", exc)
            self._progress_dropped = True

    def _write_progress(self, job_id: str, *, step: int, total_steps: int, loss: float | None,
                        learning_rate: float | None, epoch: float | None, eval_loss: float | None,
                        checkpoint: str | None, metrics: dict[str, float] | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, loss = COALESCE(?, loss), "
                "learning_rate = COALESCE(?, learning_rate), epoch = COALESCE(?, epoch), "
                "last_checkpoint = COALESCE(?, last_checkpoint) WHERE job_id = ?",
                (step, total_steps, loss, learning_rate, epoch, checkpoint, job_id))
            if loss is not None or eval_loss is not None:
                self._db.execute(
                    "INSERT INTO job_points (job_id, step, at, loss, eval_loss, learning_rate, metrics) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, step, time.time(), loss, eval_loss, learning_rate,
                     json.dumps(metrics) if metrics else None))

    def request_cancel(self, job_id: str) -> None:
        try:
            with self._lock:
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
        except sqlite3.Error as exc:  # the Stop is sent all the same; only the flag shown in status is lost
            if not is_disk_full(exc):
                raise

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise InvalidArgument("job_id", job_id, "an id returned by a train call (see the list_jobs tool)")
        return self._overlay(JobRecord.from_row(row))

    def latest_for_model(self, model_id: str, family: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE model_id = ? AND family = ? "
                                   "ORDER BY created_at DESC LIMIT 1", (model_id, family)).fetchone()
        return self._overlay(JobRecord.from_row(row)) if row else None

    def list(self, family: str | None = None) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE ? IS NULL OR family = ? ORDER BY created_at",
                                    (family, family)).fetchall()
        return [self._overlay(JobRecord.from_row(r)) for r in rows]

    def points(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT step, at, loss, eval_loss, learning_rate, metrics FROM job_points "
                                    "WHERE job_id = ? ORDER BY step, at", (job_id,)).fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"]) if r["metrics"] else None} for r in rows]

    def recover_after_restart(self) -> int:
        """Jobs left queued or running by a server that is gone: the end their worker recorded in a job-end file
        (it finishes the step, saves a checkpoint and the adapter when the server goes away), or else failed.
        Jobs of another live server on the same workspace, and jobs whose worker is still saving after its server
        died, are left alone (the latter are settled on a later status or list, once their worker is gone)."""
        with self._lock:
            rows = [r for r in self._db.execute("SELECT job_id, last_checkpoint, server_pid, worker_pid FROM jobs "
                                                "WHERE state IN ('queued', 'running')").fetchall()
                    if not process_alive(r["server_pid"]) and not worker_alive(r["worker_pid"])]
        for row in rows:
            self.settle(row["job_id"], "the server stopped while this job ran.", row["last_checkpoint"])
        return len(rows)

    def settle(self, job_id: str, why: str, last_checkpoint: str | None = None) -> JobRecord:
        """Record the end of a job whose worker is gone: the end it wrote to its job-end file, or failed with
        `why` (and where to resume from)."""
        if job_id in self._pending_ends:  # its end is known, only not yet written
            return self.get(job_id)
        state_dir = self.path.parent
        end = ends.read(state_dir, job_id)
        if end is not None:
            result = end.get("result") if isinstance(end.get("result"), dict) else None
            with self._lock:
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ?, result = COALESCE(?, result), "
                    "last_checkpoint = COALESCE(?, last_checkpoint), step = COALESCE(?, step) "
                    "WHERE job_id = ? AND state IN ('queued', 'running')",
                    (end["state"], end.get("finished_at") or time.time(), end.get("error"),
                     json.dumps(result) if result is not None else None, end.get("last_checkpoint"),
                     end.get("step"), job_id))
            ends.remove(state_dir, job_id)
            return self.get(job_id)
        hint = (f" The last checkpoint is {last_checkpoint}: load the model again and call train with "
                "resume_from_checkpoint=true to continue from it." if last_checkpoint else "")
        with self._lock:
            self._db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? "
                             "WHERE job_id = ? AND state IN ('queued', 'running')",
                             (time.time(), why + hint, job_id))
        return self.get(job_id)
