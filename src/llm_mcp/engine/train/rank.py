"""One rank of a training across processes: `python -m llm_mcp.engine.train.rank RUN_DIR`, started by torch's
launcher (torch.distributed.run) or by a Ray Train worker (`run_rank`).

Each rank loads the model as the worker loaded it, takes the worker's live adapter weights, and runs the engine's
one training (run.py) on its share of every batch; accelerate starts the process group from the launcher's
environment. Rank 0 writes progress lines, the checkpoints, the final adapter and the answer into RUN_DIR for the
model's worker (distributed.py), which stays the model's owner. A stop file in RUN_DIR ends the run at the next
step on every rank, with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp.engine.train import ranks

SPEC = "spec.pkl"
START_ADAPTER = "start_adapter.safetensors"
PROGRESS = "progress.jsonl"
RESULT = "result.json"
STOP = "stop"


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to run the same training the worker would have run."""

    load_config: Any  # the LoadConfig the worker's model was loaded with
    config: Any  # TrainingConfig
    train_source: Any
    eval_source: Any
    options: Any  # RunOptions; resume already resolved to a checkpoint path (or False) by the worker
    notes: tuple[str, ...] = ()


def heartbeat_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank}.alive.json"


def error_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank}.error.json"


def run_rank(run_dir: str | Path) -> None:
    """Load, train, and (rank 0) report; an error is written to this rank's error file before it is raised."""
    run_dir = Path(run_dir)
    try:
        _run(run_dir)
    except BaseException as exc:
        error_file(run_dir, ranks.rank()).write_text(json.dumps({
            "rank": ranks.rank(), "kind": type(exc).__name__, "message": str(exc) or type(exc).__name__,
            "traceback": traceback.format_exc()}))
        raise


def _run(run_dir: Path) -> None:
    from llm_mcp.engine.load import sources
    from llm_mcp.engine.train import run as engine_train

    spec: RankSpec = pickle.loads((run_dir / SPEC).read_bytes())
    bundle = sources.load_qlora(_on_own_device(spec.load_config),
                                shardable=spec.config.distributed_strategy == "fsdp")
    _load_adapter_weights(bundle.model, run_dir / START_ADAPTER)
    progress = (run_dir / PROGRESS).open("a") if ranks.is_main() else None

    def on_progress(step: int, total: int, logs: dict[str, Any]) -> None:
        if progress is not None:
            progress.write(json.dumps({"step": step, "total": total, "logs": logs}) + "\n")
            progress.flush()

    beat = heartbeat_file(run_dir, ranks.rank())
    beat.write_text(json.dumps({"rank": ranks.rank(), "pid": os.getpid(), "host": socket.gethostname()}))

    def should_stop() -> bool:  # asked at every step's end, on every rank
        os.utime(beat)  # this rank lives: training_status shows when each rank last finished a step
        return ranks.any_rank((run_dir / STOP).exists())

    answer = engine_train.run_training(bundle, spec.config, spec.train_source, spec.eval_source, spec.options,
                                       on_progress=on_progress, should_stop=should_stop, notes=list(spec.notes))
    if ranks.is_main():
        tmp = run_dir / f"{RESULT}.tmp"
        tmp.write_text(json.dumps(answer, default=str))
        tmp.rename(run_dir / RESULT)


def _on_own_device(load_config: Any) -> Any:
    """On GPUs each rank loads onto its own device (LOCAL_RANK), never all onto the first."""
    import torch

    if not torch.cuda.is_available():
        return load_config
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return dataclasses.replace(load_config, device_map=f"cuda:{local_rank}")


def _load_adapter_weights(model: Any, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path)))


if __name__ == "__main__":
    run_rank(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of torch threads, as the worker does
