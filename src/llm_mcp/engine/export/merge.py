"""Ship a trained model: the LoRA adapter as a PEFT folder, a merged 16-bit model that plain transformers loads, or
GGUF (+ an Ollama Modelfile) for llama.cpp and Ollama. Each export is verified by loading it back.

Every export is written into a temporary sibling (`<name>.tmp-<pid>`), verified, fsynced and renamed into place, so
a failure or a crash never leaves a half-written folder where the export should be, and a retry is never blocked.
An export holds its output_dir's lock (output_lock.py) throughout, and a full disk is told as DiskFull.

The merge dequantizes the base weights the adapter was trained against (4-bit, 8-bit or torchao) and adds the
LoRA delta one module at a time on the CPU, writing safetensors shards in the checkpoint's own layout as it goes
(Conv1D weights transposed back, fused experts as transformers saves them), so it needs neither the GPU memory
training needed nor a second full copy of the model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from llm_mcp import output_lock
from llm_mcp.config import ExportConfig
from llm_mcp.disk import disk_full_as_error, require_free
from llm_mcp.engine.durable import fsync_tree, move_into_place
from llm_mcp.engine.export.probe import DEFAULT_PROBE, NEAR_TIE, Probe, first_disagreement, greedy_tokens, probes
from llm_mcp.engine.load.model import ModelBundle
from llm_mcp.errors import InvalidArgument

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3
PROBE_TOKENS = 24  # greedy tokens compared by the merged model's verification
EXPORT_RECORD = "export.json"  # written last into every export folder: what was exported, and its checks
# Bytes per weight of a GGUF file, at least (k-quants go through an f16 file first)
_GGUF_BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 1.0, "q6_k": 2.5, "q5_k_m": 2.5, "q4_k_m": 2.5}
__all__ = ["DEFAULT_PROBE", "EXPORT_RECORD", "export", "merged_state", "verify_merged", "write_merged"]


def export(bundle: ModelBundle, config: ExportConfig, *, probe_prompt: str | None = None,
           holder: str | None = None) -> dict[str, Any]:
    """Write the export to config.output_dir (through a temporary sibling); answer what was written and how it
    was verified. Paths in the answer are where the export ends up. holder names this export in output_dir's
    lock (e.g. "model m-1, export"), held from before the folder is checked to the end."""
    with output_lock.claim(config.output_dir, holder or "an export", doing="export"):
        return _export(bundle, config, probe_prompt)


def _export(bundle: ModelBundle, config: ExportConfig, probe_prompt: str | None) -> dict[str, Any]:
    final = Path(config.output_dir)
    _check_output_dir(final, config.overwrite)
    if not bundle.has_lora:
        raise InvalidArgument("model_id", "(this model)", "a model with a LoRA adapter: prepare_for_training "
                                                          "attaches it for the unsloth family")
    if config.format == "gguf":  # an architecture llama.cpp cannot run fails now, before any work
        from llm_mcp.engine.export.gguf import check_architecture

        base = bundle.model.get_base_model()
        config_dict = base.config.to_dict()
        config_dict["architectures"] = config_dict.get("architectures") or [type(base).__name__]
        check_architecture(config_dict, repr(_model_name(bundle)))
        from llm_mcp.engine.export.gguf_run import EXACT_QUANTS, require_quantizer

        if config.gguf_quantization not in EXACT_QUANTS:
            require_quantizer(config.gguf_quantization)  # a k-quant: refused before the merge, not after
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier export of this process that was killed
    needed = _export_bytes(bundle, config)
    require_free(final, needed, doing=f"the {config.format} export")
    tmp.mkdir(parents=True)
    try:
        with disk_full_as_error(final, doing=f"the {config.format} export", needed=needed):
            answer = _write(bundle, config, tmp, final, probe_prompt)
            _record(tmp, answer)
            fsync_tree(tmp)
            move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return answer


def _write(bundle: ModelBundle, config: ExportConfig, tmp: Path, final: Path,
           probe_prompt: str | None) -> dict[str, Any]:
    warnings: list[str] = []
    answer: dict[str, Any] = {"status": "success", "format": config.format, "output_dir": config.output_dir}
    if config.format == "adapter":
        _save_adapter(bundle, tmp)
        answer["adapter_dir"] = str(final)
    elif config.format == "merged_16bit":
        write_merged(bundle, tmp, config.save_dtype)
        answer["merged_dir"] = str(final)
        if config.verify:
            answer["verified"] = verify_merged(bundle, tmp, probe_prompt, warnings)
    else:  # gguf: the adapter and the merged model the GGUF is made from travel with it
        _save_adapter(bundle, tmp / "adapter")
        merged = write_merged(bundle, tmp / "merged", config.save_dtype)
        answer.update(adapter_dir=str(final / "adapter"), merged_dir=str(final / "merged"))
        if config.verify:
            answer["verified_merged"] = verify_merged(bundle, merged, probe_prompt, warnings)
        from llm_mcp.engine.export.gguf import export_gguf

        gguf = export_gguf(merged, tmp, config.gguf_quantization, probe_prompt=probe_prompt, run=config.verify,
                           name=_model_name(bundle))
        warnings += gguf.pop("warnings", [])
        answer.update(_relocated(gguf, tmp, final))
    answer["warnings"] = warnings
    return answer


def _relocated(value: Any, tmp: Path, final: Path) -> Any:
    """Paths inside the temporary folder, as they will be once it is renamed."""
    if isinstance(value, dict):
        return {k: _relocated(v, tmp, final) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(str(tmp)):
        return str(final) + value[len(str(tmp)):]
    return value


def _model_name(bundle: ModelBundle) -> str:
    return Path(str(bundle.model.get_base_model().config.name_or_path or "model")).name or "model"


def _record(out: Path, answer: dict[str, Any]) -> None:
    record = {k: v for k, v in answer.items() if k not in ("status", "warnings")}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2))


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """A new or empty folder; an earlier export (it holds our export.json) may be replaced only with
    overwrite=true, and a folder of anything else never. Nothing is deleted here."""
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


def _export_bytes(bundle: ModelBundle, config: ExportConfig) -> int:
    """What the export writes, at least: the adapter; the merged weights at 16 bits; the GGUF file beside them."""
    trainable, total = bundle.param_counts()
    adapter = sum(p.numel() * p.element_size() for p in bundle.model.parameters() if p.requires_grad)
    merged = 2 * (total - trainable)
    if config.format == "adapter":
        return adapter
    if config.format == "merged_16bit":
        return merged
    return adapter + merged + int(_GGUF_BYTES_PER_WEIGHT.get(config.gguf_quantization, 1.0) * (total - trainable))


def _save_adapter(bundle: ModelBundle, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------

def merged_state(bundle: ModelBundle, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the merged model as the live model names them, one module at a time: dequantized base
    weight + LoRA delta, in the layout of the model's own (unquantized) module."""
    from peft.tuners.lora import LoraLayer

    base = bundle.model.get_base_model()
    adapter = next(iter(bundle.model.peft_config))
    tied = _tied_embeddings(base)
    inside: str | None = None  # the LoRA layer whose parts (base_layer, lora_A, ...) named_modules is walking
    for name, module in base.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if isinstance(module, LoraLayer):
            inside = name
            for key, value in _merged_lora_layer(module, adapter):
                yield f"{name}.{key}", _cpu(value, dtype)
            continue
        persistent = {k: v for k, v in module.named_buffers(recurse=False)
                      if k not in module._non_persistent_buffers_set}
        for key, value in [*module.named_parameters(recurse=False), *persistent.items()]:
            full = f"{name}.{key}" if name else key
            if tied and full == "lm_head.weight":
                continue
            if key == "weight" and _is_quantized(value):
                value = _checkpoint_layout(module, _dequantized_weight(module))
            yield full, _cpu(value, dtype)


