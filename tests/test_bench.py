"""`llm-mcp bench --quick` runs end to end (CI proves it works; speed is never asserted in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_runs_every_variant(tmp_path):
    """The quick benchmark runs the baseline and qloraevolved (and unsloth where its environment exists) on the
    same job and reports tokens/s, peak memory, first-step time and losses for each."""
    out = tmp_path / "bench.json"
    exe = Path(sys.executable).with_name("llm-mcp")
    done = subprocess.run([str(exe), "bench", "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads(out.read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert {"baseline", "qloraevolved"} <= set(runs)
    for run in runs.values():
        assert "error" not in run, run
        assert run["tokens_per_second"] > 0 and run["peak_memory_bytes"] > 0 and run["eval_loss"] > 0
    assert runs["qloraevolved"]["choices"]["use_gradient_checkpointing"] is False and runs["baseline"]["choices"]["packing"] is False
