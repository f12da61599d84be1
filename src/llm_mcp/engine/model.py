"""Load a Hugging Face causal LM (4-bit NF4 through bitsandbytes, or unquantized) and attach LoRA (peft).

Every substitution made because this machine cannot do what was asked lands in `ModelBundle.warnings`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_mcp.config import DEFAULT_TARGET_MODULES, LoadConfig
from llm_mcp.engine import quantize as quantization
from llm_mcp.engine.device import detect, torch_dtype
from llm_mcp.errors import EngineError, InvalidArgument
from llm_mcp.paths import stat_kind

log = logging.getLogger(__name__)

# Used only when a tokenizer ships no chat template. ChatML; an assistant turn ends with the EOS token so the
# model learns to stop, and assistant content is marked so TRL can train on the assistant part only.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelBundle:
    """A loaded model (with its LoRA adapter once attached) and tokenizer, and what was done to get there."""

    model: Any  # peft.PeftModel once LoRA is attached; the base model before
    tokenizer: Any
    device: str
    max_length: int
    compute_dtype: str  # "float16" | "bfloat16" | "float32": what really runs
    device_map: str
    engine: str = "transformers"  # or "unsloth": who loaded the model and attaches LoRA
    quantization: str = "none"
    target_modules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nf4_optimized: dict | None = None  # which layers nf4_optimized kept in 16-bit, and why
    linear_weight_bytes: int = 0  # the linear layers' weights as stored (quantized), scales included
    model_weight_bytes: int = 0  # every parameter and buffer as stored

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def param_counts(self) -> tuple[int, int]:
        if self.has_lora:  # peft counts 4-bit packed weights at their real size (two values per byte)
            return self.model.get_nb_trainable_parameters()
        total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in self.model.parameters())
        return 0, total

    def describe(self) -> dict[str, Any]:
        trainable, total = self.param_counts()
        return {
            "trainable_params": int(trainable),
            "total_params": int(total),
            "device": self.device,
            "dtype": self.compute_dtype,
            "engine": self.engine,
            "target_modules": self.target_modules,
            "quantization": self.quantization,
            "memory": {"linear_weight_bytes": self.linear_weight_bytes, "model_weight_bytes": self.model_weight_bytes},
            "nf4_optimized": self.nf4_optimized,
            "warnings": list(self.warnings),
        }


def load_model(config: LoadConfig) -> ModelBundle:
    """The qloraevolved load: base model (NF4 or unquantized) with LoRA attached."""
    warnings: list[str] = []
    dtype = _compute_dtype(config.compute_dtype, warnings)
    quant = config.effective_quant_type
    if quant != config.quant_type:
        warnings.append(
            f"load_in_4bit=false: quant_type={config.quant_type!r} is a 4-bit type, so the model is loaded "
            "unquantized in compute_dtype (plain LoRA)."
        )
    choice = None
    if quant == "nf4_optimized":
        from llm_mcp.engine import sensitivity

        layers = sensitivity.measure(check_source(config.model_name), dtype=dtype)
        kept = sensitivity.choose_kept(layers, config.nf4_optimized_budget, bytes_per_param=dtype.itemsize)
        choice = sensitivity.report(layers, kept, config.nf4_optimized_budget, bytes_per_param=dtype.itemsize)
    bundle = load_base(config.model_name, quant=quant, double_quant=config.use_double_quant, dtype=dtype,
                       device_map=config.device_map, trust_remote_code=config.trust_remote_code,
                       max_length=config.max_length, warnings=warnings,
                       keep_16bit=[k["module"] for k in choice["kept_16bit"]] if choice else None)
    bundle.nf4_optimized = choice
    attach_lora(bundle, r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                target_modules=config.target_modules)
    return bundle


def load_base(model_name: str, *, quant: str, double_quant: bool, dtype: torch.dtype, device_map: str,
              trust_remote_code: bool, max_length: int, warnings: list[str], token: str | None = None,
              keep_16bit: list[str] | None = None) -> ModelBundle:
    """Load a causal LM and its tokenizer with transformers, its linear layers quantized as `quant`."""
    source = check_source(model_name)
    quantization_config = quantization.quantization_config(quant, dtype, double_quant=double_quant,
                                                           warnings=warnings, keep_16bit=keep_16bit)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, token=token)
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization_config, dtype=dtype,
            device_map=_device_map(device_map, warnings), trust_remote_code=trust_remote_code,
            attn_implementation="sdpa", token=token,
        )
    except OSError as exc:
        raise InvalidArgument(
            "model_name", model_name,
            f"a local Hugging Face model folder (with config.json) or a hub id reachable from here ({exc})",
        ) from None
    except ValueError as exc:
        raise EngineError(f"loading model_name={model_name!r} failed: {exc}") from None
    avoid_cpu_repack_bug(model)
    fix_tokenizer(tokenizer, model, max_length)
    quantization.quantize_after_load(model, quant, warnings)  # int4/fp8: torchao, in place
    weight_bytes = quantization.linear_weight_bytes(model)
    if quantization_config is not None:  # bitsandbytes; it would upcast (dequantize) torchao tensors
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts norms; gradient checkpointing is the trainer's business.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return ModelBundle(model, tokenizer, detect().device, max_length, str(dtype).removeprefix("torch."),
                       device_map, quantization=quant, warnings=warnings, linear_weight_bytes=weight_bytes,
                       model_weight_bytes=quantization.model_weight_bytes(model))


def attach_lora(bundle: ModelBundle, *, r: int, alpha: float, dropout: float,
                target_modules: tuple[str, ...] | None) -> None:
    """Attach a LoRA adapter with peft (the qloraevolved path, and the unsloth family's fallback)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_target_modules(bundle.model, target_modules, bundle.warnings)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    bundle.model = get_peft_model(bundle.model, lora)
    bundle.target_modules = targets


def check_source(name: str) -> str:
    path = Path(os.path.expanduser(name))
    if name.startswith((".", "/", "~")) or stat_kind(path) is not None:
        if stat_kind(path / "config.json") != "file":
            raise InvalidArgument(
                "model_name", name,
                "an existing model folder containing config.json, or a hub id like 'Qwen/Qwen2.5-0.5B'"
                + (" (the folder has no config.json)" if stat_kind(path) == "dir" else " (no such folder)"),
            )
        return str(path.resolve())
    return name


def _compute_dtype(wanted: str, warnings: list[str]) -> torch.dtype:
    hw = detect()
    if wanted == "bfloat16" and not hw.bf16_supported:
        warnings.append("compute_dtype='bfloat16' is not supported by this GPU; using float16 instead.")
        return torch.float16
    if wanted == "float16" and not hw.has_cuda:
        warnings.append("compute_dtype='float16' has no fast path on CPU; using bfloat16 instead.")
        return torch.bfloat16
    return torch_dtype(wanted)


def _device_map(device_map: str, warnings: list[str]) -> Any:
    if detect().has_cuda:
        return device_map
    if device_map not in ("auto", "cpu"):
        warnings.append(f"device_map={device_map!r} needs a GPU, and none is available; loaded on CPU.")
    return {"": "cpu"}


def avoid_cpu_repack_bug(model: Any) -> None:
    # bitsandbytes 0.50 on avx512_bf16 CPUs repacks 4-bit weights in place on the first no-grad forward and never
    # unpacks them, after which LoRA gradients through those layers are wrong. Turning the fast path off avoids it.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def fix_tokenizer(tokenizer: Any, model: Any, max_length: int) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.eos_token is None:
        raise InvalidArgument("model_name", model.name_or_path, "a model whose tokenizer defines an EOS token")
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.model_max_length = max_length
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can wrap (plain or 4-bit), lm_head excluded."""
    names = set()
    for full_name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("Linear", "Linear4bit", "Linear8bitLt") and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: Any, wanted: tuple[str, ...] | None, warnings: list[str]) -> list[str]:
    available = _linear_names(model)
    if wanted is not None:
        missing = [m for m in wanted if m not in available]
        if missing:
            raise InvalidArgument("target_modules", list(wanted), f"names of linear layers in this model: {available}")
        return list(wanted)
    targets = [m for m in DEFAULT_TARGET_MODULES if m in available]
    if not targets:
        warnings.append(f"none of the default target modules exist in this model; LoRA targets all its linear "
                        f"layers instead: {available}")
        targets = available
    return targets
