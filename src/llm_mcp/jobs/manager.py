"""Training runs as supervised background jobs on the model workers.

A job outlives the tool call that started it: the worker's pump thread records each progress event and the
end of the run in the JobStore, and wakes any call that is waiting on the job. A call waits at most
`wait_seconds`, then answers 'running'; status, cancel and list read the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import dataclasses
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from llm_mcp.errors import Cancelled, InvalidArgument, WorkerBusy
from llm_mcp.jobs import ends
from llm_mcp.jobs.store import JobRecord, JobStore, process_alive, worker_alive
from llm_mcp.workers.pool import LoadedModel, new_request_id
from llm_mcp.workers.protocol import Progress, SetThreads, Stop, Train

log = logging.getLogger(__name__)

ProgressSink = Callable[[Progress], Awaitable[None]]
_LOG_TAIL_LINES = 15


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _LiveJob:
    """What exists of a job only while its worker runs it."""

    loaded: LoadedModel
    request_id: str
    finished: Future = field(default_factory=Future)
    waiters: list[_Waiter] = field(default_factory=list)
    rates: deque = field(default_factory=lambda: deque(maxlen=20))  # (time, step) for speed and ETA
    ranks: tuple[dict[str, Any], ...] | None = None  # a run across processes: each rank's liveness, latest seen


class JobManager:
    def __init__(self, store: JobStore, on_change: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        # told (job_id, "start" | "progress" | "end") from the thread where it happens; must not block
        self.on_change = on_change
        self._live: dict[str, _LiveJob] = {}
        self.shutting_down = False  # set when the server stops: runs it ends are 'cancelled' by a shutdown

    # -- starting and finishing ------------------------------------------------------------------------------
    def start(self, loaded: LoadedModel, command: Train, *, family_cancel_tool: str,
              dataset_description: str) -> JobRecord:
        active = self.active_job(loaded.model_id)
        if active is not None:
            raise WorkerBusy(loaded.model_id, f"training job {active.job_id!r}; wait for it, or call "
                                              f"{family_cancel_tool}(job_id={active.job_id!r})")
        if loaded.worker.running is not None:
            raise WorkerBusy(loaded.model_id, loaded.worker.running)
        config = {**asdict(command.config), **asdict(command.options), "train_dataset": dataset_description}
        record = self.store.create(model_id=loaded.model_id, family=loaded.family, config=config,
                                   output_dir=str(Path(command.config.output_dir)),
                                   log_path=str(loaded.worker.log_path), worker_pid=loaded.worker.proc.pid)
        command = dataclasses.replace(command, job_id=record.job_id)
        self._live[record.job_id] = _LiveJob(loaded, command.request_id)
        try:
            self.store.transition(record.job_id, "running")  # before submit: the pump may finish it at once
            future = loaded.worker.submit(command, on_progress=lambda ev: self._on_progress(record.job_id, ev))
        except BaseException as exc:
            self._finish(record.job_id, error=exc)
            raise
        future.add_done_callback(lambda f: self._on_done(record.job_id, f))
        self._share_cores()
        self._tell(record.job_id, "start")
        log.info("job %s started: training model %s into %s", record.job_id, loaded.model_id, record.output_dir)
        return self.store.get(record.job_id)

    def _tell(self, job_id: str, what: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(job_id, what)
            except Exception:  # a listener's failure never touches the job
                log.exception("job change listener failed for %s (%s)", job_id, what)

    def _share_cores(self) -> None:
        """Split the CPU cores among the trainings running now, each time one starts or ends: runs that each
        use every core contend for them (measured ~16x slower for two runs on 2 cores). GPU runs ignore it."""
        live = list(self._live.values())
        threads = max(1, (os.cpu_count() or 1) // len(live)) if len(live) > 1 else None
        for job in live:
            try:
                job.loaded.worker.submit(SetThreads(new_request_id(), threads))
            except Exception as exc:  # a worker that died is reported by its own job
                log.info("could not send SetThreads to %s: %s", job.loaded.model_id, exc)

    def _on_progress(self, job_id: str, event: Progress) -> None:
        """Pump thread: persist, then wake the waiting calls (also when the store cannot write)."""
        try:
            self.store.record_progress(job_id, step=event.step, total_steps=event.total_steps, loss=event.loss,
                                       learning_rate=event.learning_rate, epoch=event.epoch,
                                       eval_loss=event.eval_loss, checkpoint=event.checkpoint,
                                       metrics=event.metrics)
        except Exception:
            log.exception("could not record progress of job %s", job_id)
        live = self._live.get(job_id)
        if live is None:
            return
        self._tell(job_id, "progress")
        live.rates.append((time.monotonic(), event.step))
        if event.ranks is not None:
            live.ranks = event.ranks
        for waiter in list(live.waiters):
            waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, event)

    def _on_done(self, job_id: str, future: Future) -> None:
        error = future.exception()
        self._finish(job_id, result=None if error else future.result(), error=error)

    def _finish(self, job_id: str, *, result: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        try:
            if isinstance(error, Cancelled):  # stopped before its first step (e.g. while reading the dataset)
                self.store.transition(job_id, "cancelled", error=self._shutdown_note(str(error)))
            elif error is not None:
                self.store.transition(job_id, "failed", error=str(error) or type(error).__name__)
            else:
                result = {**result, "job_id": job_id}
                state = "cancelled" if result.get("status") == "cancelled" else "succeeded"
                note = self._shutdown_note(None) if state == "cancelled" else None
                self.store.transition(job_id, state, result=result, error=note)
            if not self.store.is_pending(job_id):  # recorded: the worker's own note of the end is not needed
                ends.remove(self.store.path.parent, job_id)
        except Exception:  # the store keeps an end it cannot write in memory; the model must not stay "busy"
            log.exception("could not record the end of job %s", job_id)
        finally:
            live = self._live.pop(job_id, None)
            if live is not None:
                live.finished.set_result(job_id)
                for waiter in list(live.waiters):
                    waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, None)
                self._share_cores()
            self._tell(job_id, "end")
            log.info("job %s ended: %s", job_id, "failed" if error is not None else (result or {}).get("status"))

    def _shutdown_note(self, why: str | None) -> str | None:
        if not self.shutting_down:
            return why
        return ("a server shutdown stopped this job; its last checkpoint is kept: load the model again and train "
                "with resume_from_checkpoint=true to continue.")

    # -- waiting ----------------------------------------------------------------------------------------------
    async def wait(self, job_id: str, seconds: float, on_progress: ProgressSink | None) -> JobRecord:
        """Wait up to `seconds` (-1: until the end) for the job, forwarding its progress; return its record."""
        live = self._live.get(job_id)
        if live is None:
            return self.store.get(job_id)
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Queue())
        live.waiters.append(waiter)
        deadline = None if seconds < 0 else time.monotonic() + seconds
        try:
            while not live.finished.done():
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(waiter.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if event is not None and on_progress is not None:
                    await on_progress(event)
        finally:  # a cancelled call stops waiting; the job itself goes on
            live.waiters.remove(waiter)
        return self.store.get(job_id)

    # -- reading and stopping ---------------------------------------------------------------------------------
    def running_count(self) -> int:
        """Training jobs running now, all models."""
        return len(self._live)

    def active_job(self, model_id: str) -> JobRecord | None:
        for job_id, live in list(self._live.items()):  # the pump thread may remove entries meanwhile
            if live.loaded.model_id == model_id:
                return self.store.get(job_id)
        return None

    def find(self, *, family: str, model_id: str | None, job_id: str | None) -> JobRecord:
        record = self._find(family=family, model_id=model_id, job_id=job_id)
        return self.reconciled(record)

    def reconciled(self, record: JobRecord) -> JobRecord:
        """A job no worker runs any more can never end by itself: record its end now (what its worker wrote to
        the job-end file, else failed). Covers this server's jobs and those of a server that died while its
        worker went on to save."""
        if record.is_terminal or record.job_id in self._live:
            return record
        record = self.store.get(record.job_id)  # the pump may have ended it since it was read
        if record.is_terminal or record.job_id in self._live or worker_alive(record.worker_pid):
            return record
        if record.server_pid != os.getpid() and process_alive(record.server_pid):
            return record  # another live server's job
        why = ("its worker ended without reporting the end of the run." if record.server_pid == os.getpid()
               else "the server stopped while this job ran.")
        return self.store.settle(record.job_id, why, record.last_checkpoint)

    def _find(self, *, family: str, model_id: str | None, job_id: str | None) -> JobRecord:
        if job_id is not None:
            record = self.store.get(job_id)
            if record.family != family:
                raise InvalidArgument("job_id", job_id, f"a job of the {family} tools")
            return record
        if model_id is None:
            raise InvalidArgument("model_id", None, "a model_id or a job_id (one of them is required)")
        record = self.store.latest_for_model(model_id, family)
        if record is None:
            raise InvalidArgument("model_id", model_id, "a model that has been trained (no job found for it)")
        return record

    def cancel(self, record: JobRecord) -> JobRecord:
        live = self._live.get(record.job_id)
        if record.is_terminal or live is None:
            return record
        self.store.request_cancel(record.job_id)
        live.loaded.worker.submit(Stop(new_request_id()))
        return self.store.get(record.job_id)

    def status(self, record: JobRecord) -> dict[str, Any]:
        points = self.store.points(record.job_id)
        losses = [p for p in points if p["loss"] is not None]
        evals = [p for p in points if p["eval_loss"] is not None]
        speed = self._steps_per_second(record.job_id)
        batch = record.config.get("batch_size", 1) * record.config.get("gradient_accumulation_steps", 1) \
            * record.config.get("num_processes", 1)
        remaining = max(0, record.total_steps - record.step)
        answer: dict[str, Any] = {
            "status": "success",
            "job_id": record.job_id,
            "model_id": record.model_id,
            "state": record.state,
            "step": record.step,
            "total_steps": record.total_steps,
            "progress": round(record.step / record.total_steps, 4) if record.total_steps else 0.0,
            "loss": record.loss,
            "recent_losses": [{"step": p["step"], "loss": round(p["loss"], 5)} for p in losses[-10:]],
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "learning_rate": record.learning_rate,
            "samples_per_second": round(speed * batch, 3) if speed else None,
            "eta_seconds": round(remaining / speed, 1) if speed and record.state == "running" else None,
            "elapsed_seconds": round((record.finished_at or time.time()) - record.started_at, 1)
            if record.started_at else 0.0,
            "last_checkpoint": record.last_checkpoint,
            "output_dir": record.output_dir,
            "cancel_requested": record.cancel_requested,
            "error": record.error,
            "log_tail": log_tail(record.log_path),
        }
        methods = [{"step": p["step"], **p["metrics"]} for p in points if p["metrics"]]
        if methods:  # the method's own metrics (dpo's reward margins, grpo's mean reward ...), as logged
            answer["method_metrics"] = {k: v for k, v in methods[-1].items() if k != "step"}
            answer["recent_method_metrics"] = methods[-50:]
        live = self._live.get(record.job_id)
        if live is not None and live.ranks is not None:
            answer["ranks"] = list(live.ranks)
        if record.result is not None:
            answer["result"] = {k: record.result[k] for k in ("status", "metrics", "output_dir", "engine_choices",
                                                              "warnings") if k in record.result}
        return answer

    def _steps_per_second(self, job_id: str) -> float | None:
        live = self._live.get(job_id)
        if live is None or len(live.rates) < 2:
            return None
        (t0, s0), (t1, s1) = live.rates[0], live.rates[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def log_tail(path: str | None) -> list[str]:
    """The last lines of a job's worker log (cut to 300 characters each)."""
    if not path or not Path(path).is_file():
        return []
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 8192))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return [line[-300:] for line in lines[-_LOG_TAIL_LINES:]]
