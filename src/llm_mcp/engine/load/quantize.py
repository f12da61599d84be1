"""Quantization routes for the base model's linear layers, and what they really cost in memory.

nf4 / int8: bitsandbytes, at load (NF4 with optional double quantization; LLM.int8). int4 / fp8: torchao
weight-only tensors (group-wise affine int4; float8 e4m3 with per-row scales), applied right after loading with
`quantize_` (transformers' Trainer refuses models loaded through TorchAoConfig), which peft wraps with LoRA.
Each route says in `warnings` where this hardware runs it differently from its name.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_mcp.engine.device import detect

INT4_GROUP_SIZE = 32  # group-wise scales; 32 divides the in_features of every common model (and the tiny one)
_LINEAR_KINDS = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")


def quantization_config(quant: str, dtype: torch.dtype, *, double_quant: bool, warnings: list[str],
                        keep_16bit: list[str] | None = None, shardable: bool = False) -> Any:
    """The transformers quantization_config for the routes applied at load (None for the others).
    keep_16bit: module names left unquantized (nf4_optimized's choice). shardable: NF4 weights packed in the
    compute dtype rather than bytes, which FSDP2 shards (it leaves integer parameters whole on every rank)."""
    if quant in ("none", "int4", "fp8"):
        return None
    if quant in ("nf4", "nf4_optimized"):
        from transformers import BitsAndBytesConfig

        skip = ["lm_head", *(keep_16bit or [])] if quant == "nf4_optimized" else None
        # on a GPU, device_map="auto" may place layers that do not fit in CPU memory (kept in float32 there)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
                                  llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=detect().has_cuda)
    if quant == "int8":
        from transformers import BitsAndBytesConfig

        if not detect().has_cuda:
            warnings.append("int8 (LLM.int8) on CPU computes its matmuls in float16; slower than on a GPU.")
        return BitsAndBytesConfig(load_in_8bit=True)
    raise AssertionError(f"no quantization route for {quant!r}")


def quantize_after_load(model: Any, quant: str, warnings: list[str]) -> None:
    """Apply the torchao routes in place to every linear layer but lm_head (nothing for the other types)."""
    if quant not in ("int4", "fp8"):
        return
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    if quant == "int4":
        config = _int4_config(warnings)
    else:
        if not _has_native_fp8():
            warnings.append("fp8: weights are stored as float8 e4m3 (8 bits) with per-row scales, but this hardware "
                            "has no native FP8 matmul, so they are computed in the compute dtype.")
        config = Float8WeightOnlyConfig()
    conv1d_as_linear(model)
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))


def conv1d_as_linear(model: Any) -> int:
    """Replace GPT-2-style Conv1D layers (a linear layer storing its weight as [in, out]) with nn.Linear holding
    the transposed weight, as transformers' bitsandbytes route does at load, so torchao can quantize them. The
    checkpoint layout stays Conv1D's: the merged export transposes these weights back. Returns how many."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None,
                                         device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(child.weight.requires_grad)
                linear.source_cls = Conv1D  # as transformers' bitsandbytes route marks it: merged exports transpose back
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def _int4_config(warnings: list[str]) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    # torchao's packed int4 kernels need CUDA; the portable route keeps 4-bit values unpacked in int8 storage
    warnings.append(f"int4: group-wise affine 4-bit weights (group size {INT4_GROUP_SIZE}) through torchao's portable "
                    "route, which stores each 4-bit value in an int8 byte: memory as 8-bit until a packed int4 "
                    "kernel is available (torchao Int4WeightOnlyConfig on CUDA).")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))


def _has_native_fp8() -> bool:
    return detect().has_cuda and torch.cuda.get_device_capability(0) >= (8, 9)


def tensor_bytes(t: torch.Tensor) -> int:
    """Real storage of a tensor, including torchao subclasses (their inner data and scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def linear_weight_bytes(model: Any) -> int:
    """Bytes held by the weights of the linear layers (the ones quantization and LoRA act on), scales included;
    the LoRA adapters themselves are not counted."""
    total = 0
    for name, module in model.named_modules():
        if type(module).__name__ not in _LINEAR_KINDS or name.endswith("lm_head") or "lora_" in name:
            continue
        weight = module.weight
        total += tensor_bytes(weight)
        state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit: absmax (and nested state)
        if state is not None:
            total += tensor_bytes(state.absmax)
            if getattr(state, "state2", None) is not None:
                total += tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code)
        scb = getattr(weight, "SCB", None)  # bitsandbytes int8: row scales
        if scb is not None:
            total += tensor_bytes(scb)
    return total


def model_weight_bytes(model: Any) -> int:
    """All parameter and buffer bytes of the model (quantized storage counted as stored)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total
