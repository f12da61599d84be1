"""Does torch_compile=true pay on this machine? Steady-state seconds for the same 8 training steps (NF4 + LoRA r=64,
lean dropout, float32, fused AdamW, batch 8 at lengths a length-grouped epoch sees), eager and with each decoder
layer compiled, plus the one-off compile time.

    .venv/bin/python benchmarks/compile_step.py [--model llama-3.5M] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from llm_mcp.dev.bench_data import MODEL_SIZES, make_model
from llm_mcp.dev.bench_records import benchmarks_file, record

LENGTHS = [434, 420, 300, 200, 120, 80, 434, 300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.5M", choices=[m for m, s in MODEL_SIZES.items() if s])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import torch

    from llm_mcp.config import LoadConfig
    from llm_mcp.engine.patches.lean_lora import lean_lora_dropout
    from llm_mcp.engine.load.model import load_model
    from llm_mcp.engine.patches.regional_compile import compiled_layers

    model_dir = make_model(Path(tempfile.mkdtemp()), args.model)
    model = load_model(LoadConfig(model_name=str(model_dir), max_length=512, lora_rank=64,
                                  compute_dtype="float32")).model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)

    def step(length: int) -> None:
        ids = torch.randint(5, 500, (8, length))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def steps() -> float:
        started = time.perf_counter()
        for length in LENGTHS:
            step(length)
        return time.perf_counter() - started

    with lean_lora_dropout(model):
        step(100)  # warm-up
        eager = steps()
        with compiled_layers(model):
            started = time.perf_counter()
            step(LENGTHS[0])
            compile_s = time.perf_counter() - started
            compiled = steps()
    table = ("| model | eager s (8 steps) | compiled s (8 steps) | speed-up | compile s (first step) |\n"
             "| --- | --- | --- | --- | --- |\n"
             f"| {args.model} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f} | {compile_s:.1f} |")
    print(table)
    if args.record:
        record(benchmarks_file(None), "torch_compile=true, steady state",
               f"Command: `.venv/bin/python benchmarks/compile_step.py --model {args.model} --record`; CPU, "
               f"{torch.get_num_threads()} threads.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
