"""A LoRA SwiGLU MLP (Llama, Qwen, Mistral: ``down(silu(gate(x)) * up(x))``) as one autograd function.

Autograd run op by op keeps, for each token, the gate and up outputs, silu(gate) and the product that down reads
(and its copy in the adapter's dtype): four to five intermediate-size tensors, the largest activations of a
layer, plus a copy of the input per projection in the adapter's dtype (TRL keeps QLoRA adapters in bf16, and peft
casts the input for each). This function keeps the gate and up outputs, one copy of the input and the three r-wide
LoRA activations, and recomputes silu and the product in the backward pass (a few elementwise ops, no matmul),
as Unsloth's and Liger's SwiGLU kernels do. peft's modules do the rest as before:
their base layers (bitsandbytes 4-bit or plain) compute the frozen projections, their LoRA A/B weights are the
parameters the optimizer holds, their dropout rates apply (masks drawn as lean_lora's, from seeds, drawn again in
the backward pass), and nothing of the saved adapter changes.

Applied while training without autocast, to MLPs whose three projections are plain LoRA (one active adapter, no
DoRA, no bias on the adapter) over nn.Linear (plain weights) or bitsandbytes Linear4bit; everything else (torchao
int4/fp8, int8, autocast) keeps peft's forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llm_mcp.engine.patches.lean_lora import apply_mask, keep_mask, new_seed

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Projection:
    """One LoRA-adapted projection as the fused function needs it: y = base(x) + scale * B(A(dropout(x)))."""

    base: nn.Module
    lora_a: nn.Linear
    lora_b: nn.Linear
    scale: float
    dropout: float

    @property
    def r_scale(self) -> float:
        """LoRA's scale and dropout's 1/(1-p) together, applied to the r-wide activation A(dropout(x))."""
        return self.scale / (1.0 - self.dropout)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the base layer computes in for an input of this dtype: a 4-bit layer's compute_dtype (it casts
        its input to it), a plain layer's input's."""
        if type(self.base.weight).__name__ == "Params4bit":
            return getattr(self.base, "compute_dtype", None) or dtype
        return dtype

    def base_input(self, t: torch.Tensor, t_lora: torch.Tensor) -> torch.Tensor:
        """t for the base layer: its copy in the adapter's dtype when the base computes in that dtype anyway, so
        the base and the adapter share one cast (bitsandbytes would cast t again)."""
        return t_lora if self.compute_dtype(t.dtype) == t_lora.dtype else t

    def base_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """d base(x) / dx applied to grad: grad @ W, in the dtype the base computes in. A 4-bit layer's gradient is
        computed with the weight dequantized to its compute_dtype, as bitsandbytes' own backward does."""
        weight = self.base.weight
        if type(weight).__name__ != "Params4bit":
            return grad @ weight
        import bitsandbytes.functional as bnb_functional

        dtype = self.compute_dtype(grad.dtype)
        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        return grad.to(dtype) @ weight


def _keep(x: torch.Tensor, proj: _Projection, seed: int) -> torch.Tensor | None:
    """The projection's dropout mask for x (None without dropout)."""
    return None if proj.dropout == 0 else keep_mask(x.shape, proj.dropout, seed, x.device)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """t with dropped elements zeroed (unscaled; the 1/(1-p) goes on the r-wide side)."""
    return t if keep is None else apply_mask(t, keep)


