"""Training across processes on a Ray cluster: a local head started by the test on 127.0.0.1, the server started
with --ray-address (ServerConfig.ray_address), and num_processes=2 run as Ray Train workers, with the same answers
and files as torch's local launcher; an address nothing answers on is a clear error naming the option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_LOAD, HW, TWO_RANKS as TWO, McpSession, cancel_after_two_steps, free_port, server_config
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
