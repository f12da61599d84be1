"""Worker side: `python -m llm_mcp.workers.worker FD` holds one model and runs the commands the server sends.

The only module that imports the engine (and so torch). One `match` loop, one handler per command, exactly one
Done or Failed per command. A reader thread turns a Stop, a Shutdown, or the server going away, into a stop flag,
and a SetThreads into a thread count, which the training loop checks between steps.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llm_mcp.config import UnslothLoadConfig
from llm_mcp.errors import LlmMcpError
from llm_mcp.workers.protocol import (
    Command, Done, Evaluate, Export, Failed, Generate, InspectDataset, Load, Prepare, Progress, SetThreads, Shutdown,
    Stop, Train,
)

log = logging.getLogger("llm_mcp.worker")


@dataclass
class _Channel:
    conn: Connection
    lock: threading.Lock

    def send(self, event: Any) -> None:
        with self.lock:
            self.conn.send(event)


class WorkerState:
    """The model this worker holds and what was prepared for it."""

    def __init__(self) -> None:
        self.bundle: Any = None  # engine.model.ModelBundle once loaded
        self.training_config: Any = None


def handle(cmd: Command, state: WorkerState, channel: _Channel, controls: "_Controls") -> dict[str, Any]:
    match cmd:
        case Load(config=UnslothLoadConfig() as config):
            from llm_mcp.engine import sources  # imports unsloth before transformers, as it must

            state.bundle = sources.load_unsloth(config)  # a folder, hub id, .gguf or adapter folder
            return _loaded(state.bundle)
        case Load(config=config):
            from llm_mcp.engine import sources

            state.bundle = sources.load_qlora(config)
            return _loaded(state.bundle)
        case Prepare(config=config, lora=lora):
            if lora is not None and not state.bundle.has_lora:
                from llm_mcp.engine import unsloth_backend

                unsloth_backend.attach_lora(state.bundle, lora)
            from llm_mcp.engine import train as engine_train

            result = engine_train.prepare(state.bundle, config)
            state.training_config = config
            return {**state.bundle.describe(), **result, "warnings": result["warnings"]}
        case Train():
            from llm_mcp.engine import train as engine_train

            def on_progress(step: int, total: int, logs: dict[str, Any]) -> None:
                channel.send(Progress(cmd.request_id, step, total, logs.get("loss"), logs.get("learning_rate"),
                                      logs.get("epoch"), logs.get("eval_loss"), logs.get("checkpoint")))

            controls.cancel.clear()  # a Stop aimed at an earlier run must not end this one
            return engine_train.train(
                state.bundle, cmd.config, cmd.train_dataset, cmd.eval_dataset, cmd.options,
                on_progress=on_progress, should_stop=controls.should_stop, notes=list(cmd.warnings),
                cpu_threads=lambda: controls.threads,
            )
        case Generate(config=config):
            from llm_mcp.engine.generate import generate

            return generate(state.bundle, config)
        case Evaluate(dataset=dataset, dataset_format=fmt, batch_size=batch_size):
            from llm_mcp.engine.evaluate import evaluate

            return evaluate(state.bundle, dataset, dataset_format=fmt, batch_size=batch_size)
        case Export(config=config, probe_prompt=probe):
            from llm_mcp.engine.export import export

            return export(state.bundle, config, probe_prompt=probe)
        case InspectDataset(dataset=dataset, dataset_format=fmt):
            from llm_mcp.data.inspect import inspect_dataset

            return inspect_dataset(dataset, dataset_format=fmt, tokenizer=state.bundle.tokenizer,
                                   max_length=state.bundle.max_length)
    raise AssertionError(f"unknown command {type(cmd).__name__}")


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

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.shutdown.is_set()


def _read_commands(channel: _Channel, commands: queue.Queue, controls: _Controls) -> None:
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
        commands.put(cmd)


def worker_main(fd: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Libraries print to stdout (progress bars, trainer logs); fd 1 is our log file already, but make sure.
    os.dup2(2, 1)
    channel = _Channel(Connection(fd), threading.Lock())
    commands: queue.Queue = queue.Queue()
    controls = _Controls(threading.Event(), threading.Event())
    threading.Thread(target=_read_commands, args=(channel, commands, controls), daemon=True).start()
    state = WorkerState()
    while True:
        cmd = commands.get()
        if isinstance(cmd, Shutdown):
            log.info("shutting down (%s)", cmd.request_id)
            break
        log.info("command %s %s", type(cmd).__name__, cmd.request_id)
        try:
            answer: Any = Done(cmd.request_id, handle(cmd, state, channel, controls))
        except LlmMcpError as exc:
            answer = Failed(cmd.request_id, type(exc).__name__, str(exc))
        except Exception as exc:  # report, never die: the model stays loaded for the next command
            log.exception("command %s failed", cmd.request_id)
            answer = Failed(cmd.request_id, "EngineError", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        try:
            channel.send(answer)
        except OSError:  # the server is gone; nobody is left to answer
            log.info("server gone; exiting")
            break
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of torch threads; the server waits on our exit


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
