"""`llm-mcp demo`: the whole flow as a user's agent runs it, through a real MCP client over stdio.

Starts `llm-mcp serve` as a subprocess, builds the built-in tiny model and dataset, then load -> prepare ->
train (live progress) -> list -> unload, and shows answers the model learned. Output is for a person: print.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from llm_mcp.tiny import demo_records, make_tiny_model

DEMO_TRAINING = {"learning_rate": 3e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.0,
                 "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "logging_steps": 5, "save_steps": 30,
                 "use_gradient_checkpointing": False, "output_dir": "demo_output"}


def _server_command(workdir: Path) -> StdioServerParameters:
    exe = shutil.which("llm-mcp")
    args = ["serve", "--workspace", str(workdir)]
    if exe is None:  # not on PATH (e.g. run with python -m): same entry point through the interpreter
        exe, args = sys.executable, ["-m", "llm_mcp.cli", *args]
    return StdioServerParameters(command=exe, args=args)


async def _call(client: Client, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    result = await client.call_tool(name, args, **kw)
    if result.is_error:
        raise SystemExit(f"{name} failed: {' '.join(getattr(c, 'text', '') for c in result.content)}")
    return result.structured_content


def _show(title: str, answer: dict[str, Any], keys: list[str]) -> None:
    print(f"\n== {title}")
    for key in keys:
        if key in answer:
            print(f"   {key}: {json.dumps(answer[key])}")
    for warning in answer.get("warnings", []):
        print(f"   warning: {warning}")


async def _flow(workdir: Path, model_dir: Path, steps: int) -> Path:
    async with Client(_server_command(workdir)) as client:
        tools = await client.list_tools()
        print(f"connected to llm-mcp serve over stdio: {len(tools.tools)} tools")
        loaded = await _call(client, "qloraevolved_load_model", {
            "model_name": str(model_dir), "model_id": "tiny-demo", "compute_dtype": "float32", "lora_rank": 16,
            "lora_alpha": 32, "lora_dropout": 0.0, "max_length": 128})
        _show("qloraevolved_load_model", loaded, ["model_id", "trainable_params", "total_params", "device"])
        prepared = await _call(client, "qloraevolved_prepare_for_training",
                               {"model_id": "tiny-demo", "max_steps": steps, **DEMO_TRAINING})
        _show("qloraevolved_prepare_for_training", prepared, ["message"])

        print("\n== qloraevolved_train (progress notifications as they arrive)")

        async def progress(step: float, total: float | None, message: str | None) -> None:
            print(f"   {message}", flush=True)

        trained = await _call(client, "qloraevolved_train", {
            "model_id": "tiny-demo", "train_dataset": demo_records(), "eval_dataset": demo_records()[:8],
            "overwrite_output_dir": True, "wait_seconds": -1}, progress_callback=progress)
        _show("qloraevolved_train result", trained, ["status", "metrics", "output_dir", "loss"])
        print(f"   loss before -> after: {trained['loss']['first']:.3f} -> {trained['loss']['last']:.3f}")

        listed = await _call(client, "qloraevolved_list_models", {})
        print(f"\n== qloraevolved_list_models\n   {json.dumps({k: v['device'] for k, v in listed['models'].items()})}")
        unloaded = await _call(client, "qloraevolved_unload_model", {"model_id": "tiny-demo"})
        print(f"\n== qloraevolved_unload_model\n   {unloaded['message']}")
        return workdir / trained["output_dir"]


def _learned_answers(model_dir: Path, adapter_dir: Path, n: int = 3) -> None:
    """Greedy answers of the base model and of base + trained adapter (loaded with plain peft)."""
    from transformers import AutoTokenizer

    from llm_mcp.engine.generate import greedy_answer, load_base_nf4, with_adapter

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = load_base_nf4(model_dir)
    rows = demo_records()[:n]
    before = [greedy_answer(base, tokenizer, r["prompt"]) for r in rows]
    tuned = with_adapter(base, adapter_dir)
    print("\n== answers (greedy) before -> after fine-tuning")
    for row, old in zip(rows, before):
        new = greedy_answer(tuned, tokenizer, row["prompt"])
        mark = "learned" if new == row["completion"].strip() else "not yet"
        print(f"   Q: {row['prompt']}\n      before: {old!r}\n      after:  {new!r}   [{mark}]")


def run_demo(workdir: str | None = None, *, steps: int = 60) -> int:
    start = time.monotonic()
    root = Path(workdir or tempfile.mkdtemp(prefix="llm-mcp-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(root / "tiny-llama")
    print(f"built the tiny model at {model_dir}")
    adapter_dir = asyncio.run(_flow(root, model_dir, steps))
    _learned_answers(model_dir, adapter_dir)
    print(f"\ndone in {time.monotonic() - start:.0f} s; outputs in {root}")
    return 0
