"""`llm-mcp bench --generate`: tokens/s of generation through the engine (what `*_generate` runs: NF4 + LoRA, as
loaded by `qloraevolved_load_model`) against plain transformers `generate` on the same base weights unquantized,
and against llama.cpp on a GGUF of them (where llama-cpp-python is installed).

Every variant generates the same number of greedy tokens from the same prompt (the engine's own answer sets the
count: it stops at EOS), best of three timed runs after a warm-up, in this one process, one after the other.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"
ROUNDS = 3


def _best(run: Any) -> float:
    """The shortest of ROUNDS timed runs of `run()`, after one untimed warm-up."""
    run()
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _engine(model_dir: Path, tokens: int) -> tuple[int, float]:
    from llm_mcp.config import GenerationConfig, LoadConfig
    from llm_mcp.engine.infer.generate import generate
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(model_dir), max_length=512))
    config = GenerationConfig(prompt=PROMPT, max_new_tokens=tokens)
    count = generate(bundle, config)["completion_tokens"]
    seconds = _best(lambda: generate(bundle, config))
    return count, seconds


def _transformers(model_dir: Path, tokens: int, dtype_name: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    return _best(run)


def _llama_cpp(model_dir: Path, tokens: int, work: Path) -> float | None:
    from llm_mcp.engine.export.gguf import export_gguf
    from llm_mcp.engine.export.gguf_run import llama_cpp_or_none

    llama_cpp = llama_cpp_or_none()
    if llama_cpp is None:
        return None
    gguf_file = export_gguf(model_dir, work / "gguf", "f16", run=False)["gguf_file"]
    llm = llama_cpp.Llama(model_path=gguf_file, n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def run() -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0)):  # never stops by itself
            if i + 1 >= tokens:
                break

    return _best(run)


def run_generate_bench(model_dirs: list[Path], tokens: int) -> list[dict[str, Any]]:
    """One row per model: tokens/s of the engine, plain transformers (float32 and bfloat16) and llama.cpp (f16)."""
    rows = []
    for model_dir in model_dirs:
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as work:
            count, engine_s = _engine(model_dir, tokens)
            row: dict[str, Any] = {"model": model_dir.name, "tokens": count, "engine_nf4_lora": count / engine_s}
            for dtype in ("float32", "bfloat16"):
                row[f"transformers_{dtype}"] = count / _transformers(model_dir, count, dtype)
            llama_s = _llama_cpp(model_dir, count, Path(work))
            row["llama_cpp_f16"] = None if llama_s is None else count / llama_s
        rows.append(row)
        print(table([row]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: float | None, base: float) -> str:
        return "-" if value is None else f"{value:.2f} ({value / base:.2f}x)"

    out = ["| model | tokens | engine (NF4 + LoRA) tokens/s | transformers float32 | transformers bfloat16 | "
           "llama.cpp f16 |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = r["transformers_float32"]
        out.append(f"| {r['model']} | {r['tokens']} | {cell(r['engine_nf4_lora'], base)} | "
                   f"{cell(r['transformers_float32'], base)} | {cell(r['transformers_bfloat16'], base)} | "
                   f"{cell(r['llama_cpp_f16'], base)} |")
    return "\n".join(out)
