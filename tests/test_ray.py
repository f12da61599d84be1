"""Training across processes on a Ray cluster: a local head started by the test on 127.0.0.1, the server started
with --ray-address (ServerConfig.ray_address), and num_processes=2 run as Ray Train workers, with the same answers
and files as torch's local launcher; an address nothing answers on is a clear error naming the option."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (FAST_LOAD, HW, TWO_RANKS as TWO, McpSession, cancel_after_two_steps, free_port, job_status,
                      poll_job, server_config, wait_for, wait_for_step)
from llm_mcp.server.app import create_server

RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(HW.has_cuda, reason="the CPU cluster path; GPU clusters take nccl")


def _need_ray() -> None:
    if not os.environ.get("LLM_MCP_REQUIRE_RAY"):
        pytest.importorskip("ray", reason="Ray is the optional [ray] extra")
        pytest.importorskip("ray.train", reason="Ray Train is the optional [ray] extra")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    _need_ray()
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, timeout=180, env=env,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], timeout=120, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def test_two_ray_train_workers_train_like_the_local_launcher(ray_address, workspace, tiny_model, demo_rows):
    with McpSession(create_server(server_config(workspace, tiny_model, ray_address=ray_address))) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "on-ray", **FAST_LOAD})
        before = mcp.ok("qloraevolved_evaluate", {"model_id": "on-ray", "eval_dataset": demo_rows[:8]})["eval_loss"]
        trained = mcp.ok("qloraevolved_train", {
            "model_id": "on-ray", "train_dataset": demo_rows, "wait_seconds": -1,
            "training_config": {**TWO, "max_steps": 8, "save_steps": 4, "output_dir": "ray-run"}})
        assert trained["status"] == "success" and trained["global_step"] == 8, trained
        effective = trained["effective_config"]
        assert (effective["world_size"], effective["launcher"], effective["backend"]) == (2, "ray", "gloo")
        assert effective["ray_address"] == ray_address and effective["ray_run_name"].startswith("llm-mcp-")
        out = workspace / "ray-run"
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
        assert all((p / ".complete").is_file() for p in out.glob("checkpoint-*"))
        assert (out / "final" / "adapter_model.safetensors").is_file()
        after = mcp.ok("qloraevolved_evaluate", {"model_id": "on-ray", "eval_dataset": demo_rows[:8]})["eval_loss"]
        assert after < 0.8 * before, (before, after)


def test_cancel_stops_every_ray_worker_with_a_checkpoint(ray_address, workspace, tiny_model, demo_rows):
    with McpSession(create_server(server_config(workspace, tiny_model, ray_address=ray_address))) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "ray-stop", **FAST_LOAD})
        cancel_after_two_steps(mcp, "ray-stop", demo_rows, workspace, "ray-cancel")
        assert (workspace / "ray-cancel" / "final" / "adapter_model.safetensors").is_file()


def test_an_unreachable_ray_address_is_a_clear_error(workspace, tiny_model, demo_rows):
    _need_ray()
    dead = f"127.0.0.1:{free_port()}"
    with McpSession(create_server(server_config(workspace, tiny_model, ray_address=dead))) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "no-ray", **FAST_LOAD})
        text = mcp.error("qloraevolved_train", {"model_id": "no-ray", "train_dataset": demo_rows,
                                                "wait_seconds": -1,
                                                "training_config": {**TWO, "max_steps": 2, "output_dir": "no-ray"}})
        assert "--ray-address" in text and dead in text, text
        assert not (workspace / "no-ray" / "final").exists()
        answer = mcp.ok("qloraevolved_generate", {"model_id": "no-ray", "prompt": "x", "max_new_tokens": 2})
        assert answer["completion_tokens"] >= 1  # the model stays loaded


def test_a_killed_ray_worker_fails_the_job_naming_its_rank(ray_address, workspace, tiny_model, demo_rows):
    """kill -9 of one Ray Train worker: the job fails naming that rank, the other rank's process ends (Ray Train
    tears the worker group down), and the server and the model's worker go on."""
    with McpSession(create_server(server_config(workspace, tiny_model, ray_address=ray_address))) as mcp:
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "ray-kill", **FAST_LOAD})
        job = mcp.ok("qloraevolved_train", {
            "model_id": "ray-kill", "train_dataset": demo_rows * 4, "wait_seconds": 0,
            "training_config": {**TWO, "max_steps": 400, "save_steps": 1000, "output_dir": "ray-killed"}})["job_id"]
        wait_for_step(mcp, job, 1)

        def both_alive():
            ranks = job_status(mcp, job).get("ranks") or []
            return ranks if [(r["rank"], r["alive"]) for r in ranks] == [(0, True), (1, True)] else None

        ranks = wait_for(both_alive, "training_status to show both Ray workers alive", timeout=120)
        pids = {r["rank"]: r["pid"] for r in ranks}
        os.kill(pids[1], signal.SIGKILL)
        ended = poll_job(mcp, job)
        assert ended["state"] == "failed", ended
        assert "rank 1" in ended["error"] and "SIGKILL" in ended["error"], ended["error"]
        wait_for(lambda: not _alive(pids[0]), "rank 0's Ray worker to end", timeout=60)
        answer = mcp.ok("qloraevolved_generate", {"model_id": "ray-kill", "prompt": "x", "max_new_tokens": 2})
        assert answer["completion_tokens"] >= 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
