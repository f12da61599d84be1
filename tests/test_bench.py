"""`llm-mcp bench --quick --record` runs end to end (CI proves it works; speed is never asserted in a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_bench_quick_runs_every_variant(tmp_path):
    """The quick benchmark runs the baseline and qloraevolved (and unsloth where its environment exists) on the
    same job and reports tokens/s, peak memory, first-step time and losses for each."""
    out, recorded = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    exe = Path(sys.executable).with_name("llm-mcp")
    done = subprocess.run([str(exe), "bench", "--quick", "--record", "--json", str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "LLM_MCP_BENCHMARKS_FILE": str(recorded)})
    assert done.returncode == 0, done.stderr[-2000:]
    section = recorded.read_text()  # --record appends the table with its exact command
    assert section.startswith("\n## llm-mcp bench (") and "Command: `llm-mcp bench --quick --record`" in section
    assert "| tiny-0.3M | 128 | baseline |" in section
    [result] = json.loads(out.read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert {"baseline", "qloraevolved"} <= set(runs)
    for run in runs.values():
        assert "error" not in run, run
        assert run["tokens_per_second"] > 0 and run["peak_memory_bytes"] > 0 and run["eval_loss"] > 0
    assert runs["qloraevolved"]["choices"]["use_gradient_checkpointing"] is False and runs["baseline"]["choices"]["packing"] is False
    # the engine bounds oneDNN's kernel caches; the baseline, a hand-written script, keeps the libraries' defaults
    assert runs["qloraevolved"]["choices"]["cpu_kernel_cache_capacity"] == 64
    assert runs["baseline"]["choices"]["cpu_kernel_cache_capacity"] == 1024
