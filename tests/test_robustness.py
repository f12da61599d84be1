"""The server outlives its workers: a killed worker fails its calls cleanly and the model shows as lost.
Also the HTTP transport on loopback, and config validation messages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_LOAD, McpSession
from llm_mcp.config import LoadConfig, TrainingConfig, validated
from llm_mcp.errors import InvalidArgument
from test_load_unload import worker_pids


def test_killed_worker_is_reported_and_server_keeps_serving(mcp, tiny_model, demo_rows):
    """kill -9 of a model's worker: its next call is a clear error, list_models says lost, other models and
    new loads work, and unload clears it."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "victim", **FAST_LOAD})
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "bystander", **FAST_LOAD})
    [pid] = worker_pids("victim")
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while "lost" not in mcp.ok("qloraevolved_list_models")["models"]["victim"]["state"] and time.time() < deadline:
        time.sleep(0.1)
    assert "SIGKILL" in mcp.ok("qloraevolved_list_models")["models"]["victim"]["state"]
    text = mcp.error("qloraevolved_prepare_for_training", {"model_id": "victim"})
    assert "victim" in text and "load it again" in text
    assert mcp.ok("qloraevolved_prepare_for_training", {"model_id": "bystander"})["status"] == "success"
    mcp.ok("qloraevolved_unload_model", {"model_id": "victim"})
    assert list(mcp.ok("qloraevolved_list_models")["models"]) == ["bystander"]


def test_config_errors_name_field_value_and_bound():
    """Config validation names the field, the value and the bound; unknown keys are named too."""
    with pytest.raises(InvalidArgument, match=r"training_config.learning_rate=5: Input should be less than or equal"):
        validated(TrainingConfig, {"learning_rate": 5}, where="training_config")
    with pytest.raises(InvalidArgument, match="training_config.lr is not a known parameter"):
        validated(TrainingConfig, {"lr": 1e-3}, where="training_config")
    with pytest.raises(InvalidArgument, match=r"^max_steps=0 is not valid; expected -1"):
        validated(TrainingConfig, {"max_steps": 0}, where="training_config")
    with pytest.raises(InvalidArgument, match="load_model.quant_type='q3'"):
        validated(LoadConfig, {"model_name": "x", "quant_type": "q3"}, where="load_model")
    assert LoadConfig(model_name="x", load_in_4bit=False, quant_type="int4").effective_quant_type == "none"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamable_http_transport_on_loopback(tmp_path):
    """`serve --transport streamable-http` binds 127.0.0.1 by default and serves the same tools."""
    port = _free_port()
    exe = Path(sys.executable).with_name("llm-mcp")
    proc = subprocess.Popen([str(exe), "serve", "--transport", "streamable-http", "--port", str(port),
                             "--workspace", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening
        with McpSession(f"http://127.0.0.1:{port}/mcp") as mcp:
            assert "qloraevolved_list_models" in mcp.tools()
            assert mcp.ok("qloraevolved_list_models") == {"status": "success", "models": {}}
    finally:
        proc.terminate()
        proc.wait(10)
