"""`llm-mcp serve` as a subprocess over stdio, driven by the MCP SDK's client and by MCP Inspector's CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import StdioServerParameters

from conftest import FAST_LOAD, FAST_TRAIN, McpSession

EXE = Path(sys.executable).with_name("llm-mcp")


def test_stdio_server_runs_the_flow(tiny_model, tmp_path, demo_rows):
    """Over stdio: list tools, load, train a few steps with progress, list, unload; stdout stays pure JSON-RPC
    (a single stray print from a worker or library would break this session)."""
    params = StdioServerParameters(command=str(EXE), args=["serve", "--workspace", str(tmp_path),
                                                                "--allow-read", str(tiny_model.parent)])
    with McpSession(params) as mcp:
        assert "qloraevolved_train" in mcp.tools()
        mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "stdio", **FAST_LOAD})
        progress: list = []
        answer = mcp.ok("qloraevolved_train", {"model_id": "stdio", "train_dataset": demo_rows, "wait_seconds": -1,
                                               "training_config": {**FAST_TRAIN, "max_steps": 4, "logging_steps": 1,
                                                                   "output_dir": "out"}}, progress=progress)
        assert answer["status"] == "success" and answer["global_step"] == 4
        assert progress and progress[-1][0] == 4
        assert list(mcp.ok("qloraevolved_list_models")["models"]) == ["stdio"]
        mcp.ok("qloraevolved_unload_model", {"model_id": "stdio"})
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / ".llm-mcp" / "logs" / "stdio.log").is_file()  # the worker's output went to its log


def _inspector() -> list[str]:
    npx = shutil.which("npx")
    if npx is None:
        if os.environ.get("LLM_MCP_REQUIRE_INSPECTOR"):
            pytest.fail("npx is required for the MCP Inspector smoke test in CI")
        pytest.skip("npx not installed")
    return [npx, "-y", "@modelcontextprotocol/inspector@2.12.0", "--cli", str(EXE), "serve"]


def _run_inspector(args: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "HOME": str(tmp_path)}  # the inspector writes ~/.mcp-inspector
    env["npm_config_cache"] = os.environ.get("npm_config_cache", str(Path.home() / ".npm"))
    out = subprocess.run(_inspector() + args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_mcp_inspector_lists_tools_and_calls_list_models(tmp_path):
    """A third-party client (MCP Inspector's CLI) lists the tools and calls qloraevolved_list_models."""
    listed = _run_inspector(["--method", "tools/list"], tmp_path)
    assert {"qloraevolved_load_model", "qloraevolved_train"} <= {t["name"] for t in listed["tools"]}
    called = _run_inspector(["--method", "tools/call", "--tool-name", "qloraevolved_list_models"], tmp_path)
    assert called["isError"] is False and called["structuredContent"] == {"status": "success", "models": {}}


def test_mcp_inspector_strict_finds_no_schema_problem(tmp_path):
    """The Inspector's --strict portability check of every tool's input and output schema: no error, no warning."""
    env = {**os.environ, "HOME": str(tmp_path)}
    env["npm_config_cache"] = os.environ.get("npm_config_cache", str(Path.home() / ".npm"))
    out = subprocess.run(_inspector() + ["--strict", "--method", "tools/list"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    problems = [line for line in out.stderr.splitlines() if line.startswith(("Warning:", "Error:"))]
    assert out.returncode == 0 and not problems, out.stderr[-3000:]
    assert {"qloraevolved_train", "unsloth_train"} <= {t["name"] for t in json.loads(out.stdout)["tools"]}
