"""Text generation: with a loaded model (the *_generate tools, with or without its adapter), and greedy answers
from a base model plus a saved LoRA adapter loaded exactly as a user would (peft.PeftModel.from_pretrained), which
the demo, the tests and export verification use to check what a run learned."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from llm_mcp.config import GenerationConfig
from llm_mcp.engine.device import detect, torch_dtype
from llm_mcp.engine.load.model import avoid_cpu_repack_bug
from llm_mcp.engine.patches.float32_compute import bf16_slowdown, float32_compute, is_emulated
from llm_mcp.engine.patches.float_weights import fits, float_weights
from llm_mcp.engine.patches.guard import may_apply


def generate(bundle: Any, config: GenerationConfig) -> dict[str, Any]:
    """Answer a prompt or a chat with the loaded model; use_adapter=false answers with the base model alone."""
    tokenizer, model = bundle.tokenizer, bundle.model
    if config.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in config.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes BOS itself where the model wants one
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(config.prompt, return_tensors="pt").input_ids
    ids = ids.to(_input_device(model))
    sampling = config.temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": sampling,
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids(tokenizer, model),
                              "use_cache": True}
    if sampling:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
        torch.manual_seed(config.seed)
    without_adapter = (model.disable_adapter() if not config.use_adapter and hasattr(model, "disable_adapter")
                       else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        # float32 where this CPU emulates bf16 (its emulated bf16 matmuls are far slower), as the engine trains
        fast = float32_compute(model) if bundle.engine == "transformers" and is_emulated(bf16_slowdown(model)) \
            and may_apply("float32_compute", ran="generated") else contextlib.nullcontext()
        with torch.no_grad(), without_adapter, fast, _float_copies(bundle):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    new = out[0, ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in kwargs["eos_token_id"]
    seconds = time.perf_counter() - started
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "finish_reason": "eos" if stopped else "length",
        "prompt_tokens": int(ids.shape[1]),
        "completion_tokens": len(new),
        "tokens_per_second": round(len(new) / seconds, 2) if seconds > 0 else None,
        "used_adapter": bool(config.use_adapter and hasattr(model, "disable_adapter")),
        "sampling": {"temperature": config.temperature, "top_p": config.top_p, "seed": config.seed}
        if sampling else "greedy",
    }


def _float_copies(bundle: Any) -> Any:
    """On CPU, the transformers engine's 4-bit layers multiply with float copies of their weights, dequantized once
    for the call rather than once per generated token, where the copies fit in free memory. (On CUDA, bitsandbytes
    has a kernel for one-token 4-bit matmuls.)"""
    from llm_mcp import memory

    # Unsloth's engine runs its own fused LoRA and dequantization paths, which the copies would not reach
    if bundle.engine != "transformers" or detect().has_cuda or not fits(bundle.model, memory.free_memory("cpu")) \
            or not may_apply("float_weights", ran="generated"):
        return contextlib.nullcontext()
    return float_weights(bundle.model)


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS of the tokenizer and of the generation config (chat models often end turns with another token)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _input_device(model: Any) -> torch.device:
    return next(p.device for p in model.parameters())


def load_base_nf4(base_dir: str | Path, *, compute_dtype: str = "float32") -> Any:
    """The base model in NF4 (double quantization), as the qloraevolved and unsloth defaults train it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    avoid_cpu_repack_bug(model)
    return model


def with_adapter(base: Any, adapter_dir: str | Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 12) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def count_reproduced(adapter_dir: str | Path, base_dir: str | Path, rows: list[dict[str, str]], *,
                     compute_dtype: str = "float32") -> int:
    """How many {prompt, completion} rows the base + adapter answer exactly, greedily."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = with_adapter(load_base_nf4(base_dir, compute_dtype=compute_dtype), adapter_dir)
    return sum(greedy_answer(model, tokenizer, r["prompt"]) == r["completion"].strip() for r in rows)
