"""A training across processes, launched from the model's worker on torch's own engines: torch.distributed.run on
this machine (gloo on CPU, nccl on CUDA), or Ray Train workers on an existing cluster (--ray-address).

The worker stays the model's owner. It checks the output folder and resolves the resume point, hands its live
adapter weights to the ranks (rank.py), relays rank 0's progress, turns a cancel into the ranks' stop file, and
when they are done loads the final adapter into its live model, so generate, evaluate and export go on from the
trained adapter. A rank that dies fails the run naming the rank and the cause; the launcher ends the others.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm_mcp import errors
from llm_mcp.config import RunOptions, TrainingConfig
from llm_mcp.engine.device import detect
from llm_mcp.engine.train import rank as rank_entry
from llm_mcp.engine.train.callbacks import ProgressFn
from llm_mcp.errors import InvalidArgument, LlmMcpError, TrainingFailed

log = logging.getLogger(__name__)

_POLL_S = 0.2
_RANKS_EVERY_S = 5.0  # the ranks' liveness is sent when it changes, and this often besides
_SIGNALS = {int(s): s.name for s in signal.Signals}


@dataclass(frozen=True)
class Plan:
    """How a run is spread over processes, as the train answer's effective_config reports it."""

    world_size: int
    strategy: str  # "ddp" | "fsdp" | "single_process"
    backend: str | None  # "gloo" | "nccl"; None in one process
    launcher: str  # "local" | "ray"
    ray_address: str | None = None

    def effective(self, config: TrainingConfig, run_name: str | None = None) -> dict[str, Any]:
        out = {"world_size": self.world_size, "strategy": self.strategy, "backend": self.backend,
               "launcher": self.launcher,
               "global_batch_size": config.batch_size * config.gradient_accumulation_steps * self.world_size}
        if self.launcher == "ray":
            out.update(ray_address=self.ray_address, ray_run_name=run_name)
        return out


SINGLE = Plan(world_size=1, strategy="single_process", backend=None, launcher="local")


def plan(config: TrainingConfig, *, engine: str, ray_address: str | None, full_copy_fits: bool = True) -> Plan:
    """The run's spread, or a clear error where this machine (or engine) cannot give it. full_copy_fits: whether
    a full copy of the model and its training state fits each device (auto: DDP where it does, else FSDP2)."""
    n = config.num_processes
    if n == 1:
        return SINGLE
    if engine != "transformers":
        raise InvalidArgument("num_processes", n, "1 for a model loaded by the unsloth engine: Unsloth's open-source "
                              "engine trains on one device; load the model with qloraevolved_load_model to train "
                              "across processes")
    hw = detect()
    asked = config.distributed_strategy
    strategy = "fsdp" if asked == "fsdp" or (asked == "auto" and not full_copy_fits) else "ddp"
    if strategy == "fsdp" and not hw.has_cuda:
        from llm_mcp.engine.patches import fsdp_cpu

        if (why := fsdp_cpu.supported()) is not None:
            raise InvalidArgument("distributed_strategy", "fsdp", f"'ddp' or 'auto' on this machine's CPUs: FSDP2 "
                                  f"over gloo needs accelerate to keep its FSDP plugin on CPU, and {why}")
    backend = "nccl" if hw.has_cuda else "gloo"
    if ray_address:
        return Plan(n, strategy, backend, "ray", ray_address)
    available, what = _local_devices(hw.has_cuda)
    if n > available:
        raise InvalidArgument("num_processes", n, f"at most {available} on this machine (one process per {what}), "
                              f"or a Ray cluster for more (start the server with --ray-address)")
    return Plan(n, strategy, backend, "local")


def full_copy_fits(bundle: Any, config: TrainingConfig) -> bool:
    """Whether DDP fits: each rank's full copy of the model, adapters, gradients, optimizer state and activations
    (on CPU every rank's together in this machine's memory) within the free memory, by memory.estimate."""
    if config.num_processes == 1 or config.distributed_strategy != "auto":
        return True
    from llm_mcp.engine.train.choices import run_estimate

    run = run_estimate(bundle, config, num_processes=config.num_processes, distributed_strategy="ddp")
    return run is None or run.fits is not False


