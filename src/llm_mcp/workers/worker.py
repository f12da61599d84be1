"""Worker side: `python -m llm_mcp.workers.worker FD` holds one model and runs the commands the server sends.

The only module that imports the engine (and so torch). One `match` loop, one handler per command, exactly one
Done or Failed per command. A reader thread turns a Stop, a Shutdown, or the server going away, into a stop flag,
and a SetThreads into a thread count, which the training loop checks between steps.

The server going away (EOF or a broken pipe, whichever the worker meets first) or SIGTERM ends a training as
a cancel does: the step finishes, a checkpoint and the adapter are saved, the end is written to the job-end file
(jobs/ends.py) for the next server to read, and the worker exits. SIGINT is left to the server, which stops its
trainings the same way (a terminal's Ctrl-C reaches the whole process group).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llm_mcp.config import UnslothLoadConfig
from llm_mcp.disk import free_bytes, is_disk_full
from llm_mcp.errors import DiskFull, LlmMcpError
from llm_mcp.jobs import ends
from llm_mcp.workers.protocol import (
    Command, Done, Evaluate, Export, Failed, Generate, InspectDataset, Load, Prepare, Progress, SetThreads, Shutdown,
    Stop, Train,
)

log = logging.getLogger("llm_mcp.worker")


@dataclass
class _Channel:
    conn: Connection
    lock: threading.Lock
    gone: threading.Event  # set once the server cannot be reached: nothing more is sent

    def send(self, event: Any) -> bool:
        """Send an event; False (never an exception) once the server is gone, so a training that reports
        progress to a dead server still finishes its step and saves."""
        if self.gone.is_set():
            return False
        try:
            with self.lock:
                self.conn.send(event)
            return True
        except OSError:
            log.warning("the server cannot be reached; stopping at the next step boundary")
            self.gone.set()
            return False


class WorkerState:
    """The model this worker holds and what was prepared for it."""

    def __init__(self, model_id: str = "") -> None:
        self.model_id = model_id  # names this worker's runs in output folder locks
        self.bundle: Any = None  # engine.model.ModelBundle once loaded
        self.training_config: Any = None


def handle(cmd: Command, state: WorkerState, channel: _Channel, controls: "_Controls") -> dict[str, Any]:
    match cmd:
        case Load(config=UnslothLoadConfig() as config):
            from llm_mcp.engine.load import sources  # imports unsloth before transformers, as it must

            state.bundle = sources.load_unsloth(config)  # a folder, hub id, .gguf or adapter folder
            return _loaded(state.bundle)
        case Load(config=config):
            from llm_mcp.engine.load import sources

            state.bundle = sources.load_qlora(config)
            return _loaded(state.bundle)
        case Prepare(config=config, lora=lora):
            if lora is not None and not state.bundle.has_lora:
                from llm_mcp.engine.load import unsloth_backend

                unsloth_backend.attach_lora(state.bundle, lora)
            from llm_mcp.engine.train import run as engine_train

            result = engine_train.prepare(state.bundle, config)
            state.training_config = config
            return {**state.bundle.describe(), **result, "warnings": result["warnings"]}
        case Train():
            return _train(cmd, state, channel, controls)
        case Generate(config=config):
            from llm_mcp.engine.infer.generate import generate

            return generate(state.bundle, config)
        case Evaluate(dataset=dataset, dataset_format=fmt, batch_size=batch_size, use_adapter=use_adapter):
            from llm_mcp.engine.infer.evaluate import evaluate

            return evaluate(state.bundle, dataset, dataset_format=fmt, batch_size=batch_size,
                            should_stop=controls.should_stop, use_adapter=use_adapter)
        case Export(config=config, probe_prompt=probe):
            from llm_mcp.engine.export.merge import export

            return export(state.bundle, config, probe_prompt=probe, holder=f"model {state.model_id}, export")
        case InspectDataset(dataset=dataset, dataset_format=fmt):
            from llm_mcp.data.inspect import inspect_dataset

            return inspect_dataset(dataset, dataset_format=fmt, tokenizer=state.bundle.tokenizer,
                                   max_length=state.bundle.max_length, should_stop=controls.should_stop)
    raise AssertionError(f"unknown command {type(cmd).__name__}")


def _train(cmd: Train, state: WorkerState, channel: _Channel, controls: "_Controls") -> dict[str, Any]:
    """Run a training; its end, whatever it is, also goes to the job-end file, which outlives the server."""
    from llm_mcp.engine.train import run as engine_train

    seen: dict[str, Any] = {"step": 0, "checkpoint": None}

    def on_progress(step: int, total: int, logs: dict[str, Any]) -> None:
        seen["step"] = step
        seen["checkpoint"] = logs.get("checkpoint") or seen["checkpoint"]
        channel.send(Progress(cmd.request_id, step, total, logs.get("loss"), logs.get("learning_rate"),
                              logs.get("epoch"), logs.get("eval_loss"), logs.get("checkpoint"), logs.get("ranks"),
                              logs.get("method_metrics")))

    state_dir = os.environ.get(ends.STATE_DIR_ENV)
    try:
        result = engine_train.train(
            state.bundle, cmd.config, cmd.train_dataset, cmd.eval_dataset, cmd.options,
            on_progress=on_progress, should_stop=controls.should_stop, notes=list(cmd.warnings),
            cpu_threads=lambda: controls.threads, holder=f"model {state.model_id}, job {cmd.job_id}",
        )
    except BaseException as exc:
        error = _as_disk_full(exc, cmd.config.output_dir) if isinstance(exc, Exception) else None
        cancelled = type(error or exc).__name__ == "Cancelled"
        _record_end(state_dir, cmd.job_id, state="cancelled" if cancelled else "failed",
                    error=str(error or exc) or type(exc).__name__, step=seen["step"],
                    last_checkpoint=seen["checkpoint"])
        if error is not None and error is not exc:
            raise error from exc
        raise
    if channel.gone.is_set() or controls.shutdown.is_set():
        result["warnings"] = [*result.get("warnings", []), "the server went away during this run: it stopped at a "
                              "step boundary with a checkpoint and the adapter saved."]
    _record_end(state_dir, cmd.job_id, state="cancelled" if result.get("status") == "cancelled" else "succeeded",
                result={**result, "job_id": cmd.job_id}, step=result.get("global_step", seen["step"]),
                last_checkpoint=seen["checkpoint"])
    return result


def _record_end(state_dir: str | None, job_id: str | None, **end: Any) -> None:
    if state_dir and job_id and not ends.write(state_dir, job_id, **end):
        log.warning("could not write the job-end file of %s in %s; if the server is gone, the next one marks "
                    "the job failed", job_id, state_dir)


def _as_disk_full(exc: Exception, folder: str) -> Exception:
    """A full disk met anywhere (a model conversion, a dataset cache, a checkpoint) as DiskFull naming the folder
    (the file's own folder when the error names one), instead of an error that blames a parameter."""
    if isinstance(exc, DiskFull):
        return exc
    filename = getattr(exc, "filename", None) or getattr(exc.__context__, "filename", None)
    where = os.path.dirname(os.path.abspath(filename)) if isinstance(filename, str) else os.path.abspath(folder)
    if not is_disk_full(exc, where):
        return exc
    return DiskFull(where, needed=None, free=free_bytes(where), doing=f"{type(exc).__name__}: {str(exc)[:200]};")


def _loaded(bundle: Any) -> dict[str, Any]:
    """The load answer: the bundle's description and the chat template in use."""
    from llm_mcp.data.chat_templates import summary

    return {**bundle.describe(), "chat_template": summary(bundle.tokenizer)}


@dataclass
class _Controls:
    """What control messages set while a command runs; the training reads them at each step."""

    cancel: threading.Event  # set by Stop: end the current training at the next step (checkpoint saved)
    shutdown: threading.Event  # set by Shutdown or by the server going away
    threads: int | None = None  # set by SetThreads: CPU threads while other trainings share the cores

    gone: threading.Event | None = None  # the channel's: the server cannot be reached

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.shutdown.is_set() or bool(self.gone and self.gone.is_set())


def _read_commands(channel: _Channel, commands: queue.SimpleQueue, controls: _Controls) -> None:
    """Reader thread: control messages (Stop, SetThreads, Shutdown) act at once, even while a command runs."""
    while True:
        try:
            cmd = channel.conn.recv()
        except (EOFError, OSError):
            cmd = Shutdown("server-gone")  # the server went away: stop at the next step boundary, then exit
        if isinstance(cmd, Stop):
            controls.cancel.set()
            channel.send(Done(cmd.request_id, {"stopping": True}))
            continue
        if isinstance(cmd, SetThreads):
            controls.threads = cmd.threads
            channel.send(Done(cmd.request_id, {"threads": cmd.threads}))
            continue
        if isinstance(cmd, Shutdown):
            controls.shutdown.set()
            commands.put(cmd)
            return
        # A Stop aimed at an earlier command must not end this one; cleared here, in pipe order, so a Stop sent
        # right after this command (a cancel while it is still queued or reading its data) is kept.
        controls.cancel.clear()
        commands.put(cmd)


def worker_main(fd: int, model_id: str = "") -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Libraries print to stdout (progress bars, trainer logs); fd 1 is our log file already, but make sure.
    os.dup2(2, 1)
    channel = _Channel(Connection(fd), threading.Lock(), threading.Event())
    commands: queue.SimpleQueue = queue.SimpleQueue()  # its put is safe inside a signal handler; Queue's is not
    controls = _Controls(threading.Event(), threading.Event(), gone=channel.gone)
    # SIGTERM: stop as the server's Shutdown does (step, checkpoint, adapter, exit); SIGINT: the server decides
    signal.signal(signal.SIGTERM, lambda *_: (controls.shutdown.set(), commands.put(Shutdown("sigterm"))))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_read_commands, args=(channel, commands, controls), daemon=True).start()
    state = WorkerState(model_id)
    while True:
        cmd = commands.get()
        if isinstance(cmd, Shutdown):
            log.info("shutting down (%s)", cmd.request_id)
            break
        log.info("command %s %s", type(cmd).__name__, cmd.request_id)
        try:
            answer: Any = Done(cmd.request_id, handle(cmd, state, channel, controls))
        except Exception as exc:  # report, never die: the model stays loaded for the next command
            error = _as_disk_full(exc, os.getcwd())
            if isinstance(error, LlmMcpError):
                answer = Failed(cmd.request_id, type(error).__name__, str(error))
            else:
                log.exception("command %s failed", cmd.request_id)
                answer = Failed(cmd.request_id, "EngineError", f"{type(exc).__name__}: {exc}",
                                traceback.format_exc())
        if not channel.send(answer) or controls.shutdown.is_set():  # the server is gone, or SIGTERM came
            log.info("server gone or shutdown asked; exiting")
            break
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of torch threads; the server waits on our exit


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
