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
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llm_mcp.config import LoadConfig, TrainingConfig, UnslothLoadConfig, UnslothTrainingConfig
from llm_mcp.errors import ModelNotLoaded, WorkerBusy, WorkerDied, rebuild
from llm_mcp.workers.protocol import Command, Done, Event, Failed, Progress, SetThreads, Shutdown, Stop

log = logging.getLogger(__name__)

ProgressListener = Callable[[Progress], None]  # called on the pump thread
_EXIT_GRACE_S = 10.0
# Calls that wait for a busy worker instead of bouncing (generate, evaluate, inspect): how many may wait, how long
QUEUE_LIMIT = 16
QUEUE_WAIT_S = 300.0


def new_request_id() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


@dataclass
class _Pending:
    future: Future
    on_progress: ProgressListener | None


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
        self._running_request: str | None = None
        self.running: str | None = None  # the command the worker is executing, for "busy" errors
        self.exit_reason: str | None = None
        self._freed = threading.Event()  # set by the pump each time the worker finishes a command
        self._turn = asyncio.Lock()  # queued calls take their turn in order, one at a time at the head
        self._queued = 0
        self._reader = threading.Thread(target=self._pump, name=f"pump-{name}", daemon=True)
        self._reader.start()

    @property
    def is_alive(self) -> bool:
        return self.exit_reason is None and self.proc.poll() is None

    def submit(self, command: Command, on_progress: ProgressListener | None = None) -> Future:
        """Send one command; its Future resolves with Done's result or raises Failed's error. Stop and SetThreads
        are control messages: they may be sent while another command runs."""
        if not self.is_alive:
            raise WorkerDied(f"the worker of {self.name!r} has ended ({self.exit_reason or 'exited'}); load it again.")
        is_control = isinstance(command, (Stop, SetThreads))
        if self.running is not None and not is_control:
            raise WorkerBusy(self.name, self.running)
        future: Future = Future()
        self._pending[command.request_id] = _Pending(future, on_progress)
        if not is_control:
            self._running_request, self.running = command.request_id, type(command).__name__.lower()
        try:
            with self._send_lock:
                self._conn.send(command)
        except BaseException as exc:
            self._pending.pop(command.request_id, None)
            if not is_control:
                self._running_request, self.running = None, None
            if isinstance(exc, OSError):
                raise WorkerDied(f"the worker of {self.name!r} cannot be reached: {exc}") from None
            raise
        return future

    async def request(self, command: Command, *, queue: bool = False) -> dict[str, Any]:
        """Send one command and wait for its answer. queue: while the worker runs another short command, wait
        for it in order (bounded: QUEUE_LIMIT calls, QUEUE_WAIT_S seconds from the call) instead of answering
        busy; a training is never waited for."""
        if not queue or (self.running is None and self._queued == 0):
            return await asyncio.wrap_future(self.submit(command))
        if self.running == "train":
            raise WorkerBusy(self.name, self.running)
        if self._queued >= QUEUE_LIMIT:
            raise WorkerBusy(self.name, f"{self.running or 'a command'}, with {self._queued} calls already waiting")
        self._queued += 1
        try:
            async with asyncio.timeout(QUEUE_WAIT_S):
                async with self._turn:  # first come, first served
                    await self._wait_until_free()
                    future = self.submit(command)
        except TimeoutError:
            raise WorkerBusy(self.name, f"{self.running or 'a command'} (waited {QUEUE_WAIT_S:.0f} s for a turn)") \
                from None
        finally:
            self._queued -= 1
        return await asyncio.wrap_future(future)

    async def _wait_until_free(self) -> None:
        while self.running is not None:
            if self.running == "train":
                raise WorkerBusy(self.name, self.running)
            self._freed.clear()
            if self.running is None:
                break
            await asyncio.to_thread(self._freed.wait, 0.5)

    def _pump(self) -> None:
        """Reader thread: route each event to its command's Future or progress listener; on EOF fail the rest."""
        try:
            self._route_events()
        except Exception:  # an unreadable message (e.g. a mismatched worker environment): treat as a dead pipe
            log.exception("event pump of %s stopped", self.name)
            self.proc.kill()
        finally:
            self._fail_pending()

    def _route_events(self) -> None:
        while True:
            try:
                event: Event = self._conn.recv()
            except (EOFError, OSError):
                return
            pending = self._pending.get(event.request_id)
            if isinstance(event, (Done, Failed)):
                if event.request_id == self._running_request:
                    self._running_request, self.running = None, None  # the worker is free again
                    self._freed.set()
                self._pending.pop(event.request_id, None)
            if pending is None:
                continue
            if isinstance(event, Progress):
                if pending.on_progress is not None:
                    try:
                        pending.on_progress(event)
                    except Exception:  # a listener bug must not stop the pump
                        log.exception("progress listener of %s failed", self.name)
            elif isinstance(event, Done):
                _resolve(pending.future, result=event.result)
            else:
                if event.traceback:
                    log.info("worker %s failed %s:\n%s", self.name, event.request_id, event.traceback)
                _resolve(pending.future, error=rebuild(event.kind, event.message))

    def _fail_pending(self) -> None:
        code = self.proc.wait()
        self.exit_reason = self.exit_reason or _describe_exit(code, self.log_path)
        self._running_request, self.running = None, None
        self._freed.set()
        for request_id in list(self._pending):
            pending = self._pending.pop(request_id)
            _resolve(pending.future, error=WorkerDied(f"the worker of {self.name!r} ended: {self.exit_reason}"))

    def stop(self, *, grace_s: float = _EXIT_GRACE_S) -> None:
        """Ask the worker to exit, then make sure it has; every byte it held goes back to the system. A worker
        that is training stops at its next step boundary with a checkpoint; if that takes longer than grace_s it
        is killed, losing at most the step it was in (its checkpoints stay)."""
        if self.proc.poll() is None:
            self.exit_reason = "unloaded"
            try:
                with self._send_lock:
                    self._conn.send(Shutdown())
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not exit within %.0f s; killing it", self.name, grace_s)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)  # its last writes (a job's end) land before the caller moves on
        self._conn.close()


