"""The server outlives its workers: a killed worker fails its calls cleanly and the model shows as lost.
Also the HTTP transport on loopback, and config validation messages."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import FAST_LOAD, McpSession, wait_for, worker_pids
from llm_mcp.config import LoadConfig, TrainingConfig, validated
from llm_mcp.errors import InvalidArgument


def test_killed_worker_is_reported_and_server_keeps_serving(mcp, tiny_model, demo_rows):
    """kill -9 of a model's worker: its next call is a clear error, list_models says lost, other models and
    new loads work, and unload clears it."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "victim", **FAST_LOAD})
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "bystander", **FAST_LOAD})
    [pid] = worker_pids("victim")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "lost" in mcp.ok("qloraevolved_list_models")["models"]["victim"]["state"],
             "the killed worker's model to show as lost")
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


def test_streamable_http_transport_on_loopback(tmp_path, http_server):
    """`serve --transport streamable-http` binds 127.0.0.1 by default and serves the same tools."""
    server = http_server("--workspace", str(tmp_path))
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{server.port}" in listening
    with McpSession(server.url) as mcp:
        assert "qloraevolved_list_models" in mcp.tools()
        assert mcp.ok("qloraevolved_list_models") == {"status": "success", "models": {}}
