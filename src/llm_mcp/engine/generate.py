"""Greedy generation from a base model with a saved LoRA adapter: used by the demo and the tests to check what a
run learned, loading the adapter exactly as a user would (peft.PeftModel.from_pretrained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm_mcp.engine.device import torch_dtype
from llm_mcp.engine.model import avoid_cpu_repack_bug


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