def _resolve(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a Future unless its caller cancelled it meanwhile (the command still ran to its end)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _describe_exit(code: int, log_path: Path) -> str:
    if code < 0:
        import signal

        try:
            reason = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            reason = f"killed by signal {-code}"
    else:
        reason = f"exit code {code}"
    return f"{reason}; see the worker log {log_path}"


@dataclass
class LoadedModel:
    """What the server knows of a loaded model; the model itself lives in `worker`."""

    model_id: str
    family: str  # "qloraevolved" | "unsloth"
    load_config: LoadConfig | UnslothLoadConfig
    info: dict[str, Any]  # the load answer: params, device, warnings
    worker: WorkerProcess
    training_config: TrainingConfig | UnslothTrainingConfig | None = None  # what prepare_for_training set

    @property
    def device(self) -> str:
        return str(self.info.get("device", "cpu"))


class WorkerPool:
    """All loaded models by model_id, each with its own worker process."""

    def __init__(self, *, python: str | None, cwd: Path, log_dir: Path, env: dict[str, str] | None = None,
                 family_python: dict[str, str] | None = None) -> None:
        self.python = python or sys.executable
        self.family_python = {k: v for k, v in (family_python or {}).items() if v}  # e.g. Unsloth's own venv
        self.cwd = cwd
        self.log_dir = log_dir
        self.env = env or {}
        self._models: dict[str, LoadedModel] = {}
        self._reserved: set[str] = set()  # ids whose load is in flight

    def ids(self, family: str | None = None) -> list[str]:
        return [m for m, lm in self._models.items() if family is None or lm.family == family]

    def is_taken(self, model_id: str) -> bool:
        """A lost model (its worker died) does not hold its id: it can be loaded again under it."""
        loaded = self._models.get(model_id)
        return (loaded is not None and loaded.worker.is_alive) or model_id in self._reserved

    def get(self, model_id: str, *, family: str, load_tool: str) -> LoadedModel:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.family != family:
            raise ModelNotLoaded(model_id, self.ids(family), load_tool)
        return loaded

    def find(self, model_id: str) -> LoadedModel:
        """A loaded model of either family."""
        loaded = self._models.get(model_id)
        if loaded is None:
            raise ModelNotLoaded(model_id, self.ids(), "qloraevolved_load_model or unsloth_load_model")
        return loaded

    def models(self, family: str) -> list[LoadedModel]:
        return [lm for lm in self._models.values() if lm.family == family]

    async def load(self, model_id: str, family: str, command: Command, config: LoadConfig) -> LoadedModel:
        """Start a worker for model_id and load the model in it; on failure the worker is ended."""
        lost = self._models.pop(model_id, None)
        if lost is not None:
            lost.worker.stop()
        self._reserved.add(model_id)
        worker = WorkerProcess(model_id, python=self.family_python.get(family, self.python), cwd=self.cwd,
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

    def close(self, *, grace_s: float = _EXIT_GRACE_S) -> None:
        """End every worker at once (a training stops with a checkpoint), each within grace_s."""
        workers = [self._models.pop(model_id).worker for model_id in list(self._models)]
        for worker in workers:  # all asked first, so their trainings save at the same time
            if worker.proc.poll() is None:
                try:
                    with worker._send_lock:
                        worker._conn.send(Shutdown())
                except OSError:
                    pass
        stoppers = [threading.Thread(target=worker.stop, kwargs={"grace_s": grace_s}) for worker in workers]
        for stopper in stoppers:  # in parallel: the slowest worker sets the time, not the sum of them
            stopper.start()
        for stopper in stoppers:
            stopper.join()
