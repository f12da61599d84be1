"""4-bit layers that multiply with a float copy of their weight while generating, instead of dequantizing it again
for every token.

bitsandbytes' 4-bit layer dequantizes its whole weight in each forward: amortized over a training batch, but paid
again for every single generated token. Here each 4-bit layer's weight is dequantized once when generation starts,
in its compute dtype, and the layer multiplies with that copy until generation ends; the copies are then freed.
Where peft's LoRA layer around a 4-bit layer runs one plain adapter (the usual case while generating: eval mode,
so no dropout), its forward becomes the same arithmetic without peft's per-call bookkeeping: the copy's product
plus lora_B(lora_A(x)) * scaling, in the adapter's dtype as peft computes it. Done only where the copies fit
comfortably in free memory; the answers are the same up to the rounding of the matmuls (the same dequantized values
and adapter weights are multiplied).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Copies are made only while they take at most this share of the free memory.
_FREE_MEMORY_SHARE = 0.25


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def copy_bytes(model: nn.Module) -> int:
    """The bytes the float copies of `model`'s 4-bit weights take, each in its layer's compute dtype."""
    total = 0
    for layer in four_bit_layers(model):
        dtype = layer.compute_dtype or torch.float32
        total += layer.in_features * layer.out_features * torch.finfo(dtype).bits // 8
    return total


def fits(model: nn.Module, free_bytes: int | None) -> bool:
    """Whether the float copies fit in a quarter of `free_bytes` (None: unknown, so no)."""
    needed = copy_bytes(model)
    return needed > 0 and free_bytes is not None and needed <= _FREE_MEMORY_SHARE * free_bytes


@contextmanager
def float_weights(model: nn.Module) -> Iterator[int]:
    """Each 4-bit layer multiplies with a float copy of its weight (dequantized once) while the block runs; yields
    how many layers do."""
    import bitsandbytes.functional as bnbf

    # a weight bitsandbytes repacked for its CPU kernel no longer dequantizes with dequantize_4bit
    layers = [m for m in four_bit_layers(model)
              if not getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    wrappers: list[nn.Module] = []
    try:
        for layer in layers:
            dtype = layer.compute_dtype or torch.float32
            weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            layer.forward = _with_copy(layer, weight.reshape(layer.out_features, layer.in_features), dtype)
        wrappers = [m for m in model.modules() if getattr(m, "base_layer", None) in set(layers) and _plain_lora(m)]
        for wrapper in wrappers:
            wrapper.forward = _lora_over(wrapper)
        yield len(layers)
    finally:
        for module in [*layers, *wrappers]:
            module.__dict__.pop("forward", None)  # the class's forward again, and the copy freed


def _plain_lora(wrapper: nn.Module) -> bool:
    """Whether peft's LoRA layer runs exactly one plain adapter now: enabled, not merged, no variant (DoRA), no
    bias on B, and its dropout inactive (eval mode)."""
    active = list(getattr(wrapper, "active_adapters", []))
    if wrapper.disable_adapters or wrapper.merged or len(active) != 1 or active[0] not in wrapper.lora_A:
        return False
    name = active[0]
    return name not in wrapper.lora_variant and wrapper.lora_B[name].bias is None \
        and not wrapper.lora_dropout[name].training


def _lora_over(wrapper: nn.Module) -> Any:
    name = wrapper.active_adapters[0]
    base = wrapper.base_layer.forward  # the copy's product, set above
    a, b, scaling = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.scaling[name]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:  # adapter_names and the like: peft's own forward
            return type(wrapper).forward(wrapper, x, *args, **kwargs)
        result = base(x)
        return result + (F.linear(F.linear(x.to(a.dtype), a), b) * scaling).to(result.dtype)

    return forward


def _with_copy(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> Any:
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)  # as bitsandbytes casts in and out

    return forward