def _local_devices(has_cuda: bool) -> tuple[int, str]:
    if has_cuda:
        import torch

        return torch.cuda.device_count(), "CUDA GPU"
    return len(os.sched_getaffinity(0)), "CPU core"


def train(bundle: Any, config: TrainingConfig, train_source: Any, eval_source: Any, options: RunOptions, *,
          on_progress: ProgressFn, should_stop: Callable[[], bool], notes: list[str],
          run_plan: Plan) -> dict[str, Any]:
    """The run across run_plan.world_size processes; afterwards the live model holds the trained adapter."""
    from llm_mcp.engine.load.sources import state_dir
    from llm_mcp.engine.train import run as engine_train

    if getattr(bundle, "load_config", None) is None:
        raise InvalidArgument("num_processes", config.num_processes, "1 for this model: it was not loaded from a "
                              "load configuration the ranks can repeat")
    resume, early_warnings = engine_train.ready_output_dir(bundle, config, options)
    runs = state_dir() / "distributed"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    try:
        _save_adapter_weights(bundle.model, run_dir / rank_entry.START_ADAPTER)
        spec = rank_entry.RankSpec(
            load_config=bundle.load_config, config=config, train_source=train_source, eval_source=eval_source,
            options=replace(options, resume_from_checkpoint=resume or False, overwrite_output_dir=False),
            notes=tuple(notes) + tuple(early_warnings))
        (run_dir / rank_entry.SPEC).write_bytes(pickle.dumps(spec))
        if run_plan.launcher == "ray":
            from llm_mcp.engine.train import ray_launch

            answer, run_name = ray_launch.run(run_plan, run_dir, on_progress=on_progress, should_stop=should_stop)
        else:
            answer, run_name = _run_local(run_plan, run_dir, on_progress=on_progress, should_stop=should_stop), None
        _load_trained_adapter(bundle.model, Path(answer["output_path"]))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    answer["effective_config"].update(run_plan.effective(config, run_name))
    return answer


# -- the local launcher: torch.distributed.run ------------------------------------------------------------------

