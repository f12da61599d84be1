"""LoRA dropout that keeps nothing per element for the backward pass instead of a float copy of each input.

peft computes ``lora_B(lora_A(dropout(x)))``. Autograd then keeps, for every adapted projection, the dropped-out
input in float (for lora_A's weight gradient) as well as the dropout mask; q, k and v read the same x, so a layer
holds three float copies of it, gate and up two more (on CPU nn.Dropout also keeps its float noise tensor). Here
dropout and lora_A are one autograd function that keeps x itself (one tensor, shared by the projections that read
it) and the seed its mask was drawn from, and draws the same mask again in the backward pass.

The masks are Bernoulli(1 - p) as nn.Dropout's. On CPU they are drawn as 64-bit words of numpy's PCG64, seeded
from torch's generator (so ``torch.manual_seed``, TRL's seed and the RNG state a checkpoint restores decide them),
and compared with p 16 bits at a time: p is then exact to 1/65536 (32 bits where that would move p by over 0.1%).
That is several times faster than ``torch.rand_like(x) >= p``, whose draws were a large part of a CPU training
step (docs/benchmarks.md). On a GPU, torch's own generator draws them on the device. The
modules, their parameters (which the optimizer holds) and the saved adapters are unchanged.

Used only for training without autocast (the float32 CPU path; with bf16/fp16 autocast the function's casts would
need autocast's custom_fwd machinery) and undone when training ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def new_seed() -> int:
    """A mask seed drawn from torch's default generator, so torch's seed and RNG state decide every mask."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """Which elements dropout keeps: True with probability 1 - p; the same seed gives the same mask."""
    if torch.device(device).type != "cpu":
        generator = torch.Generator(device).manual_seed(seed)
        return torch.rand(shape, device=device, generator=generator) >= p
    n = int(np.prod(shape))
    bits = 16 if abs(round(p * 2**16) / 2**16 - p) <= 1e-3 * p else 32
    per_word = 64 // bits
    words = np.random.PCG64(seed).random_raw((n + per_word - 1) // per_word)
    draws = torch.from_numpy(words.view(np.int16 if bits == 16 else np.int32)[:n]).view(shape)
    # the draws are uniform over [-2^(bits-1), 2^(bits-1)): at or above this bound with probability 1 - p
    return draws >= round(p * 2**bits) - 2 ** (bits - 1)


def apply_mask(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t with the dropped elements zeroed (unscaled), as nn.Dropout's multiply by its noise: multiplying by the
    mask's bytes is faster than ``torch.where(keep, t, 0)`` on CPU, and like nn.Dropout an inf dropped becomes nan rather than 0."""
    return t * keep.view(torch.uint8)


class _DropoutLinear(torch.autograd.Function):
    """y = dropout(x, p) @ W^T, saving x and the mask's seed rather than the dropped-out float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed = new_seed()
        ctx.p, ctx.scale = p, 1.0 / (1.0 - p)
        ctx.save_for_backward(x, weight)
        keep = keep_mask(x.shape, p, ctx.seed, x.device)
        # the 1/(1-p) scale applied on the r-wide output, not the input: fewer elements, same product
        return nn.functional.linear(apply_mask(x, keep), weight) * ctx.scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        keep = keep_mask(x.shape, ctx.p, ctx.seed, x.device)  # the forward's mask, drawn again
        grad = grad_out * ctx.scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = apply_mask(grad @ weight, keep)
        if ctx.needs_input_grad[1]:
            dropped = apply_mask(x, keep)  # as in forward
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
        return grad_x, grad_w, None


class LeanDropoutLinear(nn.Linear):
    """A LoRA A matrix that applies its adapter's dropout itself (set as ``__class__`` of peft's nn.Linear)."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.bias is None:
            return _DropoutLinear.apply(x, self.weight, self.dropout_p)
        return nn.functional.linear(x, self.weight, self.bias)  # eval: dropout is the identity


@contextmanager
def lean_lora_dropout(model: nn.Module) -> Iterator[int]:
    """While inside, every LoRA adapter with dropout p > 0 runs through LeanDropoutLinear; yields how many."""
    swapped: list[tuple[nn.ModuleDict, str, nn.Module, nn.Linear]] = []
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            linear = lora_a[name] if name in lora_a else None
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and type(linear) is nn.Linear:
                swapped.append((dropouts, name, dropout, linear))
                dropouts[name] = nn.Identity()
                linear.__class__ = LeanDropoutLinear
                linear.dropout_p = float(dropout.p)
    try:
        yield len(swapped)
    finally:
        for dropouts, name, dropout, linear in swapped:
            linear.__class__ = nn.Linear
            del linear.dropout_p
            dropouts[name] = dropout
