"""RMSNorm (Llama, Qwen, Mistral) as one autograd function with its backward in closed form.

transformers' RMSNorm is five ops (pow, mean, rsqrt, two multiplies); autograd differentiates each, running about
a dozen elementwise ops over the hidden states in the backward pass: on CPU that took 7.4 ms of a norm's 8.2 ms
(8 x 434 x 256 float32, 2 cores), and a layer has two. This function keeps what autograd keeps for a frozen norm
(x, the per-token 1/rms, the weight) and computes dx = rstd * (g*w - x_hat * mean(g*w * x_hat)) directly, as Liger's and Unsloth's
RMSNorm kernels do on GPUs: 3.7 instead of 7.3 ms forward and backward. The forward is transformers' own op for op, so the outputs are the same bits.

Applied while training in float32 without autocast (the CPU path) to the RMSNorm classes listed below, whose
forward is ``weight * (x * rsqrt(mean(x^2) + eps))``; everything else keeps its own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# transformers' RMSNorms computing weight * x / rms(x) (Gemma's, with 1 + weight, is not one of them)
RMSNORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen2MoeRMSNorm",
                   "Qwen3MoeRMSNorm", "MixtralRMSNorm", "Phi3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x_hat).reshape(-1, x.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_y = grad * weight
            dot = (grad_y * x_hat).mean(-1, keepdim=True)
            grad_x = grad_y.sub_(x_hat.mul_(dot)).mul_(rstd)
        return grad_x, grad_w, None


def _lean_forward(norm: nn.Module, eager):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (norm.training and torch.is_grad_enabled()) or torch.is_autocast_enabled(x.device.type) \
                or x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
            return eager(x)
        return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)

    return forward


@contextmanager
def lean_rmsnorm(model: nn.Module) -> Iterator[int]:
    """While inside, every listed RMSNorm trains through _RMSNorm; yields how many."""
    swapped = [m for m in model.modules() if type(m).__name__ in RMSNORM_CLASSES
               and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon")]
    for module in swapped:
        module.forward = _lean_forward(module, module.forward)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward  # the instance attribute: back to the class's forward
