"""Where the time of one training step goes: torch.profiler over forward + backward + optimizer step, for the
baseline recipe (bf16 autocast, gradient checkpointing, random batches) and our engine's CPU defaults (float32,
no checkpointing, length-grouped batches, lean LoRA dropout, MLP and RMSNorm), adapters in bf16 as TRL keeps them, on the
same NF4 + LoRA r=64 model and the bench's long-tailed data.

    .venv/bin/python benchmarks/profile_step.py [--model llama-3.5M] [--max-length 512] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

from llm_mcp.dev.bench_records import benchmarks_file, record

CATEGORIES = {  # aten op name fragments -> what they are, for a readable summary
    "dropout masks": ("bernoulli", "uniform", "dropout"),
    "attention": ("scaled_dot_product", "_efficient_attention", "_flash_attention", "softmax", "bmm", "baddbmm"),
    "4-bit dequantize": ("dequantize", "bitsandbytes", "bnb", "gemv_4bit"),
    "matmul (linear)": ("addmm", "aten::mm", "matmul", "linear"),
    "optimizer": ("adam", "_foreach", "_fused"),
    "norm/activation": ("rsqrt", "pow", "mean", "silu", "mul", "add", "neg", "cat"),
    "copy/cast": ("copy_", "to", "_to_copy", "contiguous", "clone"),
}


def batch(tokenizer, rows: list[dict], max_length: int):
    import torch

    ids = [tokenizer(r["prompt"] + r["completion"], truncation=True, max_length=max_length).input_ids for r in rows]
    longest = max(map(len, ids))
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def profile(variant: str, model_dir: Path, rows: list[dict], max_length: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from llm_mcp.config import LoadConfig
    from llm_mcp.engine.patches.lean_lora import lean_lora_dropout
    from llm_mcp.engine.patches.lean_mlp import lean_mlp
    from llm_mcp.engine.patches.lean_norm import lean_rmsnorm
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(model_dir), max_length=max_length, lora_rank=64,
                                   compute_dtype="bfloat16"))
    model = bundle.model
    model.train()
    baseline = variant == "baseline"
    if baseline:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        picked = random.Random(0).sample(rows, 8)  # a random batch, as the baseline's sampler draws
    else:  # length-grouped: a batch of neighbours in length
        ordered = sorted(rows, key=lambda r: len(r["prompt"] + r["completion"]))
        start = random.Random(0).randrange(0, len(ordered) - 8)
        picked = ordered[start:start + 8]
    inputs = batch(bundle.tokenizer, picked, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # as TRL's SFTTrainer keeps the adapters of a quantized model
        param.data = param.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=not baseline)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if baseline else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with contextlib.ExitStack() as engine:
        if not baseline:
            engine.enter_context(lean_mlp(model))
            engine.enter_context(lean_rmsnorm(model))
            engine.enter_context(lean_lora_dropout(model))
        step()  # warm-up
        started = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        seconds = time.perf_counter() - started
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, frags in CATEGORIES.items() if any(f in name for f in frags)), "other")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    real_tokens = int(inputs["attention_mask"].sum())
    return {"variant": variant, "step_s": seconds, "batch_shape": list(inputs["input_ids"].shape),
            "real_tokens": real_tokens, "by_kind_s": totals,
            "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in
                        sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.5M")
    parser.add_argument("--max-length", type=int, default=None, help="default 512, 256 with --dataset short")
    parser.add_argument("--dataset", choices=["long", "short"], default="long",
                        help="the rows of llm-mcp bench --dataset (short: prompts of 3-180 words, 1-8 word answers)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from llm_mcp.dev.bench_data import DATASETS, make_model

    make_rows, _, dataset_rows, lengths, _ = DATASETS[args.dataset]
    args.max_length = args.max_length or lengths[-1]

    model_dir = make_model(Path(tempfile.mkdtemp(prefix="llm-mcp-profile-")), args.model)
    rows = make_rows(dataset_rows, args.max_length)
    results = [profile(v, model_dir, rows, args.max_length) for v in ("baseline", "qloraevolved")]
    kinds = sorted({k for r in results for k in r["by_kind_s"]}, key=lambda k: -results[0]["by_kind_s"].get(k, 0))
    lines = ["| variant | step s | batch (rows x length) | real tokens | " + " | ".join(kinds) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['step_s']:.2f} | {r['batch_shape'][0]} x {r['batch_shape'][1]} | "
                     f"{r['real_tokens']} | " + " | ".join(f"{r['by_kind_s'].get(k, 0):.2f}" for k in kinds) + " |")
    table = "\n".join(lines)
    print(table)
    for r in results:
        print(f"\n{r['variant']} top ops (self CPU s):", r["top_ops"])
    if args.record:
        tops = "\n".join(f"- {r['variant']} top ops: " + ", ".join(f"`{k}` {v} s" for k, v in r["top_ops"])
                         for r in results)
        record(benchmarks_file(None), "Profile of one training step",
               f"Command: `.venv/bin/python benchmarks/profile_step.py --model {args.model} --max-length "
               f"{args.max_length} --dataset {args.dataset} --record`; CPU, 2 cores; NF4 + LoRA r=64, batch 8; seconds of self CPU time by "
               f"kind of op (torch.profiler; the profiler's own overhead included).\n\n{table}\n\n{tops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
