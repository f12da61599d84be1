"""How close is estimate_memory to the measured peak? Train a few steps and compare.

For the built-in tiny model, a ~30M-parameter random Llama and one with Llama 3's 128k vocabulary (where the LM
head's logits would dominate if they were materialized), per quant_type and gradient checkpointing,
estimate with the estimate_memory tool, then load and train 4 steps through the same server on rows long
enough to fill max_length, and compare with the worker's measured peak (RSS on CPU, max allocated on CUDA).

    .venv/bin/python benchmarks/memory_estimate.py [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

from mcp import Client

from llm_mcp.dev.bench_records import benchmarks_file, record

MIB = 1024 * 1024


async def run(work: Path) -> list[dict]:
    from llm_mcp.config import ServerConfig
    from llm_mcp.server.app import create_server
    from llm_mcp.dev.tiny import make_tiny_model

    words = "the model learns from long examples of text that fill the context window quickly".split()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(600))} for _ in range(16)]
    # a ~30M-parameter Llama with the tiny tokenizer's vocabulary padded to 8192, and a smaller one with Llama 3's
    cases = [(make_tiny_model(work / "tiny"), 128),
             (make_tiny_model(work / "small-llama", hidden=512, layers=8, heads=8, intermediate=1408, vocab=8192,
                              initializer_range=0.05), 512),
             (make_tiny_model(work / "vocab-128k-llama", hidden=256, layers=4, heads=4, intermediate=704,
                              vocab=128256, initializer_range=0.05), 512)]
    results = []
    async with Client(create_server(ServerConfig(workspace=str(work)))) as client:
        for model_dir, max_length in cases:
            for quant_type, checkpointing in (("nf4", True), ("nf4", False), ("none", False)):
                settings = {"quant_type": quant_type, "compute_dtype": "float32", "lora_rank": 16,
                            "max_length": max_length}
                train = {"batch_size": 4, "use_gradient_checkpointing": checkpointing, "optim": "adamw_torch"}
                estimate = (await client.call_tool("estimate_memory", {
                    "model_name": str(model_dir), **settings, **train})).structured_content
                model_id = f"{model_dir.name}-{quant_type}-{int(checkpointing)}"
                await client.call_tool("qloraevolved_load_model", {"model_name": str(model_dir), "model_id": model_id,
                                                                   **settings})
                answer = await client.call_tool("qloraevolved_train", {
                    "model_id": model_id, "train_dataset": rows, "wait_seconds": -1,
                    "training_config": {**train, "max_steps": 4, "gradient_accumulation_steps": 1,
                                        "report_to": "none", "output_dir": f"out-{model_id}", "save_steps": 1000,
                                        "auto_gradient_checkpointing": False}})  # checkpointing as asked
                measured = answer.structured_content["peak_memory_bytes"]
                await client.call_tool("qloraevolved_unload_model", {"model_id": model_id})
                ran = answer.structured_content["effective_config"]["use_gradient_checkpointing"]
                results.append({"model": model_dir.name, "quant_type": quant_type, "checkpointing": ran,
                                "max_length": max_length, "estimate": estimate["total_bytes"], "measured": measured,
                                "device": estimate["device"]})
    return results


def table(results: list[dict]) -> str:
    rows = ["| model | quant | grad ckpt | batch x max_length | estimate MiB | measured peak MiB | error |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        error = (r["estimate"] - r["measured"]) / r["measured"]
        rows.append(f"| {r['model']} | {r['quant_type']} | {r['checkpointing']} | 4 x {r['max_length']} | "
                    f"{r['estimate'] / MIB:.0f} | {r['measured'] / MIB:.0f} | {error:+.0%} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(Path(tempfile.mkdtemp(prefix="llm-mcp-mem-"))))
    text = table(results)
    print(text)
    if args.record:
        record(benchmarks_file(None), "estimate_memory against measured peaks",
               f"Command: `.venv/bin/python benchmarks/memory_estimate.py --record`; device {results[0]['device']} "
               f"(peak = the worker's resident high-water mark during training, so the ~0.6 GB runtime of torch + "
               f"transformers + peft + trl is in both columns); compute float32, LoRA r=16, adamw_torch, 4 training steps on rows that fill "
               f"max_length.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
