"""`llm-mcp bench --quick --record` runs end to end (CI proves it works; speed is never asserted in a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HW
from llm_mcp.dev.bench import summarize


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
    # the engine bounds oneDNN's kernel caches (CPU training only); the baseline, a hand-written script, keeps the
    # libraries' defaults
    assert runs["qloraevolved"]["choices"]["cpu_kernel_cache_capacity"] == (None if HW.has_cuda else 64)
    assert runs["baseline"]["choices"]["cpu_kernel_cache_capacity"] == 1024


def test_repeated_rounds_report_medians_and_each_rounds_ratio():
    """--repeats N: a variant's figures are medians over its runs and its ratios come from each round's own
    baseline (the machine drifts between rounds), with their spread; a failed run is left out, not counted as 0."""
    def run(variant, tokens, peak=100.0, loss=2.0):
        return {"variant": variant, "tokens_per_second": tokens, "peak_memory_bytes": peak, "eval_loss": loss,
                "train_runtime": 1.0, "train_loss": loss, "time_to_first_step": 1.0, "choices": {}}

    rounds = [[run("baseline", 100), run("engine", 300)],
              [run("baseline", 50), run("engine", 200, peak=90.0)],  # a slow minute: both slower
              [run("baseline", 90), {"variant": "engine", "error": "killed"}]]
    base, engine = summarize(rounds)
    assert engine["repeats"] == 2 and engine["tokens_per_second"] == 250
    assert engine["x_baseline"]["tokens_per_second"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert engine["x_baseline"]["peak_memory_bytes"]["min"] == 0.9
    assert base["repeats"] == 3 and base["x_baseline"]["tokens_per_second"]["median"] == 1.0


def test_gpu_benchmark_models_have_the_real_models_shapes():
    """The -shape models are Llama 3.2 1B and Llama 3.1 8B with random weights: built on the meta device (no
    memory), their parameter counts are those of the real checkpoints, so GPU throughput and memory are theirs."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_mcp.dev.bench import MODEL_SIZES
    from llm_mcp.dev.tiny import llama_config, make_tokenizer, sized_shape

    tokenizer = make_tokenizer()
    for name, params in (("llama-3.2-1B-shape", 1_235_814_400), ("llama-3.1-8B-shape", 8_030_261_248)):
        shape = sized_shape(**MODEL_SIZES[name])
        assert shape.pop("dtype") == "bfloat16"  # written as real checkpoints are: half the disk and memory
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(llama_config(tokenizer, **shape))
        assert sum(p.numel() for p in model.parameters()) == params, name


def test_record_finds_the_checkout_from_the_working_directory_or_is_told(tmp_path, monkeypatch, capsys):
    """--record appends to the docs/benchmarks.md of the checkout holding the working directory (an installed
    package does not know its source); elsewhere it stops before the run and says to name the file with --docs."""
    from llm_mcp.dev.bench import benchmarks_file, main

    monkeypatch.delenv("LLM_MCP_BENCHMARKS_FILE", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (checkout / "docs" / "benchmarks.md").write_text("# Benchmarks\n")
    (checkout / "src").mkdir()
    monkeypatch.chdir(checkout / "src")
    assert benchmarks_file(None) == (checkout / "docs" / "benchmarks.md").resolve()
    assert benchmarks_file(str(tmp_path / "other.md")) == tmp_path / "other.md"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as stopped:
        main(["--quick", "--record"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--record: no docs/benchmarks.md in" in err and "--docs FILE" in err


def test_the_short_job_is_unlike_the_long_one():
    """--dataset short: prompts of 3-180 words spread log-normally and completions of 1-8 words, with its own
    learning rate carried to both the baseline and the engine (the data file holds the job)."""
    from llm_mcp.dev.bench_data import DATASETS, make_dataset, make_short_dataset

    rows = make_short_dataset(400, 256)
    prompt_words = [len(r["prompt"].split()) for r in rows]
    completion_words = [len(r["completion"].split()) for r in rows]
    assert min(prompt_words) >= 3 and max(prompt_words) <= 180 and max(completion_words) <= 8
    assert sorted(prompt_words)[200] < 40 < max(prompt_words)  # most short, a long tail
    long_rows = make_dataset(400, 256)
    assert sum(len(r["completion"]) for r in rows) < sum(len(r["completion"]) for r in long_rows) / 3
    assert DATASETS["short"][1] == {"learning_rate": 2e-3} and DATASETS["long"][1] == {}
