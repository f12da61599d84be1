"""Server side of the worker processes: start one per loaded model, send it commands, pump its events.

A worker is a fresh interpreter (`python -m llm_mcp.workers.worker FD MODEL_ID`), never a fork of the server, so the
server never holds torch and each model's memory returns to the system when its worker ends. The worker's
stdout and stderr go to a log file: in stdio mode the server's stdout is the protocol stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llm_mcp.config import LoadConfig, TrainingConfig
from llm_mcp.errors import LlmMcpError, ModelNotLoaded, WorkerBusy, WorkerDied, rebuild
from llm_mcp.workers.protocol import Command, Done, Event, Failed, Progress, Shutdown

log = logging.getLogger(__name__)

ProgressHandler = Callable[[Progress], Awaitable[None]]
_EXIT_GRACE_S = 10.0


def new_request_id() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class WorkerProcess:
    """One model worker: its process, its command pipe, and the thread that pumps its events."""

    def __init__(self, name: str, *, python: str, cwd: Path, log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        parent, child = socket.socketpair()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [python, "-m", "llm_mcp.workers.worker", str(child.fileno()), name],  # name: for ps
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=cwd, env={**os.environ, **env},
            )
        child.close()
        self._conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self.running: str | None = None  # the command the worker is executing, for "busy" errors
        self.exit_reason: str | None = None
        self._reader = threading.Thread(target=self._pump, name=f"pump-{name}", daemon=True)
        self._reader.start()

    @property
    def is_alive(self) -> bool:
        return self.exit_reason is None and self.proc.poll() is None

    async def request(self, command: Command, on_progress: ProgressHandler | None = None) -> dict[str, Any]:
        """Send one command and wait for its Done (returned) or Failed (raised); forward Progress meanwhile."""
        if not self.is_alive:
            raise WorkerDied(f"the worker of {self.name!r} has ended ({self.exit_reason or 'exited'}); load it again.")
        if self.running is not None:
            raise WorkerBusy(self.name, self.running)
        pending = _Pending(asyncio.get_running_loop(), asyncio.Queue())
        self._pending[command.request_id] = pending
        self.running = type(command).__name__.lower()
        try:
            with self._send_lock:
                self._conn.send(command)
            while True:
                event = await pending.queue.get()
                if isinstance(event, Progress):
                    if on_progress is not None:
                        await on_progress(event)
                elif isinstance(event, Done):
                    return event.result
                elif isinstance(event, Failed):
                    if event.traceback:
                        log.info("worker %s failed %s:\n%s", self.name, command.request_id, event.traceback)
                    raise rebuild(event.kind, event.message)
        finally:
            self._pending.pop(command.request_id, None)

    def _pump(self) -> None:
        """Reader thread: route each event to the waiting request; on EOF fail everything still pending."""
        while True:
            try:
                event: Event = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(event, (Done, Failed)):
                self.running = None  # even if the caller stopped waiting, the worker is free again
            pending = self._pending.get(event.request_id)
            if pending is not None:
                pending.loop.call_soon_threadsafe(pending.queue.put_nowait, event)
        code = self.proc.wait()
        self.exit_reason = self.exit_reason or _describe_exit(code, self.log_path)
        self.running = None
        for request_id, pending in list(self._pending.items()):
            died = Failed(request_id, "WorkerDied", f"the worker of {self.name!r} ended: {self.exit_reason}")
            pending.loop.call_soon_threadsafe(pending.queue.put_nowait, died)

    def stop(self) -> None:
        """Ask the worker to exit, then make sure it has; every byte it held goes back to the system."""
        if self.proc.poll() is None:
            self.exit_reason = "unloaded"
            try:
                with self._send_lock:
                    self._conn.send(Shutdown())
            except OSError:
                pass
            try:
                self.proc.wait(timeout=_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._conn.close()


def _describe_exit(code: int, log_path: Path) -> str:
    if code < 0:
        import signal

        reason = f"killed by signal {signal.Signals(-code).name}"
    else:
        reason = f"exit code {code}"
    return f"{reason}; see the worker log {log_path}"


@dataclass
class LoadedModel:
    """What the server knows of a loaded model; the model itself lives in `worker`."""

    model_id: str
    family: str  # "qloraevolved" | "unsloth"
    load_config: LoadConfig
    info: dict[str, Any]  # the load answer: params, device, warnings
    worker: WorkerProcess
    training_config: TrainingConfig | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return str(self.info.get("device", "cpu"))


class WorkerPool:
    """All loaded models by model_id, each with its own worker process."""

    def __init__(self, *, python: str | None, cwd: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.python = python or sys.executable
        self.cwd = cwd
        self.log_dir = log_dir
        self.env = env or {}
        self._models: dict[str, LoadedModel] = {}
        self._reserved: set[str] = set()  # ids whose load is in flight

    def ids(self, family: str | None = None) -> list[str]:
        return [m for m, lm in self._models.items() if family is None or lm.family == family]

    def is_taken(self, model_id: str) -> bool:
        return model_id in self._models or model_id in self._reserved

    def get(self, model_id: str, *, family: str, load_tool: str) -> LoadedModel:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.family != family:
            raise ModelNotLoaded(model_id, self.ids(family), load_tool)
        return loaded

    def models(self, family: str) -> list[LoadedModel]:
        return [lm for lm in self._models.values() if lm.family == family]

    async def load(self, model_id: str, family: str, command: Command, config: LoadConfig) -> LoadedModel:
        """Start a worker for model_id and load the model in it; on failure the worker is ended."""
        self._reserved.add(model_id)
        worker = WorkerProcess(model_id, python=self.python, cwd=self.cwd,
                               log_path=self.log_dir / f"{model_id}.log", env=self.env)
        try:
            info = await worker.request(command)
        except BaseException:
            await asyncio.to_thread(worker.stop)
            raise
        finally:
            self._reserved.discard(model_id)
        loaded = LoadedModel(model_id, family, config, info, worker)
        self._models[model_id] = loaded
        return loaded

    async def unload(self, model_id: str) -> None:
        loaded = self._models.pop(model_id)
        await asyncio.to_thread(loaded.worker.stop)

    def close(self) -> None:
        for model_id in list(self._models):
            try:
                self._models.pop(model_id).worker.stop()
            except LlmMcpError:
                log.exception("stopping worker %s", model_id)
