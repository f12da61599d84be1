"""The GPU check's functional part: QLoRA training on CUDA through the engine, as `*_train` runs it, with
bitsandbytes' CUDA NF4 kernels, flash-attention 2 where installed and Liger's kernels where installed; each run's
loss must fall and its engine choices must be the GPU ones. Writes gpu_check.json and gpu_check.md into --out.

    python3 benchmarks/gpu_check.py --out DIR     (run by benchmarks/gpu_check.sh on the device machine)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_mcp.config import LoadConfig, RunOptions, TrainingConfig
from llm_mcp.dev.bench_data import make_dataset, make_model
from llm_mcp.engine.device import peak_memory_bytes
from llm_mcp.engine.load.model import load_model
from llm_mcp.engine.train.run import train


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def one_run(model_dir: Path, rows: list[dict], work: Path, name: str, **options: object) -> dict:
    bundle = load_model(LoadConfig(model_name=str(model_dir), max_length=512, lora_rank=64))
    config = TrainingConfig(output_dir=str(work / name), max_steps=40, learning_rate=2e-3, batch_size=8,
                            gradient_accumulation_steps=1, logging_steps=5, save_steps=10**6, report_to="none",
                            **options)
    started = time.perf_counter()
    answer = train(bundle, config, rows, None, RunOptions(), on_progress=lambda *a: None,
                   should_stop=lambda: False, notes=[])
    effective = answer["effective_config"]
    four_bit = sum(type(m).__name__ == "Linear4bit" and m.weight.device.type == "cuda"
                   for m in bundle.model.modules())
    return {"run": name, "seconds": round(time.perf_counter() - started, 1), "loss": answer["loss"],
            "loss_fell": answer["loss"]["last"] < answer["loss"]["first"],
            "cuda_4bit_layers": four_bit, "peak_memory_mib": round(peak_memory_bytes() / 2**20),
            "choices": {k: effective[k] for k in ("bf16", "use_cpu", "optim", "attn_implementation", "padding_free",
                                                  "use_liger_kernel", "use_gradient_checkpointing", "lean_mlp")},
            "warnings": answer["warnings"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-25M")
    args = parser.parse_args()
    out = Path(args.out)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check is for the device machine", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = make_model(work, args.model)
    rows = make_dataset(320, 512)
    facts = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
             **{name: _version(name) for name in ("transformers", "peft", "trl", "bitsandbytes", "flash-attn",
                                                  "liger-kernel")}}
    runs = [one_run(model_dir, rows, work, "defaults")]
    if importlib.util.find_spec("liger_kernel"):
        runs.append(one_run(model_dir, rows, work, "liger_kernel=false", liger_kernel=False))
    runs.append(one_run(model_dir, rows, work, "use_flash_attention_2=false", use_flash_attention_2=False))
    ok = all(r["loss_fell"] and r["cuda_4bit_layers"] > 0 and r["choices"]["use_cpu"] is False for r in runs)
    (out / "gpu_check.json").write_text(json.dumps({"facts": facts, "runs": runs, "ok": ok}, indent=2))
    lines = [f"GPU check on {facts['gpu']} (torch {facts['torch']}, transformers {facts['transformers']}, peft "
             f"{facts['peft']}, trl {facts['trl']}, bitsandbytes {facts['bitsandbytes']}, flash-attn "
             f"{facts['flash-attn']}, liger-kernel {facts['liger-kernel']}); model {args.model}, NF4 + LoRA r=64, "
             "40 steps of batch 8 at max_length 512.", "",
             "| run | seconds | loss first -> last | peak MiB | CUDA 4-bit layers | choices |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        choices = ", ".join(f"{k}={v}" for k, v in r["choices"].items())
        lines.append(f"| {r['run']} | {r['seconds']} | {r['loss']['first']:.3f} -> {r['loss']['last']:.3f} | "
                     f"{r['peak_memory_mib']} | {r['cuda_4bit_layers']} | {choices} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
