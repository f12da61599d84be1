"""The Ray launcher of a training across processes: one Ray Train worker per rank (TorchTrainer) on an existing
cluster (the server's --ray-address), each running rank.py's training on the process group Ray Train set up.

The run folder (spec, progress, answer) and output_dir are paths every node reads and writes: on one machine they
are, on several they must be on a shared file system (the workspace on NFS, for example).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_mcp.config import RAY_ADDRESS_ENV
from llm_mcp.engine.train.callbacks import ProgressFn
from llm_mcp.errors import InvalidArgument

INSTALL = 'pip install "llm-mcp-server[ray]"'


def _ray() -> Any:
    try:
        import ray
        import ray.train.torch  # noqa: F401  Ray Train, part of ray[train]
    except ImportError:
        raise InvalidArgument("--ray-address", os.environ.get(RAY_ADDRESS_ENV), "a server without --ray-address, "
                              f"or Ray installed in the model worker's environment ({INSTALL})") from None
    return ray


def connect(address: str) -> Any:
    """ray.init on the cluster at `address` (once per worker), or a clear error naming the option."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    _reachable(address)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    except Exception as exc:  # ConnectionError, or Ray's own for an address with no cluster behind it
        raise InvalidArgument("--ray-address", address, "the address of a running Ray cluster ('auto', "
                              f"'host:port' or 'ray://host:port'); connecting failed with {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    return ray


def _reachable(address: str) -> None:
    """A host:port (or ray://host:port) that nothing answers on is refused in seconds, not after Ray's retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise InvalidArgument("--ray-address", address, f"the address of a running Ray cluster; nothing answers at "
                              f"{host}:{port} ({exc.strerror or exc}). Start one with `ray start --head`, or serve "
                              "without --ray-address to train on this machine's processes") from None


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the rank's environment as torch's launcher would set it, then rank.py's run."""
    import ray.train

    from llm_mcp.engine.train import rank

    os.chdir(loop_config["cwd"])  # the workspace: relative paths (output_dir, datasets) mean what they mean there
    os.environ.update(loop_config["env"])
    context = ray.train.get_context()
    os.environ.update(RANK=str(context.get_world_rank()), WORLD_SIZE=str(context.get_world_size()),
                      LOCAL_RANK=str(context.get_local_rank()),
                      OMP_NUM_THREADS=str(loop_config["threads"]))
    import torch

    torch.set_num_threads(loop_config["threads"])
    rank.run_rank(loop_config["run_dir"])


def run(run_plan: Any, run_dir: Path, *, on_progress: ProgressFn,
        should_stop: Callable[[], bool]) -> tuple[dict[str, Any], str]:
    """The ranks as Ray Train workers; their answer, or the first failure named, and the run's name."""
    from llm_mcp.engine.train import distributed

    ray = connect(run_plan.ray_address)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= run_plan.world_size
    cpus = int(resources.get("CPU", 1))
    if not use_gpu and cpus < run_plan.world_size:
        raise InvalidArgument("num_processes", run_plan.world_size, f"at most {cpus}: the Ray cluster at "
                              f"{run_plan.ray_address} has {cpus} CPUs and no GPU for each process")
    name = f"llm-mcp-{run_dir.name}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"run_dir": str(run_dir), "threads": max(1, cpus // run_plan.world_size),
                           "cwd": os.getcwd(),  # the model worker's own settings (state folder, dataset limits)
                           "env": {k: v for k, v in os.environ.items()
                                   if k.startswith("LLM_MCP_") and k != "LLM_MCP_TOKEN"}},
        torch_config=TorchConfig(backend=run_plan.backend),
        scaling_config=ScalingConfig(num_workers=run_plan.world_size, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray")),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # TrainingFailedError wraps a worker's error; rank.py wrote it to its file
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=name, daemon=True)
    thread.start()
    distributed.follow(run_dir, thread.is_alive, on_progress=on_progress, should_stop=should_stop)
    error = outcome.get("error")
    message = "" if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
    return distributed.result(run_dir, 0 if error is None else 1, message), name
