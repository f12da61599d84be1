"""Every engine choice of a training run, decided by one pure function from facts read beforehand.

`read_facts` asks the hardware and the loaded model what the choices depend on (probing only what the config
makes relevant: the bf16 timing, the memory estimate); `decide` turns config + facts into a frozen
`EngineChoices`, with a note for each choice made and a warning for each thing asked that cannot run here. Nothing
here changes the model: the caller applies the attention choice and the patches (engine/patches/apply.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_mcp.config import TrainingConfig
from llm_mcp.engine import CPU_KERNEL_CACHE_CAPACITY
from llm_mcp.engine.device import (can_release_freed_memory, can_reuse_freed_memory, cpu_bf16_instructions,
                                   detect)
from llm_mcp.engine.patches.float32_compute import (bf16_slowdown, bitsandbytes_compute_layers, emulation_basis,
                                                    is_emulated)
from llm_mcp.engine.load.model import ModelBundle, fallback_attention, supports_flash_attention
from llm_mcp.engine.patches.guard import PATCH_INTERNALS, missing_internals, not_applied

log = logging.getLogger(__name__)

# Without CUDA the paged optimizers cannot page; their unpaged twins compute the same update.
UNPAGED = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_8bit"}
_LIBRARY_KERNEL_CACHE = 1024  # oneDNN's and ideep's own capacity

# The note of each choice the engine makes on its own: what and why, in a sentence (numbers: docs/benchmarks.md).
NOTES = {
    "reuse_freed_memory": "memory: what a step frees stays in the process's heap for the next step (glibc's mmap "
                          "and trim thresholds raised while training) instead of being unmapped and faulted in "
                          "again page by page; faster steps, a higher peak since the heap fragments; opt-in.",
    "cpu_kernel_cache": "memory: oneDNN's and ideep's caches of compiled CPU matmuls hold {capacity} shapes each "
                        "instead of 1,024, since each new batch length adds one and grows the heap; start the "
                        "server with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 and LRU_CACHE_CAPACITY=1024 for the "
                        "libraries' defaults.",
    "padding_free": "padding-free batches: each batch's examples run as one row without padding through "
                    "flash-attention's varlen kernel (position ids keep them apart), so no compute goes to padding "
                    "and every batch holds the same examples as with padding; set padding_free=false to pad.",
    "group_by_length": "length-grouped batches: examples of similar length share a batch, so little compute goes "
                       "to padding; set group_by_length=false for fully random batches.",
    "gradient_checkpointing_off": "gradient checkpointing: off, since the memory estimate without it is under half "
                                  "of the free memory (it would only cost time); set "
                                  "auto_gradient_checkpointing=false to force it on.",
    "float32_autocast_off": "precision: float32 compute instead of bf16 autocast, which is slower on CPUs; set "
                            "auto_precision=false (or bf16=true) to keep bf16.",
    "float32_compute": "precision: this CPU has no bf16 instructions ({basis}), so {layers}the trainable "
                       "parameters (the LoRA adapters) stay float32 instead of the bf16 TRL casts a quantized "
                       "model's adapters to: the same weights, computed more precisely and faster on such CPUs. "
                       "Set auto_precision=false to keep bf16.",
    "lean_lora_dropout": "LoRA dropout ({dropout}): masks drawn from a seed and drawn again in the backward pass, so "
                         "nothing per element is kept instead of float copies of each adapted projection's input; "
                         "set lean_lora_dropout=false for peft's own dropout.",
    "lean_mlp": "LoRA SwiGLU MLPs run as one autograd function that keeps the gate and up outputs and one copy of "
                "its input in the adapter's dtype, and recomputes silu(gate) * up in the backward pass (the same "
                "gradients, less kept per token); set lean_mlp=false for op-by-op autograd.",
    "lean_rmsnorm": "RMSNorm runs as one autograd function with its backward in closed form, keeping x and 1/rms "
                    "(the same outputs, fewer ops; float32 only); set lean_rmsnorm=false for op-by-op autograd.",
    "use_liger_kernel": "Liger kernels: fused RMSNorm, SwiGLU and RoPE (Triton); TRL computes the loss with its own "
                        "chunked LM head, so the logits are never materialized either; set liger_kernel=false to "
                        "turn them off.",
    "torch_compile": "torch.compile: each decoder layer is compiled (one graph shared by all layers, dynamic "
                     "shapes) at the first step, which then takes longer; later steps run the fused kernels. "
                     "torch_compile=false skips it.",
    "release_memory": "memory: the heap's freed pages go back to the OS after each step (malloc_trim), so the peak "
                      "resident memory is the step's own, not the step's plus what earlier steps freed; slower "
                      "steps, since the next step faults the pages in again.",
    "fused_adamw": "optimizer: AdamW with its fused kernel (one kernel for all parameters; the same update); "
                   "optim='adamw_torch' asks for the unfused one.",
}


@dataclass(frozen=True)
class Facts:
    """What the choices depend on besides the config, read from the hardware and the loaded model."""

    has_cuda: bool = False
    bf16_supported: bool = True  # a CUDA GPU's bf16; CPU autocast always has it
    has_flash_attn: bool = False
    has_liger: bool = False
    has_tensorboard: bool = True
    can_reuse_freed_memory: bool = True  # glibc's mallopt
    can_release_freed_memory: bool = True  # glibc's malloc_trim
    cpu_kernel_cache: str | None = None  # ONEDNN_PRIMITIVE_CACHE_CAPACITY as this process runs with it
    engine: str = "transformers"  # or "unsloth", which makes its own speed choices
    attention: str = "sdpa"  # what the model was loaded with
    attention_without_flash: str = "sdpa"  # what it runs when flash-attention 2 is not used
    supports_flash_attention: bool = True
    compute_dtype: str = "bfloat16"
    device_map: Any = "auto"
    lora_dropout: float = 0.0
    memory_is_ample: bool = False  # the memory estimate without gradient checkpointing is under half the free
    cpu_bf16_slowdown: float | None = None  # measured where float32 compute is considered
    cpu_bf16_instructions: bool | None = None
    cpu_bf16_emulated: bool = False
    cpu_bf16_emulation_basis: str = ""
    compute_layers: int = 0  # bitsandbytes layers with a compute dtype
    missing_internals: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # patch -> what moved


@dataclass(frozen=True)
class EngineChoices:
    """How a run trains. Every field but notes and warnings is reported in the answer's effective_config."""

    optim: str
    report_to: tuple[str, ...]
    attn_implementation: str
    bf16: bool
    fp16: bool
    use_cpu: bool
    packing: bool = False
    padding_free: bool = False
    group_by_length: bool = False
    use_gradient_checkpointing: bool = True
    float32_compute: bool = False
    cpu_bf16_slowdown: float | None = None
    cpu_bf16_instructions: bool | None = None
    lean_lora_dropout: bool = False
    lean_mlp: bool = False
    lean_rmsnorm: bool = False
    use_liger_kernel: bool = False
    torch_compile: bool = False
    release_memory: bool = False
    reuse_freed_memory: bool = False
    cpu_kernel_cache_capacity: int | None = None
    notes: tuple[str, ...] = ()  # what the engine chose on its own, and why
    warnings: tuple[str, ...] = ()  # what was asked and cannot run here, and what ran instead

    def effective(self) -> dict[str, Any]:
        """The choices as the answer's effective_config reports them."""
        values = asdict(self)
        del values["notes"], values["warnings"]
        values["report_to"] = list(self.report_to)
        return values