def _run_local(run_plan: Plan, run_dir: Path, *, on_progress: ProgressFn,
               should_stop: Callable[[], bool]) -> dict[str, Any]:
    """torch's launcher starts the ranks on this machine and ends them all when one fails."""
    threads = max(1, len(os.sched_getaffinity(0)) // run_plan.world_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run_plan.world_size}",
           "--monitor-interval=0.5", "-m", "llm_mcp.engine.train.rank", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log_path = run_dir / "launcher.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_end_with_parent)
        try:
            follow(run_dir, lambda: proc.poll() is None, on_progress=on_progress, should_stop=should_stop)
        finally:
            if proc.poll() is None:  # an error here: the ranks must not outlive the run
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return result(run_dir, proc.returncode, log_path.read_text(errors="replace"))


def _end_with_parent() -> None:
    """The launcher (and through it every rank) gets SIGTERM when the worker dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def follow(run_dir: Path, running: Callable[[], bool], *, on_progress: ProgressFn,
            should_stop: Callable[[], bool]) -> None:
    """Relay rank 0's progress lines while the ranks run; a stop asked here becomes the ranks' stop file."""
    progress = run_dir / rank_entry.PROGRESS
    offset = 0
    last: dict[str, Any] = {"step": 0, "total": 0, "ranks": None, "sent": 0.0}
    while True:
        alive = running()
        if should_stop() and not (run_dir / rank_entry.STOP).exists():
            (run_dir / rank_entry.STOP).touch()
        if progress.exists():
            with progress.open() as lines:
                lines.seek(offset)
                for line in iter(lines.readline, ""):
                    if not line.endswith("\n"):
                        break  # a line still being written: read it whole next time
                    offset += len(line.encode())
                    event = json.loads(line)
                    last.update(step=event["step"], total=event["total"])
                    on_progress(event["step"], event["total"], event["logs"])
        seen = rank_liveness(run_dir)
        key = [(r["rank"], r["pid"], r["alive"]) for r in seen]
        if seen and (key != last["ranks"] or time.monotonic() - last["sent"] > _RANKS_EVERY_S):
            last.update(ranks=key, sent=time.monotonic())
            on_progress(last["step"], last["total"], {"ranks": tuple(seen)})
        if not alive:
            return
        time.sleep(_POLL_S)


def rank_liveness(run_dir: Path) -> list[dict[str, Any]]:
    """Each rank that has started: its pid and host, whether it lives (its process, where it runs on this host;
    else a step finished within the last minute), and how long ago it last finished a step (whole seconds)."""
    host, now, out = socket.gethostname(), time.time(), []
    for beat in sorted(run_dir.glob("rank-*.alive.json")):
        try:
            info, mtime = json.loads(beat.read_text()), beat.stat().st_mtime
        except (OSError, ValueError):  # being written
            continue
        ago = int(now - mtime)
        alive = _pid_alive(info["pid"]) if info["host"] == host else ago < 60
        out.append({**info, "alive": alive, "last_step_seconds_ago": ago})
    return sorted(out, key=lambda r: r["rank"])


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def result(run_dir: Path, returncode: int | None, launcher_output: str) -> dict[str, Any]:
    """Rank 0's answer, or the failure of the first rank that failed, named."""
    answer = run_dir / rank_entry.RESULT
    if returncode == 0 and answer.is_file():
        return json.loads(answer.read_text())
    raise _failure(run_dir, returncode, launcher_output)


def _failure(run_dir: Path, returncode: int | None, launcher_output: str) -> Exception:
    """A rank killed by a signal is the cause (the others then fail on their broken connections); else the first
    rank's own error, of the same kind, naming the rank."""
    # the launcher itself ends the surviving ranks with SIGTERM: another signal is the cause
    killed = sorted(((rank, code) for rank, code in _failed_ranks(launcher_output) if code < 0),
                    key=lambda rc: (rc[1] == -signal.SIGTERM, rc[0]))
    if killed:
        rank, code = killed[0]
        how = _SIGNALS.get(-code, f"signal {-code}")
        why = " (out of memory, or killed from outside)" if -code == signal.SIGKILL else ""
        return TrainingFailed(f"rank {rank} of the distributed run was killed by {how}{why}; the launcher ended the "
                              "other ranks. Checkpoints already written are kept (resume_from_checkpoint=true "
                              "continues).")
    reports = sorted((json.loads(p.read_text()) for p in run_dir.glob("rank-*.error.json")),
                     key=lambda r: r["rank"])
    reported = {r["rank"] for r in reports}
    silent = [r["rank"] for r in rank_liveness(run_dir) if r["rank"] not in reported and not r["alive"]]
    if reports and silent:  # a rank that died without a word (no launcher of ours to name its signal: Ray): the
        # others' errors are their broken connections to it
        return TrainingFailed(f"rank {silent[0]} of the distributed run died without reporting an error: killed "
                              "from outside (kill -9, SIGKILL) or by the out-of-memory killer; the other ranks "
                              "then lost their connection to it and were ended. Checkpoints already written are "
                              "kept (resume_from_checkpoint=true continues).")
    if reports:  # an error of ours or of the libraries, raised in a rank: the same kind of error, naming the rank
        first = reports[0]
        log.error("rank %s failed:\n%s", first["rank"], first.get("traceback", ""))
        return _rebuilt(first["kind"], f"rank {first['rank']} of the distributed run failed: {first['message']}")
    exited = sorted(_failed_ranks(launcher_output))
    if exited:
        return TrainingFailed(f"rank {exited[0][0]} of the distributed run exited with code {exited[0][1]}; the "
                              "launcher ended the other ranks. Checkpoints already written are kept.")
    tail = launcher_output.strip().splitlines()[-5:]
    return TrainingFailed(f"the distributed run failed (launcher exit code {returncode}): {' | '.join(tail)[:600]}; "
                          "checkpoints already written are kept.")


_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def _failed_ranks(launcher_output: str) -> list[tuple[int, int]]:
    """(rank, exit code) of every failed rank in torch's launcher summary; a negative code is a signal."""
    return [(int(rank), int(code)) for rank, code in _FAILED_RANK.findall(launcher_output)]


def _rebuilt(kind: str, message: str) -> Exception:
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LlmMcpError)):
        return errors.EngineError(message)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


# -- the adapter handed over and taken back -----------------------------------------------------------------------

def _save_adapter_weights(model: Any, path: Path) -> None:
    """The live adapter's weights, which every rank starts from (a model may have been trained before)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))


def _load_trained_adapter(model: Any, final: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(final / "adapter_model.safetensors")))
