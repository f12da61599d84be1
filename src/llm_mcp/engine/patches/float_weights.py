"""4-bit layers that multiply with a float copy of their weight while generating, instead of dequantizing it again
for every token.

bitsandbytes' 4-bit layer dequantizes its whole weight in each forward: amortized over a training batch, but paid
again for every single generated token. Here each 4-bit layer's weight is dequantized once when generation starts,
in its compute dtype, and the layer multiplies with that copy until generation ends; the copies are then freed.
Done only where the copies fit comfortably in free memory; the answers are the same up to the rounding of the
compute dtype's matmul (the same dequantized values are multiplied).
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
    try:
        for layer in layers:
            dtype = layer.compute_dtype or torch.float32
            weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            layer.forward = _with_copy(layer, weight.reshape(layer.out_features, layer.in_features), dtype)
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # the class's forward again, and the copy freed


def _with_copy(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> Any:
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)  # as bitsandbytes casts in and out

    return forward
