"""Ship a trained model: the LoRA adapter as a PEFT folder, a merged 16-bit model that plain transformers loads, or
GGUF (+ an Ollama Modelfile) for llama.cpp and Ollama. Each export is verified by loading it back.

The merge dequantizes the base weights the adapter was trained against (4-bit, 8-bit or torchao) and adds the
LoRA delta one module at a time on the CPU, writing safetensors shards as it goes, so it needs neither the GPU
memory training needed nor a second full copy of the model.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_mcp.config import ExportConfig
from llm_mcp.engine.model import ModelBundle
from llm_mcp.errors import InvalidArgument

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3
DEFAULT_PROBE = [{"role": "user", "content": "Hello! What can you do?"}]
PROBE_TOKENS = 24  # greedy tokens compared by verification
EXPORT_RECORD = "export.json"  # written last into every export folder: what was exported, and its checks


def export(bundle: ModelBundle, config: ExportConfig, *, probe_prompt: str | None = None) -> dict[str, Any]:
    """Write the export under config.output_dir; answer what was written and how it was verified."""
    out = _claim_output_dir(Path(config.output_dir), config.overwrite)
    if not bundle.has_lora:
        raise InvalidArgument("model_id", "(this model)", "a model with a LoRA adapter: prepare_for_training "
                                                          "attaches it for the unsloth family")
    warnings: list[str] = []
    answer: dict[str, Any] = {"status": "success", "format": config.format, "output_dir": config.output_dir}
    if config.format == "adapter":
        answer["adapter_dir"] = str(_save_adapter(bundle, out))
    elif config.format == "merged_16bit":
        answer["merged_dir"] = str(write_merged(bundle, out, config.save_dtype))
        if config.verify:
            answer["verified"] = verify_merged(bundle, out, probe_prompt, warnings)
    else:  # gguf: adapter and merged model first, so that a failing GGUF step leaves both in place
        answer["adapter_dir"] = str(_save_adapter(bundle, out / "adapter"))
        merged = write_merged(bundle, out / "merged", config.save_dtype)
        answer["merged_dir"] = str(merged)
        if config.verify:
            answer["verified_merged"] = verify_merged(bundle, merged, probe_prompt, warnings)
        _record(out, {**answer, "gguf": "not written yet"})  # a failed GGUF step leaves a replaceable export
        from llm_mcp.engine.gguf_export import export_gguf

        gguf = export_gguf(merged, out, config.gguf_quantization)
        warnings += gguf.pop("warnings", [])
        answer.update(gguf)
    _record(out, answer)
    answer["warnings"] = warnings
    return answer


def _record(out: Path, answer: dict[str, Any]) -> None:
    (out / EXPORT_RECORD).write_text(json.dumps({k: v for k, v in answer.items() if k != "status"}, indent=2))


def _claim_output_dir(out: Path, overwrite: bool) -> Path:
    """An empty or new folder; an earlier export (it holds our export.json) is replaced only with
    overwrite=true, and a folder of anything else never."""
    if out.exists() and not out.is_dir():
        raise InvalidArgument("output_dir", str(out), "a folder path (a file of that name exists)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InvalidArgument("output_dir", str(out), "a new or empty folder; it holds files. Pass "
                                                          "overwrite=true to replace an earlier export there")
        if not (out / EXPORT_RECORD).is_file():
            held = sorted(p.name for p in out.iterdir())[:10]
            raise InvalidArgument("output_dir", str(out), f"a new, empty, or earlier-export folder; it holds "
                                                          f"{held} and no {EXPORT_RECORD}, and overwrite only "
                                                          f"replaces an earlier export")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_adapter(bundle: ModelBundle, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out


def merged_state(bundle: ModelBundle, dtype: torch.dtype):
    """(name, tensor) of the merged model, one module at a time: dequantized base weight + LoRA delta."""
    from peft.tuners.lora import LoraLayer

    base = bundle.model.get_base_model()
    adapter = next(iter(bundle.model.peft_config))
    tied = _tied_embeddings(base)
    lora_parts = set()
    for name, module in base.named_modules():
        if any(name.startswith(p + ".") for p in lora_parts):
            continue  # base_layer, lora_A, lora_B, dropout of a LoRA layer already merged
        if isinstance(module, LoraLayer):
            lora_parts.add(name)
            layer = module.get_base_layer()
            weight = _dequantized_weight(layer).float() + module.get_delta_weight(adapter).float()
            yield f"{name}.weight", _cpu(weight, dtype)
            if getattr(layer, "bias", None) is not None:
                yield f"{name}.bias", _cpu(layer.bias, dtype)
            continue
        persistent = {k: v for k, v in module.named_buffers(recurse=False)
                      if k not in module._non_persistent_buffers_set}
        for key, value in [*module.named_parameters(recurse=False), *persistent.items()]:
            full = f"{name}.{key}" if name else key
            if tied and full == "lm_head.weight":
                continue
            quantized = type(value).__name__ in ("Params4bit", "Int8Params") or \
                type(value).__module__.startswith("torchao.")
            if key == "weight" and quantized:
                value = _dequantized_weight(module)
            yield full, _cpu(value, dtype)


def _dequantized_weight(layer: Any) -> torch.Tensor:
    """A linear layer's weight in floating point, leaving the live model untouched (peft's
    dequantize_module_weight moves an 8-bit weight between devices, which drops its scales and breaks the
    layer's next forward)."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB  # where bnb keeps them after init
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    if type(weight).__module__.startswith("torchao."):
        return weight.dequantize()
    return weight


