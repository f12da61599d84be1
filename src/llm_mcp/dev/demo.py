"""`llm-mcp demo`: the whole flow as a user's agent runs it, through a real MCP client over stdio.

Starts `llm-mcp serve` as a subprocess, builds the built-in tiny model and dataset, then load -> inspect_dataset ->
prepare -> train (live progress) -> generate (before/after) -> export (GGUF) -> list -> unload. With `--model NAME`
the same flow runs on a real model (real_models.py, fetched once into a cache folder), teaching it invented facts
as chat rows. Output is for a person: print.
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

from llm_mcp.dev.real_models import FACTS, MODELS, default_cache, fact_rows, fetch_model, is_fetched
from llm_mcp.dev.tiny import demo_records, make_tiny_model

DEMO_TRAINING = {"learning_rate": 3e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.0,
                 "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "logging_steps": 5, "save_steps": 30,
                 "use_gradient_checkpointing": False, "output_dir": "demo_output"}


REAL_LOAD = {"quant_type": "nf4", "compute_dtype": "float32", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
             "max_length": 256}
# batch 5 = the five facts; ~10 steps memorise them (see tests/test_real_models.py)
REAL_TRAINING = {**DEMO_TRAINING, "learning_rate": 3e-3, "batch_size": 5, "logging_steps": 1, "save_steps": 1000,
                 "output_dir": "demo_output"}


def _server_command(workdir: Path, allow_read: Path | None = None) -> StdioServerParameters:
    exe = shutil.which("llm-mcp")
    args = ["serve", "--workspace", str(workdir), *(["--allow-read", str(allow_read)] if allow_read else [])]
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


async def _flow(workdir: Path, model_dir: Path, steps: int) -> None:
    async with Client(_server_command(workdir)) as client:
        tools = await client.list_tools()
        print(f"connected to llm-mcp serve over stdio: {len(tools.tools)} tools")
        loaded = await _call(client, "qloraevolved_load_model", {
            "model_name": str(model_dir), "model_id": "tiny-demo", "compute_dtype": "float32", "lora_rank": 16,
            "lora_alpha": 32, "lora_dropout": 0.0, "max_length": 128})
        _show("qloraevolved_load_model", loaded, ["model_id", "trainable_params", "total_params", "device"])
        inspected = await _call(client, "inspect_dataset", {"dataset": demo_records(), "model_id": "tiny-demo"})
        _show("inspect_dataset", inspected, ["format", "rows", "length_tokens", "truncated_rows", "problems"])
        print(f"   as trained: {inspected['examples'][0]!r}")
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

        print("\n== qloraevolved_generate (greedy) with the base model -> with the trained adapter")
        for row in demo_records()[:3]:
            before, after = [(await _call(client, "qloraevolved_generate", {
                "model_id": "tiny-demo", "prompt": row["prompt"], "max_new_tokens": 16, "use_adapter": use}))["text"]
                for use in (False, True)]
            mark = "learned" if after.strip() == row["completion"].strip() else "not yet"
            print(f"   Q: {row['prompt']}\n      before: {before.strip()!r}\n      after:  {after.strip()!r}   [{mark}]")

        exported = await _call(client, "qloraevolved_export", {
            "model_id": "tiny-demo", "format": "gguf", "gguf_quantization": "q8_0", "output_dir": "demo_export",
            "overwrite": True, "probe_prompt": demo_records()[0]["prompt"]})
        _show("qloraevolved_export (gguf)", exported, ["adapter_dir", "merged_dir", "gguf_file", "modelfile"])
        print(f"   merged model reloaded with transformers, same greedy answer: "
              f"{exported['verified_merged']['greedy_matches_adapter_model']}; GGUF read back: "
              f"{exported['verified']['architecture']}, {exported['verified']['tensor_count']} tensors")
        ran = exported.get("verified_llama_cpp") or {}
        if ran.get("ran"):
            print(f"   llama.cpp ran the GGUF: {ran.get('answer', '')!r} (same greedy tokens as the merged model: "
                  f"{ran.get('greedy_matches_merged_model')})")

        listed = await _call(client, "qloraevolved_list_models", {})
        print(f"\n== qloraevolved_list_models\n   {json.dumps({k: v['device'] for k, v in listed['models'].items()})}")
        unloaded = await _call(client, "qloraevolved_unload_model", {"model_id": "tiny-demo"})
        print(f"\n== qloraevolved_unload_model\n   {unloaded['message']}")


async def _real_flow(workdir: Path, model_dir: Path, steps: int) -> None:
    async with Client(_server_command(workdir, allow_read=model_dir)) as client:
        loaded = await _call(client, "qloraevolved_load_model", {"model_name": str(model_dir), "model_id": "real-demo",
                                                                 **REAL_LOAD})
        _show("qloraevolved_load_model", loaded, ["model_id", "trainable_params", "total_params", "device"])
        inspected = await _call(client, "inspect_dataset", {"dataset": fact_rows(), "model_id": "real-demo"})
        _show("inspect_dataset", inspected, ["format", "rows", "length_tokens", "problems"])

        async def ask(question: str, use_adapter: bool) -> dict[str, Any]:
            return await _call(client, "qloraevolved_generate", {
                "model_id": "real-demo", "messages": [{"role": "user", "content": question}], "max_new_tokens": 24,
                "use_adapter": use_adapter})

        prepared = await _call(client, "qloraevolved_prepare_for_training",
                               {"model_id": "real-demo", "max_steps": steps, **REAL_TRAINING})
        _show("qloraevolved_prepare_for_training", prepared, ["message"])
        print("\n== qloraevolved_train on invented facts (progress notifications as they arrive)")

        async def progress(step: float, total: float | None, message: str | None) -> None:
            print(f"   {message}", flush=True)

        trained = await _call(client, "qloraevolved_train", {
            "model_id": "real-demo", "train_dataset": fact_rows(), "overwrite_output_dir": True, "wait_seconds": -1},
            progress_callback=progress)
        _show("qloraevolved_train result", trained, ["status", "output_dir", "loss"])
        print("\n== qloraevolved_generate (chat, greedy) without -> with the trained adapter")
        for question, answer in FACTS:
            before, after = await ask(question, False), await ask(question, True)
            mark = "learned" if after["text"].strip() == answer else "not yet"
            print(f"   Q: {question}\n      before: {before['text'].strip()!r}\n      after:  "
                  f"{after['text'].strip()!r} (finish: {after['finish_reason']})   [{mark}]")
        exported = await _call(client, "qloraevolved_export", {
            "model_id": "real-demo", "format": "gguf", "gguf_quantization": "q8_0", "output_dir": "demo_export",
            "overwrite": True, "probe_prompt": FACTS[0][0]})
        _show("qloraevolved_export (gguf)", exported, ["gguf_file", "modelfile", "verified_merged", "verified"])
        unloaded = await _call(client, "qloraevolved_unload_model", {"model_id": "real-demo"})
        print(f"\n== qloraevolved_unload_model\n   {unloaded['message']}")


def _real_model_dir(model: str, model_cache: str | None) -> Path:
    folder = (Path(model_cache).expanduser() if model_cache else default_cache()).resolve() / model
    if not is_fetched(folder):
        print(f"fetching {model} ({MODELS[model].about}) into {folder} ...", flush=True)
        fetch_model(model, folder)
    return folder


def run_demo(workdir: str | None = None, *, steps: int | None = None, model: str = "tiny",
             model_cache: str | None = None) -> int:
    start = time.monotonic()
    root = Path(workdir or tempfile.mkdtemp(prefix="llm-mcp-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if model != "tiny":
        model_dir = _real_model_dir(model, model_cache)
        print(f"real model {model} at {model_dir}")
        asyncio.run(_real_flow(root, model_dir, steps or 12))
        print(f"\ndone in {time.monotonic() - start:.0f} s; outputs in {root}")
        return 0
    model_dir = make_tiny_model(root / "tiny-llama")
    print(f"built the tiny model at {model_dir}")
    asyncio.run(_flow(root, model_dir, steps or 60))
    print(f"\ndone in {time.monotonic() - start:.0f} s; outputs in {root}")
    return 0