def _sum(base: torch.Tensor, lora: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + lora in dtype, as peft's ``result + lora.to(result.dtype)``: base is a fresh output, so it is upcast
    once and lora added into it in place (an upcast copy and an output-wide tensor fewer)."""
    return base.to(dtype).add_(lora)


def _forward(x: torch.Tensor, x_lora: torch.Tensor, proj: _Projection, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's output and its r-wide LoRA activation scale * A(dropout(x)) / (1 - p) (kept for B's
    gradient; both scales go on this r-wide side, not the output-wide one). x_lora is x in the adapter's dtype (TRL
    keeps QLoRA adapters in bf16), as peft casts it; the sum is in x's dtype."""
    with torch.no_grad():
        base = proj.base(proj.base_input(x, x_lora))
    dropped = _masked(x_lora, _keep(x_lora, proj, seed))
    a = nn.functional.linear(dropped, proj.lora_a.weight) * proj.r_scale
    return _sum(base, nn.functional.linear(a, proj.lora_b.weight), x.dtype), a


def _backward(grad: torch.Tensor, x_lora: torch.Tensor, a: torch.Tensor, proj: _Projection, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dA, dL/dB) of one projection from dL/dy; the LoRA part in the adapter's dtype, as autograd would."""
    lora_grad = grad.to(a.dtype)
    grad_b = lora_grad.reshape(-1, lora_grad.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    grad_a_out = (lora_grad @ proj.lora_b.weight) * proj.r_scale  # dL/d(A x_dropped)
    keep = _keep(x_lora, proj, seed)  # the forward's mask, drawn again once for both uses
    dropped = _masked(x_lora, keep)
    grad_a = grad_a_out.reshape(-1, grad_a_out.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
    lora_grad_x = _masked(grad_a_out @ proj.lora_a.weight, keep)
    return _sum(proj.base_grad(proj.base_input(grad, lora_grad)), lora_grad_x, grad.dtype), grad_a, grad_b


class _LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) keeping x (in the adapter's dtype), gate(x), up(x) and the r-wide LoRA
    activations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, projections: tuple[_Projection, ...], *weights: torch.Tensor) -> torch.Tensor:
        gate_proj, up_proj, down_proj = projections
        seeds = tuple(new_seed() for _ in projections)  # in peft's order of draws: gate, up, down
        lora_dtype = gate_proj.lora_a.weight.dtype
        x_lora = x.to(lora_dtype)  # one copy for gate and up (peft casts once per projection)
        gate, a_gate = _forward(x, x_lora, gate_proj, seeds[0])
        up, a_up = _forward(x, x_lora, up_proj, seeds[1])
        hidden = nn.functional.silu(gate) * up
        out, a_down = _forward(hidden, hidden.to(lora_dtype), down_proj, seeds[2])
        ctx.projections, ctx.seeds = projections, seeds
        ctx.save_for_backward(x_lora, gate, up, a_gate, a_up, a_down)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x_lora, gate, up, a_gate, a_up, a_down = ctx.saved_tensors
        gate_proj, up_proj, down_proj = ctx.projections
        silu = nn.functional.silu(gate)
        hidden_lora = (silu * up).to(x_lora.dtype)
        grad_hidden, grad_a_down, grad_b_down = _backward(grad_out, hidden_lora, a_down, down_proj, ctx.seeds[2])
        grad_up = grad_hidden * silu
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)  # one kernel for * silu'(gate)
        grad_x_gate, grad_a_gate, grad_b_gate = _backward(grad_gate, x_lora, a_gate, gate_proj, ctx.seeds[0])
        grad_x_up, grad_a_up, grad_b_up = _backward(grad_up, x_lora, a_up, up_proj, ctx.seeds[1])
        return (grad_x_gate + grad_x_up, None, grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down,
                grad_b_down)


def _projection(layer: nn.Module) -> _Projection | None:
    """The layer as a _Projection when it is plain peft LoRA the fused function computes exactly, else None."""
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or getattr(layer, "merged", True) or layer.disable_adapters:
        return None
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in lora_a or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    base = layer.get_base_layer()
    a, b = lora_a[name], lora_b[name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or a.bias is not None or b.bias is not None:
        return None
    plain = type(base) is nn.Linear and type(base.weight.data) is torch.Tensor  # not torchao's int4/fp8 tensors
    if not plain and type(base).__name__ != "Linear4bit":
        return None
    dropout = layer.lora_dropout[name]
    p = getattr(a, "dropout_p", None)  # lean_lora_dropout moved it here
    if p is None:
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return None
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return _Projection(base=base, lora_a=a, lora_b=b, scale=float(layer.scaling[name]), dropout=float(p))


def _fusable(mlp: nn.Module) -> tuple[_Projection, ...] | None:
    # nn.SiLU, or transformers' SiLUActivation (ACT2FN["silu"]): both are F.silu
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation") \
            or not type(mlp).__name__.endswith("MLP"):
        return None
    projections = tuple(_projection(getattr(mlp, name, None)) for name in _PROJECTIONS)
    return projections if all(projections) else None  # type: ignore[return-value]


def _fused_forward(mlp: nn.Module, projections: tuple[_Projection, ...], eager: Any):
    weights = [w for p in projections for w in (p.lora_a.weight, p.lora_b.weight)]  # the optimizer's objects

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (mlp.training and torch.is_grad_enabled()) or torch.is_autocast_enabled(x.device.type) \
                or len({w.dtype for w in weights}) > 1:
            return eager(x)
        return _LoraSwiGLU.apply(x, projections, *weights)

    return forward


@contextmanager
def lean_mlp(model: nn.Module) -> Iterator[int]:
    """While inside, every LoRA SwiGLU MLP that qualifies trains through _LoraSwiGLU; yields how many."""
    swapped = []
    for module in model.modules():
        projections = _fusable(module)
        if projections is not None:
            swapped.append(module)
            module.forward = _fused_forward(module, projections, module.forward)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward  # the instance attribute: back to the class's forward
