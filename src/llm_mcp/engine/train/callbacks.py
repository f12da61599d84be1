"""The trainer callbacks of a run: progress to the server and a clean stop, and the CPU cores shared among runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from llm_mcp.engine.device import release_freed_memory

ProgressFn = Callable[[int, int, dict[str, float]], None]
_PROGRESS_EVERY_S = 0.5


class ProgressCallback(TrainerCallback):
    """Forward step/total/loss to the server (throttled) and stop cleanly, with a checkpoint, when asked."""

    def __init__(self, on_progress: ProgressFn, should_stop: Callable[[], bool], *, release_memory: bool,
                 method_metrics: Callable[[dict], dict[str, float]] | None = None) -> None:
        self.on_progress = on_progress
        self.method_metrics = method_metrics  # picks the method's own metrics out of a log entry
        self.should_stop = should_stop
        self.release_memory = release_memory
        self.latest: dict[str, float] = {}
        self.last_sent = 0.0
        self.stopped = False
        self.start_step = 0  # > 0 when resuming: log_history then also holds the earlier run's entries

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.latest = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            picked = self.method_metrics(logs) if self.method_metrics else None
            if picked:
                self.latest["method_metrics"] = picked
            self._send(state, force=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.on_progress(state.global_step, state.max_steps, {"eval_loss": float(metrics["eval_loss"])})

    def on_save(self, args, state, control, **kwargs):
        checkpoint = str(Path(args.output_dir).resolve() / f"checkpoint-{state.global_step}")
        self.on_progress(state.global_step, state.max_steps, {**self.latest, "checkpoint": checkpoint})

    def on_step_end(self, args, state, control, **kwargs):
        if self.release_memory:
            release_freed_memory()
        if not control.should_log:  # a logging step reports from on_log, with its loss
            self._send(state, force=state.global_step >= state.max_steps)
        if self.should_stop():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def _send(self, state, *, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.last_sent >= _PROGRESS_EVERY_S:
            self.last_sent = now
            self.on_progress(state.global_step, state.max_steps, self.latest)


class CoreShare(TrainerCallback):
    """Follow the thread count asked for at each step: runs that each use every core contend for them and all slow
    down many times over, so the server splits the cores whenever a training starts or ends."""

    def __init__(self, wanted: Callable[[], int | None]) -> None:
        import torch

        self.wanted = wanted
        self.all = self.current = torch.get_num_threads()
        self.changes: list[tuple[int, int]] = []  # (step, threads from then on)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def _apply(self, step: int) -> None:
        import torch

        threads = min(self.wanted() or self.all, self.all)
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
            self.changes.append((step, threads))

    def restore(self) -> None:
        import torch

        torch.set_num_threads(self.all)

    def describe(self) -> str:
        steps = ", ".join(f"{threads} from step {step}" for step, threads in self.changes)
        return (f"cpu threads: {steps} (of {self.all}), as other trainings started or ended on this machine's "
                "cores.")