def _merged_lora_layer(module: Any, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of the module a LoRA layer wraps, each with its delta added. peft nests one ParamWrapper per
    targeted 3-D expert parameter (each delta in its parameter's layout); a LoRA layer on a Linear, 4/8-bit or
    Conv1D layer has one delta for `weight`."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    deltas: dict[str, torch.Tensor] = {}
    layer = module
    while isinstance(layer, LoraLayer):
        if adapter in layer.lora_A:
            if isinstance(layer, ParamWrapper):
                deltas[layer.parameter_name] = layer.get_delta_weight(adapter).float()
            else:
                deltas["weight"] = _linear_delta(layer, adapter)
        layer = layer.base_layer
    persistent = {k: v for k, v in layer.named_buffers() if k.rsplit(".", 1)[-1]
                  not in getattr(layer, "_non_persistent_buffers_set", set())}
    for key, value in [*layer.named_parameters(), *persistent.items()]:
        if key == "weight" and _is_quantized(value):
            value = _dequantized_weight(layer)
        if key in deltas:
            value = value.float() + deltas[key].to(value.device)
        yield key, _checkpoint_layout(layer, value) if key == "weight" else value


def _linear_delta(lora: Any, adapter: str) -> torch.Tensor:
    """The LoRA delta in the layout of the wrapped layer's weight: (out, in) for Linear and bitsandbytes layers,
    (in, out) for Conv1D. peft returns B @ A transposed when fan_in_fan_out is set, whatever the layer."""
    from transformers.pytorch_utils import Conv1D

    delta = lora.get_delta_weight(adapter).float()
    wants_in_out = isinstance(lora.get_base_layer(), Conv1D)
    return delta.T if bool(lora.fan_in_fan_out) != wants_in_out else delta


def _checkpoint_layout(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """transformers' bitsandbytes loading turns GPT-2's Conv1D into a Linear-layout 4/8-bit layer (source_cls
    records it); the checkpoint keeps Conv1D's (in, out) layout."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(layer, "source_cls", None)
    if isinstance(source, type) and issubclass(source, Conv1D) and not isinstance(layer, Conv1D):
        return weight.T
    return weight


def _is_quantized(value: torch.Tensor) -> bool:
    return type(value).__name__ in ("Params4bit", "Int8Params") or type(value).__module__.startswith("torchao.")


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
    """A plain Hugging Face folder: sharded safetensors in the layout save_pretrained writes, config without
    quantization, tokenizer with its chat template, generation config that stops at EOS and at the chat
    template's end-of-turn token."""
    out.mkdir(parents=True, exist_ok=True)
    base = bundle.model.get_base_model()
    writer = _ShardWriter(out, base)
    with torch.no_grad():
        for name, tensor in merged_state(bundle, getattr(torch, save_dtype)):
            writer.add(name, tensor)
    writer.close()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = save_dtype
    config.save_pretrained(str(out))
    generation = copy.deepcopy(base.generation_config)
    generation.eos_token_id = stop_token_ids(bundle.tokenizer, generation.eos_token_id)
    generation.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out


def stop_token_ids(tokenizer: Any, configured: Any) -> int | list[int]:
    """What generation stops at: the configured EOS ids, the tokenizer's EOS and the chat template's end-of-turn
    token (<|im_end|>, <|eot_id|>, <end_of_turn>) where it differs."""
    from llm_mcp.data.chat_templates import end_of_turn_token

    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    end_of_turn = end_of_turn_token(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if end_of_turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    stop = [i for i in dict.fromkeys(ids) if i is not None]
    return stop[0] if len(stop) == 1 else stop


class _ShardWriter:
    """safetensors shards of at most SHARD_BYTES written as tensors arrive, each in the checkpoint layout
    save_pretrained writes (transformers' weight conversions reverted: e.g. fused experts back to per-expert
    weights), named and indexed as transformers names them once the count is known."""

    def __init__(self, out: Path, model: Any) -> None:
        self.out, self.model = out, model
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
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(self.model, self.pending)
        state = {k: v.contiguous() for k, v in state.items()}
        path = self.out / f"shard-{len(self.shards) + 1:05d}.partial"
        save_file(state, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(state)))
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


# ----------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------

def verify_merged(bundle: ModelBundle, merged: Path, probe_prompt: str | None, warnings: list[str]) -> dict[str, Any]:
    """Load the merged folder with plain transformers and compare its greedy answer with the adapter model's, on the
    probe rendered with the chat template; an empty answer is never counted as agreement (the next probe follows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_mcp.engine.infer.generate import generate

    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    merged_bundle = copy.copy(bundle)
    merged_bundle.model, merged_bundle.tokenizer = reloaded, tokenizer
    try:
        for probe in probes(bundle.tokenizer, probe_prompt):
            config = probe.generation_config(PROBE_TOKENS)
            expected = generate(bundle, config)
            if expected["text"].strip():
                break
            warnings.append(f"the adapter model answers the probe {probe.label!r} ({probe.kind}) with nothing (EOS "
                            f"first), which proves nothing about the merge; tried the next probe instead.")
        else:
            warnings.append("every probe got an empty answer from the adapter model, so the merged model's answer "
                            "was not compared; check it with the generate tool.")
            return {"loads_with_transformers": True, "greedy_matches_adapter_model": None, "probe_answer": "",
                    "adapter_model_answer": "", "eos_token": tokenizer.eos_token, "compared": False}
        got = generate(merged_bundle, config)
        match = got["text"] == expected["text"]
        parted = None if match else _where_answers_part(bundle, reloaded, tokenizer, probe)
    finally:
        del reloaded
    result = {"loads_with_transformers": True, "greedy_matches_adapter_model": match, "probe_answer": got["text"],
              "adapter_model_answer": expected["text"], "eos_token": tokenizer.eos_token, "probe": probe.describe(),
              "near_tie": None if match else parted["near_tie"]}
    if not match:
        result["adapter_model_margin_at_divergence"] = parted["margin"]
        if parted["near_tie"]:
            warnings.append(f"the merged model's greedy answer to the probe parts from the adapter model's at token "
                            f"{parted['position']}, where the adapter model prefers its own token by only "
                            f"{parted['margin']} logits: a near-tie that rounding to 16-bit flips, not a broken merge.")
        else:
            warnings.append(f"the merged model's greedy answer to the probe parts from the adapter model's at token "
                            f"{parted['position']}, where the adapter model prefers its own token by "
                            f"{parted['margin']} logits, more than rounding explains: compare them with the generate "
                            f"tool before shipping.")
    return {**result, "stops_at_eos": got["finish_reason"] == "eos"}


def _where_answers_part(bundle: ModelBundle, merged: Any, tokenizer: Any, probe: Probe) -> dict[str, Any]:
    """Where the merged model's greedy answer parts from the adapter model's, and how firmly the adapter model holds
    to its own token there (the merged answer teacher-forced through the adapter model)."""
    answer = greedy_tokens(merged, tokenizer, probe, PROBE_TOKENS)
    split = first_disagreement(bundle.model, answer["prompt_ids"], answer["tokens"])
    if split is None:  # the adapter model's forward agrees token for token: its generate path rounds otherwise
        return {"position": len(answer["tokens"]), "margin": 0.0, "near_tie": True}
    return {**split, "near_tie": split["margin"] < NEAR_TIE}