def read_facts(bundle: ModelBundle, config: TrainingConfig) -> Facts:
    """The hardware's and the model's facts; the bf16 timing and the memory estimate only where the config lets
    them matter."""
    hw = detect()
    base = bundle.model.get_base_model() if bundle.engine == "transformers" else None
    slowdown = bf16_slowdown(bundle.model) if config.auto_precision and not (config.bf16 or config.fp16) else None
    emulated = is_emulated(slowdown)
    ample = bundle.engine == "transformers" and config.use_gradient_checkpointing \
        and config.auto_gradient_checkpointing and _memory_is_ample(bundle, config)
    return Facts(
        has_cuda=hw.has_cuda, bf16_supported=hw.bf16_supported, has_flash_attn=hw.has_flash_attn,
        has_liger=importlib.util.find_spec("liger_kernel") is not None,
        has_tensorboard=any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")),
        can_reuse_freed_memory=can_reuse_freed_memory(), can_release_freed_memory=can_release_freed_memory(),
        cpu_kernel_cache=os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        engine=bundle.engine, attention=bundle.attention or "sdpa",
        attention_without_flash=fallback_attention(base) if base is not None else "sdpa",
        supports_flash_attention=bundle.engine == "unsloth" or supports_flash_attention(base),
        compute_dtype=bundle.compute_dtype, device_map=bundle.device_map,
        lora_dropout=float(next(iter(bundle.model.peft_config.values())).lora_dropout),
        memory_is_ample=ample, cpu_bf16_slowdown=slowdown,
        cpu_bf16_instructions=None if slowdown is None else cpu_bf16_instructions(),
        cpu_bf16_emulated=emulated,
        cpu_bf16_emulation_basis=emulation_basis() if emulated else "",
        compute_layers=len(bitsandbytes_compute_layers(bundle.model)) if emulated else 0,
        missing_internals={patch: tuple(missing_internals(patch)) for patch in PATCH_INTERNALS},
    )