def _tied_embeddings(model: Any) -> bool:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(text, "tie_word_embeddings", False))


def _cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to("cpu").contiguous().clone()


def write_merged(bundle: ModelBundle, out: Path, save_dtype: str) -> Path:
    """A plain Hugging Face folder: sharded safetensors, config without quantization, tokenizer with its chat
    template, generation config with the EOS."""
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out)
    with torch.no_grad():
        for name, tensor in merged_state(bundle, getattr(torch, save_dtype)):
            writer.add(name, tensor)
    writer.close()
    base = bundle.model.get_base_model()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = save_dtype
    config.save_pretrained(str(out))
    generation = copy.deepcopy(base.generation_config)
    if generation.eos_token_id is None:
        generation.eos_token_id = bundle.tokenizer.eos_token_id
    generation.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out


class _ShardWriter:
    """safetensors shards of at most SHARD_BYTES written as tensors arrive, named and indexed as transformers
    names them once the count is known."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > SHARD_BYTES:
            self._write()
        self.pending[name] = tensor
        self.pending_bytes += size

    def _write(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f"shard-{len(self.shards) + 1:05d}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._write()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        (self.out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def verify_merged(bundle: ModelBundle, merged: Path, probe_prompt: str | None, warnings: list[str]) -> dict[str, Any]:
    """Load the merged folder with plain transformers and compare its greedy answer with the adapter model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_mcp.config import GenerationConfig
    from llm_mcp.engine.generate import generate

    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    probe = (GenerationConfig(prompt=probe_prompt, max_new_tokens=PROBE_TOKENS) if probe_prompt is not None
             else GenerationConfig(messages=DEFAULT_PROBE, max_new_tokens=PROBE_TOKENS))
    expected = generate(bundle, probe)["text"]
    merged_bundle = copy.copy(bundle)
    merged_bundle.model, merged_bundle.tokenizer = reloaded, tokenizer
    got = generate(merged_bundle, probe)["text"]
    match = got == expected
    if not match:
        warnings.append("the merged model's greedy answer to the probe differs from the adapter model's (rounding "
                        "to 16-bit can flip a near-tie); compare them with the generate tool before shipping.")
    del reloaded
    return {"loads_with_transformers": True, "greedy_matches_adapter_model": match, "probe_answer": got,
            "adapter_model_answer": expected, "eos_token": tokenizer.eos_token}
