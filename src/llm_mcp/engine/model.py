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
from llm_mcp.engine.device import detect, torch_dtype
from llm_mcp.errors import EngineError, InvalidArgument

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
    """A loaded model with its LoRA adapter and tokenizer, and what was done to get there."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    config: LoadConfig
    device: str
    target_modules: list[str]
    warnings: list[str] = field(default_factory=list)
    is_prepared: bool = False

    def param_counts(self) -> tuple[int, int]:
        # peft counts 4-bit packed weights at their real size (two values per byte)
        return self.model.get_nb_trainable_parameters()

    def describe(self) -> dict[str, Any]:
        trainable, total = self.param_counts()
        return {
            "trainable_params": int(trainable),
            "total_params": int(total),
            "device": self.device,
            "target_modules": self.target_modules,
            "quantization": self.config.effective_quant_type,
            "warnings": list(self.warnings),
        }


def load_model(config: LoadConfig, *, backend: str = "qlora") -> ModelBundle:
    if backend != "qlora":
        raise EngineError(f"backend {backend!r} is not available in this worker")
    hw = detect()
    warnings: list[str] = []
    source = _check_source(config.model_name)
    dtype = _compute_dtype(config, warnings)
    quantization_config = _quantization(config, dtype, warnings)
    device_map = _device_map(config, warnings)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization_config, dtype=dtype, device_map=device_map,
            trust_remote_code=config.trust_remote_code, attn_implementation="sdpa",
        )
    except (OSError, ValueError) as exc:
        raise InvalidArgument(
            "model_name", config.model_name,
            f"a local Hugging Face model folder (with config.json) or a hub id reachable from here ({exc})",
        ) from None
    _avoid_cpu_repack_bug(model)
    _fix_tokenizer(tokenizer, model, config.max_length)

    if quantization_config is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts norms; gradient checkpointing is the trainer's business (prepare step).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = _target_modules(model, config.target_modules, warnings)
    peft_model = _attach_lora(model, config, targets)
    return ModelBundle(peft_model, tokenizer, config, hw.device, targets, warnings)


def _check_source(name: str) -> str:
    path = Path(os.path.expanduser(name))
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise InvalidArgument(
                "model_name", name,
                "an existing model folder containing config.json, or a hub id like 'Qwen/Qwen2.5-0.5B'"
                + (" (the folder has no config.json)" if path.is_dir() else " (no such folder)"),
            )
        return str(path.resolve())
    return name


def _compute_dtype(config: LoadConfig, warnings: list[str]) -> torch.dtype:
    hw = detect()
    wanted = config.compute_dtype
    if wanted == "bfloat16" and not hw.bf16_supported:
        warnings.append("compute_dtype='bfloat16' is not supported by this GPU; using float16 instead.")
        return torch.float16
    if wanted == "float16" and not hw.has_cuda:
        warnings.append("compute_dtype='float16' has no fast path on CPU; using bfloat16 instead.")
        return torch.bfloat16
    return torch_dtype(wanted)


def _quantization(config: LoadConfig, dtype: torch.dtype, warnings: list[str]) -> Any:
    quant = config.effective_quant_type
    if quant != config.quant_type:
        warnings.append(
            f"load_in_4bit=false: quant_type={config.quant_type!r} is a 4-bit type, so the model is loaded "
            "unquantized in compute_dtype (plain LoRA)."
        )
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    assert quant == "nf4", f"quant_type {quant} reached the engine unimplemented"
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=config.use_double_quant,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
    )


def _device_map(config: LoadConfig, warnings: list[str]) -> Any:
    if detect().has_cuda:
        return config.device_map
    if config.device_map not in ("auto", "cpu"):
        warnings.append(f"device_map={config.device_map!r} needs a GPU, and none is available; loaded on CPU.")
    return {"": "cpu"}


def _avoid_cpu_repack_bug(model: Any) -> None:
    # bitsandbytes 0.50 on avx512_bf16 CPUs repacks 4-bit weights in place on the first no-grad forward and never
    # unpacks them, after which LoRA gradients through those layers are wrong. Turning the fast path off avoids it.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _fix_tokenizer(tokenizer: Any, model: Any, max_length: int) -> None:
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


def _target_modules(model: Any, wanted: tuple[str, ...] | None, warnings: list[str]) -> list[str]:
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


def _attach_lora(model: Any, config: LoadConfig, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
