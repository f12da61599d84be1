"""Float32 matmuls while training on a CPU without bf16 instructions.

QLoRA computes in bf16 twice over: bitsandbytes dequantizes each 4-bit weight to its compute dtype (bf16 by the
spec's default) and multiplies there, and TRL's SFTTrainer casts the LoRA adapters of a quantized model to bf16.
Where the CPU has no bf16 instructions (AVX2-only CPUs) oneDNN emulates bf16 matmuls, many times slower than
float32's (docs/benchmarks.md). This runs both in float32 instead: the same weights and updates,
computed more precisely, not less.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llm_mcp.engine.device import cpu_bf16_instructions, cpu_bf16_slowdown, detect

# Where the CPU's flags list no bf16 instructions, a timed bf16 matmul this many times float32's confirms that
# oneDNN emulates bf16 (AVX2-only CPUs); where they list them, bf16 is kept whatever a timing on a loaded machine
# says.
SLOW_BF16 = 2.0


def _bitsandbytes_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]


def computes_in_half_precision(model: nn.Module) -> bool:
    """Whether training this model without autocast would still multiply in bf16/fp16: it has bitsandbytes layers
    (4-bit ones compute in their compute dtype, and TRL casts the adapters of any quantized model to bf16), or its
    trainable parameters are half precision already."""
    return bool(_bitsandbytes_layers(model)) or \
        any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


def bf16_slowdown(model: nn.Module) -> float | None:
    """This CPU's bf16/float32 matmul time ratio, measured where it matters: a model that would multiply in half
    precision, on a CPU. None on CUDA or for a model without half-precision compute."""
    if detect().has_cuda or not computes_in_half_precision(model):
        return None
    return round(cpu_bf16_slowdown(), 2)


def is_emulated(slowdown: float | None) -> bool:
    """Whether bf16 is emulated here, so float32_compute pays off: decided by the CPU's flags (a CPU with bf16
    instructions keeps bf16, however slow a timing under load made it look), and confirmed by the measured ratio
    where the flags list none or cannot be read (load only ever inflates it, never hides emulation)."""
    if slowdown is None or cpu_bf16_instructions() is True:
        return False
    return slowdown > SLOW_BF16


def emulation_basis() -> str:
    """Why bf16 counts as emulated here, in words for the engine-choice note."""
    if cpu_bf16_instructions() is False:
        return "its flags list no bf16 instructions (avx512_bf16, amx_bf16 or Arm's bf16) and a timed matmul agrees"
    return "its flags cannot be read and a timed bf16 matmul is several times slower than float32's"


def bitsandbytes_compute_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes layers with a compute dtype (4-bit ones; 8-bit ones have none)."""
    return [m for m in _bitsandbytes_layers(model) if hasattr(m, "compute_dtype")]


@contextmanager
def trainable_tensors_kept(model: nn.Module) -> Iterator[None]:
    """Building TRL's SFTTrainer casts a quantized model's trainable parameters to bf16 in place; this puts the
    tensors they had before back afterwards (their exact values, not bf16 ones widened again)."""
    kept = [(p, p.data) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for param, data in kept:
            param.data = data


@contextmanager
def float32_compute(model: nn.Module) -> Iterator[None]:
    """While open, the 4-bit layers multiply in float32 (their weights dequantized and widened to it); trainable
    parameters still in half precision are widened on entry (before the trainer builds its optimizer) and stay so:
    float32 is peft's own adapter dtype, and generation and export read them as they are. The layers' compute dtype
    comes back on exit."""
    layers = [(m, m.compute_dtype) for m in bitsandbytes_compute_layers(model)]
    for layer, _ in layers:
        layer.compute_dtype = torch.float32
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    try:
        yield
    finally:
        for layer, dtype in layers:
            layer.compute_dtype = dtype