def decide(config: TrainingConfig, facts: Facts) -> EngineChoices:
    """Every engine choice for `config` on hardware and a model described by `facts`. Pure: the same inputs give
    the same choices, notes and warnings."""
    d = _Decision(config, facts)
    d.hardware()
    d.layout()
    d.precision()
    d.patches()
    d.memory()
    return EngineChoices(**d.values, notes=tuple(d.notes), warnings=tuple(d.warnings))


class _Decision:
    """The choices being made, with the notes and warnings they add; one method per concern."""

    def __init__(self, config: TrainingConfig, facts: Facts) -> None:
        self.config, self.facts = config, facts
        self.values: dict[str, Any] = {}
        self.notes: list[str] = []
        self.warnings: list[str] = []

    @property
    def autocast(self) -> bool:
        return self.values["bf16"] or self.values["fp16"]

    @property
    def own_engine(self) -> bool:
        """Whether the speed choices are ours (Unsloth makes its own)."""
        return self.facts.engine == "transformers"

    def may_patch(self, patch: str) -> bool:
        missing = self.facts.missing_internals.get(patch, ())
        if missing:
            warning = not_applied(patch, list(missing))
            log.warning(warning)
            self.warnings.append(warning)
        return not missing

    def hardware(self) -> None:
        """Optimizer, logging, attention, offload and mixed precision as this hardware can run them."""
        config, facts, v = self.config, self.facts, self.values
        v["optim"] = config.optim
        if not facts.has_cuda and config.optim in UNPAGED:
            v["optim"] = UNPAGED[config.optim]
            self.warnings.append(f"optim={config.optim!r} pages optimizer state through CUDA unified memory, which "
                                 f"needs a GPU; using {v['optim']!r} (same update, unpaged).")
        v["report_to"] = () if config.report_to == "none" else (config.report_to,)
        if config.report_to == "tensorboard" and not facts.has_tensorboard:
            v["report_to"] = ()
            self.warnings.append("report_to='tensorboard' but tensorboard is not installed in the worker's "
                                 "environment; no event files are written (pip install tensorboard).")
        v["bf16"], v["fp16"] = self._mixed_precision()
        v["attn_implementation"] = self._attention()
        if config.use_cpu_offload and not facts.has_cuda:
            self.warnings.append("use_cpu_offload=true has no effect on a CPU-only machine: the model already "
                                 "lives in CPU memory.")
        elif config.use_cpu_offload:
            self.warnings.append("use_cpu_offload=true: offloading is decided at load time: with device_map='auto' "
                                 "layers that do not fit the GPU were placed in CPU memory; this model was loaded "
                                 f"with device_map={facts.device_map!r}.")
        v["use_cpu"] = not facts.has_cuda

    def _attention(self) -> str:
        config, facts = self.config, self.facts
        attn = facts.attention
        if attn == "flash_attention_2" and not config.use_flash_attention_2 and self.own_engine:
            return facts.attention_without_flash
        if config.use_flash_attention_2 and attn != "flash_attention_2":
            half = self.values["bf16"] or self.values["fp16"]  # flash-attention 2 has no float32 kernels
            if facts.has_flash_attn and facts.supports_flash_attention and half:
                return "flash_attention_2"
            why = ("no CUDA GPU" if not facts.has_cuda else "the flash_attn package is not installed"
                   if not facts.has_flash_attn else "this architecture has no flash-attention 2 implementation"
                   if not facts.supports_flash_attention else "it runs in bf16/fp16 only and this run computes in "
                   "float32 (compute_dtype float32, no bf16/fp16)")
            kernel = "PyTorch SDPA" if attn == "sdpa" else "eager"
            self.warnings.append(f"use_flash_attention_2=true but flash-attention 2 cannot run here ({why}); "
                                 f"using {kernel} attention.")
        return attn

    def _mixed_precision(self) -> tuple[bool, bool]:
        """bf16/fp16 autocast: as asked where the hardware has it, else from the model's compute dtype."""
        config, facts = self.config, self.facts
        if config.bf16 is None and config.fp16 is None:
            bf16 = facts.compute_dtype == "bfloat16"
            fp16 = facts.has_cuda and facts.compute_dtype == "float16"
            if facts.has_cuda and not facts.bf16_supported and bf16:
                bf16, fp16 = False, True
        else:  # one flag given: the other defaults to off
            bf16, fp16 = bool(config.bf16), bool(config.fp16)
        if bf16 and not facts.bf16_supported:
            self.warnings.append("bf16=true is not supported by this GPU; training in fp16 instead.")
            bf16, fp16 = False, True
        if fp16 and not facts.has_cuda:
            self.warnings.append("fp16 mixed precision needs a CUDA GPU; training in bf16 on CPU instead.")
            bf16, fp16 = True, False
        return bf16, fp16

    def layout(self) -> None:
        """Packing, padding-free and length-grouped batches; gradient checkpointing where memory is short."""
        config, v = self.config, self.values
        v["packing"] = config.packing
        v["padding_free"] = bool(config.padding_free) and not config.packing
        v["group_by_length"] = bool(config.group_by_length)
        v["use_gradient_checkpointing"] = config.use_gradient_checkpointing
        if not self.own_engine:
            return
        if config.padding_free is None and not config.packing and v["attn_implementation"] == "flash_attention_2":
            # Only a varlen attention kernel makes this pay: SDPA attends over the whole flattened row with a
            # block-diagonal mask, (sum of lengths)^2 work, which measured slower than length-grouped padding.
            v["padding_free"] = True
            self.notes.append(NOTES["padding_free"])
        if config.group_by_length is None and not (v["padding_free"] or config.packing):
            v["group_by_length"] = True
            self.notes.append(NOTES["group_by_length"])
        if config.use_gradient_checkpointing and config.auto_gradient_checkpointing and self.facts.memory_is_ample:
            v["use_gradient_checkpointing"] = False
            self.notes.append(NOTES["gradient_checkpointing_off"])

    def precision(self) -> None:
        """Float32 rather than bf16 autocast on CPU; float32 4-bit compute and adapters where bf16 is emulated."""
        config, facts, v = self.config, self.facts, self.values
        v["float32_compute"] = False
        v["cpu_bf16_slowdown"] = v["cpu_bf16_instructions"] = None
        if not self.own_engine:
            return
        if config.auto_precision and config.bf16 is None and config.fp16 is None and v["use_cpu"] and v["bf16"]:
            v["bf16"] = False
            self.notes.append(NOTES["float32_autocast_off"])
        if not (config.auto_precision and not self.autocast):
            return
        v["cpu_bf16_slowdown"], v["cpu_bf16_instructions"] = facts.cpu_bf16_slowdown, facts.cpu_bf16_instructions
        if facts.cpu_bf16_emulated and self.may_patch("float32_compute"):
            v["float32_compute"] = True
            layers = (f"the {facts.compute_layers} 4-bit layers multiply in float32 instead of {facts.compute_dtype} "
                      "(their compute dtype comes back after training), and " if facts.compute_layers else "")
            self.notes.append(NOTES["float32_compute"].format(basis=facts.cpu_bf16_emulation_basis, layers=layers))

    def patches(self) -> None:
        """The lean autograd functions, Liger's kernels and torch.compile, each where it can run here."""
        config, facts, v = self.config, self.facts, self.values
        for key in ("lean_lora_dropout", "lean_mlp", "lean_rmsnorm", "use_liger_kernel", "torch_compile"):
            v[key] = False
        if not self.own_engine:
            if config.liger_kernel or config.torch_compile:
                self.warnings.append("liger_kernel and torch_compile apply to the transformers engine; Unsloth uses "
                                     "its own kernels, so they were not applied.")
            return
        v["lean_lora_dropout"] = config.lean_lora_dropout and not self.autocast and facts.lora_dropout > 0 \
            and self.may_patch("lean_lora_dropout")
        if v["lean_lora_dropout"]:
            self.notes.append(NOTES["lean_lora_dropout"].format(dropout=facts.lora_dropout))
        for key in ("lean_mlp", "lean_rmsnorm"):
            v[key] = getattr(config, key) and not self.autocast and self.may_patch(key)
            if v[key]:
                self.notes.append(NOTES[key])
        if config.liger_kernel is not False and not v["use_cpu"] and facts.has_liger:
            v["use_liger_kernel"] = True
            self.notes.append(NOTES["use_liger_kernel"])
        elif config.liger_kernel:
            why = "they are Triton kernels and need a CUDA GPU" if v["use_cpu"] else \
                "liger-kernel is not installed in the worker's environment (pip install liger-kernel)"
            self.warnings.append(f"liger_kernel=true but Liger's kernels cannot run here: {why}; trained with "
                                 "PyTorch's.")
        if config.torch_compile and self.may_patch("torch_compile"):
            v["torch_compile"] = True
            self.notes.append(NOTES["torch_compile"])

    def memory(self) -> None:
        """The CPU heap and kernel caches, and the fused optimizer standing in for a paged one."""
        config, facts, v = self.config, self.facts, self.values
        v["release_memory"] = False
        v["reuse_freed_memory"] = config.reuse_freed_memory and v["use_cpu"] and not config.release_memory \
            and facts.can_reuse_freed_memory
        if v["reuse_freed_memory"]:
            self.notes.append(NOTES["reuse_freed_memory"])
        elif config.reuse_freed_memory:
            why = ("release_memory=true asks for the opposite (freed pages back to the OS each step); it was "
                   "applied" if config.release_memory else "it applies to CPU training with glibc's allocator, not "
                   "here")
            self.warnings.append(f"reuse_freed_memory=true was not applied: {why}.")
        v["cpu_kernel_cache_capacity"] = None
        if v["use_cpu"]:
            value = facts.cpu_kernel_cache or ""
            v["cpu_kernel_cache_capacity"] = int(value) if value.isdigit() else _LIBRARY_KERNEL_CACHE
            if value == CPU_KERNEL_CACHE_CAPACITY["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]:
                self.notes.append(NOTES["cpu_kernel_cache"].format(capacity=v["cpu_kernel_cache_capacity"]))
        if not self.own_engine:
            return
        if config.release_memory and v["use_cpu"] and facts.can_release_freed_memory:
            v["release_memory"] = True
            self.notes.append(NOTES["release_memory"])
        if v["optim"] == "adamw_torch" and config.optim != "adamw_torch":  # our substitute for a paged AdamW
            v["optim"] = "adamw_torch_fused"
            self.notes.append(NOTES["fused_adamw"])


def run_estimate(bundle: ModelBundle, config: TrainingConfig, **overrides: Any) -> Any:
    """memory.estimate of this run on the loaded model (its shape, quantization, LoRA rank, max_length and the
    run's settings; `overrides` for what a caller asks about), or None where the model's shape is unknown."""
    from llm_mcp import memory

    shape = memory.shape_from_config(bundle.model.config.to_dict())
    if shape is None:
        return None
    lora = next(iter(getattr(bundle.model, "peft_config", {}).values()), None)
    settings = dict(quant_type=bundle.quantization, compute_dtype=bundle.compute_dtype,
                    lora_rank=int(getattr(lora, "r", 16)), batch_size=config.batch_size, max_length=bundle.max_length,
                    use_gradient_checkpointing=config.use_gradient_checkpointing, optim=config.optim,
                    with_advice=False, method=config.method, max_completion_length=config.max_completion_length,
                    gradient_accumulation_steps=config.gradient_accumulation_steps)
    return memory.estimate(shape, **{**settings, **overrides})


def _memory_is_ample(bundle: ModelBundle, config: TrainingConfig) -> bool:
    device = "cuda" if detect().has_cuda else "cpu"
    free = _free_bytes(device)
    if free is None:
        return False
    run = run_estimate(bundle, config, use_gradient_checkpointing=False, device=device, free_bytes=free)
    return run is not None and run.total_bytes < 0.5 * free


def _free_bytes(device: str) -> int | None:
    import torch

    from llm_mcp import memory

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    return memory.free_memory("cpu")
