"""Load a Hugging Face causal LM (4-bit NF4 through bitsandbytes, or unquantized) and attach LoRA (peft).

Every substitution made because this machine cannot do what was asked lands in `ModelBundle.warnings`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_mcp.config import NOT_DEFAULT_LORA_TARGETS, LoadConfig
from llm_mcp.engine.load import quantize as quantization
from llm_mcp.engine.device import detect, torch_dtype
from llm_mcp.errors import EngineError, InvalidArgument
from llm_mcp.paths import stat_kind

log = logging.getLogger(__name__)

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
    attention: str | None = None  # attn_implementation the model was loaded with (eager | sdpa | flash_attention_2)
    target_parameters: list[str] = field(default_factory=list)  # fused 3-D expert weights adapted by LoRA
    load_config: Any = None  # what the model was loaded from: the ranks of a run across processes load the same

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
            "target_parameters": self.target_parameters,
            "attention": self.attention,
            "quantization": self.quantization,
            "memory": {"linear_weight_bytes": self.linear_weight_bytes, "model_weight_bytes": self.model_weight_bytes},
            "nf4_optimized": self.nf4_optimized,
            "warnings": list(self.warnings),
        }


def load_model(config: LoadConfig, adapter_dir: str | None = None, *, shardable: bool = False) -> ModelBundle:
    """The qloraevolved load: base model (NF4 or unquantized) with LoRA attached (the saved one in adapter_dir).
    shardable: 4-bit weights stored so that FSDP2 shards them (a rank of a run with distributed_strategy='fsdp')."""
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
        from llm_mcp.engine.load import sensitivity

        layers = sensitivity.measure(check_source(config.model_name), dtype=dtype)
        kept = sensitivity.choose_kept(layers, config.nf4_optimized_budget, bytes_per_param=dtype.itemsize)
        choice = sensitivity.report(layers, kept, config.nf4_optimized_budget, bytes_per_param=dtype.itemsize)
    bundle = load_base(config.model_name, quant=quant, double_quant=config.use_double_quant, dtype=dtype,
                       device_map=config.device_map, trust_remote_code=config.trust_remote_code,
                       max_length=config.max_length, warnings=warnings,
                       keep_16bit=[k["module"] for k in choice["kept_16bit"]] if choice else None,
                       chat_template=config.chat_template, shardable=shardable)
    bundle.nf4_optimized = choice
    if adapter_dir is not None:
        from llm_mcp.engine.load.sources import attach_adapter

        attach_adapter(bundle, adapter_dir)
        return bundle
    attach_lora(bundle, r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                target_modules=config.target_modules)
    return bundle


def load_base(model_name: str, *, quant: str, double_quant: bool, dtype: torch.dtype, device_map: str,
              trust_remote_code: bool, max_length: int, warnings: list[str], token: str | None = None,
              keep_16bit: list[str] | None = None, chat_template: str | None = None,
              shardable: bool = False) -> ModelBundle:
    """Load a causal LM and its tokenizer with transformers, its linear layers quantized as `quant`."""
    source = check_source(model_name)
    quantization_config = quantization.quantization_config(quant, dtype, double_quant=double_quant,
                                                           warnings=warnings, keep_16bit=keep_16bit,
                                                           shardable=shardable)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, token=token)
        attention = choose_attention(source, trust_remote_code=trust_remote_code, token=token, warnings=warnings,
                                     half_precision=dtype in (torch.float16, torch.bfloat16))
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization_config, dtype=dtype,
            device_map=_device_map(device_map, warnings), trust_remote_code=trust_remote_code,
            attn_implementation=attention, token=token,
        )
    except OSError as exc:
        raise InvalidArgument(
            "model_name", model_name,
            f"a local Hugging Face model folder (with config.json) or a hub id reachable from here ({exc})",
        ) from None
    except ValueError as exc:
        raise EngineError(f"loading model_name={model_name!r} failed: {exc}") from None
    avoid_cpu_repack_bug(model)
    fix_tokenizer(tokenizer, model, max_length, chat_template=chat_template, warnings=warnings)
    quantization.quantize_after_load(model, quant, warnings)  # int4/fp8: torchao, in place
    weight_bytes = quantization.linear_weight_bytes(model)
    if quantization_config is not None:  # bitsandbytes; it would upcast (dequantize) torchao tensors
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts norms; gradient checkpointing is the trainer's business.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _experts_to(model, dtype)  # peft upcast them to float32 with the norms: they are most of an MoE's bytes
    if quant != "none":
        warnings.extend(unquantized_experts_warning(model, quant))
    return ModelBundle(model, tokenizer, detect().device, max_length, str(dtype).removeprefix("torch."),
                       device_map, quantization=quant, warnings=warnings, linear_weight_bytes=weight_bytes,
                       model_weight_bytes=quantization.model_weight_bytes(model), attention=attention)


def attach_lora(bundle: ModelBundle, *, r: int, alpha: float, dropout: float,
                target_modules: tuple[str, ...] | None) -> None:
    """Attach a LoRA adapter with peft (the qloraevolved path, and the unsloth family's fallback)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_target_modules(bundle.model, target_modules, bundle.warnings)
    # peft cannot apply dropout to parameter-targeted experts (LoRA there multiplies the weight, not the input),
    # so the adapter is built without dropout and the module adapters get theirs afterwards.
    expert_dropout_off = bool(targets.parameters) and dropout > 0
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if expert_dropout_off else dropout,
                      target_modules=targets.modules, target_parameters=targets.parameters or None, bias="none",
                      task_type="CAUSAL_LM")
    bundle.model = get_peft_model(bundle.model, lora)
    if expert_dropout_off:
        _set_module_dropout(bundle.model, dropout)
        bundle.warnings.append(f"lora_dropout={dropout} applies to the adapted linear layers; the experts' LoRA "
                               f"({', '.join(targets.parameters)}) trains without dropout, which peft cannot apply to "
                               "parameter-targeted weights.")
    bundle.target_modules = targets.modules
    bundle.target_parameters = targets.parameters


def _set_module_dropout(model: Any, p: float) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p)


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


def fix_tokenizer(tokenizer: Any, model: Any, max_length: int, *, chat_template: str | None = None,
                  warnings: list[str] | None = None) -> None:
    """Pad and EOS tokens, the length limit, and the chat template (the tokenizer's own, the one asked for, or
    the ChatML fallback, said in warnings: data/chat_templates.py); generation stops at the template's
    end-of-turn token as well as at EOS, also in every export's generation_config."""
    from llm_mcp.data.chat_templates import use_chat_template

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.eos_token is None:
        raise InvalidArgument("model_name", model.name_or_path, "a model whose tokenizer defines an EOS token")
    choice = use_chat_template(tokenizer, chat_template)
    if warnings is not None:
        warnings.extend(choice.warnings)
    generation = getattr(model, "generation_config", None)
    if choice.end_of_turn is not None and generation is not None:
        configured = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        stop = [i for i in dict.fromkeys([*configured, tokenizer.eos_token_id,
                                          tokenizer.convert_tokens_to_ids(choice.end_of_turn)]) if i is not None]
        generation.eos_token_id = stop if len(stop) > 1 else stop[0]
    tokenizer.model_max_length = max_length
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# Module classes LoRA can wrap: torch Linear (also under torchao's quantized weights), bitsandbytes' 4/8-bit
# layers and GPT-2's Conv1D (peft handles its transposed weight with fan_in_fan_out).
_ADAPTABLE = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")


@dataclass(frozen=True)
class LoraTargets:
    modules: list[str]  # leaf names of linear layers (peft target_modules)
    parameters: list[str]  # paths inside a decoder layer of fused 3-D expert weights (peft target_parameters)


def _linear_names(model: Any) -> list[str]:
    """Leaf names of the layers LoRA can wrap (linear, 4/8-bit, Conv1D), the output head excluded, in the order a
    decoder layer runs them (q, k, v, o, gate, up, down for Llama)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, None] = {}
    for full_name, module in model.named_modules():
        if type(module).__name__ in _ADAPTABLE and module is not output and not full_name.endswith("lm_head"):
            names[full_name.rsplit(".", 1)[-1]] = None
    return list(names)


def expert_parameters(model: Any) -> list[str]:
    """Fused expert weights (3-D parameters such as transformers 5's mlp.experts.gate_up_proj), as their path
    inside a decoder layer: the names peft's target_parameters matches in every layer."""
    return sorted({re.sub(r"^(?:.*\.)?\d+\.", "", name) for name, p in model.named_parameters() if p.dim() == 3})


def resolve_target_modules(model: Any, wanted: tuple[str, ...] | None, warnings: list[str]) -> LoraTargets:
    """The LoRA targets: by default every linear projection of attention and MLP (fused ones and Conv1D
    included) and the experts' fused weights; or exactly the names given."""
    available, experts = _linear_names(model), expert_parameters(model)
    if wanted is not None:
        by_leaf = {e.rsplit(".", 1)[-1]: e for e in experts}
        missing = [m for m in wanted if m not in available and m not in experts and m not in by_leaf]
        if missing:
            raise InvalidArgument("target_modules", list(wanted), f"names of linear layers in this model: "
                                                                  f"{available}" + (f", or expert weights: {experts}"
                                                                                    if experts else ""))
        modules = [m for m in wanted if m in available]
        return LoraTargets(modules, sorted({by_leaf.get(m, m) for m in wanted if m not in available}))
    modules = [m for m in available if m not in NOT_DEFAULT_LORA_TARGETS]
    if not modules and not experts:
        raise InvalidArgument("model_name", getattr(model, "name_or_path", "(this model)"),
                              "a model with linear layers LoRA can adapt (found none besides the output head)")
    skipped = sorted(set(available) - set(modules) - {"lm_head", "embed_out"})
    if skipped:
        warnings.append(f"LoRA is not attached to {skipped} by default (expert routers and gates: adapting them "
                        f"shifts which experts run); name them in target_modules to adapt them too.")
    return LoraTargets(modules, experts)


def _experts_to(model: Any, dtype: torch.dtype) -> None:
    for param in model.parameters():
        if param.dim() == 3 and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def unquantized_experts_warning(model: Any, quant: str) -> list[str]:
    """A warning when fused expert weights stayed unquantized (bitsandbytes and torchao quantize Linear layers)."""
    experts = [(n, p) for n, p in model.named_parameters() if p.dim() == 3]
    if not experts:
        return []
    expert_bytes = sum(p.numel() * p.element_size() for _, p in experts)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return [f"quant_type={quant!r} quantizes linear layers only: the experts' fused weights "
            f"({', '.join(expert_parameters(model))}) stay in {str(experts[0][1].dtype).removeprefix('torch.')}, "
            f"{expert_bytes / max(total, 1):.0%} of the model's weight bytes."]


def choose_attention(source: str, *, trust_remote_code: bool, token: str | None, warnings: list[str],
                     half_precision: bool = True) -> str | None:
    """The attention kernel to load with: flash-attention 2 on CUDA where flash_attn is installed and the
    architecture has it, PyTorch SDPA where the architecture supports it, eager otherwise. None leaves the choice
    to transformers (remote-code models)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, token=token)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, OSError, ValueError):
        warnings.append("this model's architecture is not one transformers knows by name; its attention kernel is "
                        "transformers' default for it.")
        return None
    # flash-attention 2 computes in float16/bfloat16 only; generate and evaluate run without autocast
    if half_precision and detect().has_flash_attn and getattr(model_class, "_supports_flash_attn", False):
        return "flash_attention_2"
    if getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    warnings.append(f"{model_class.__name__} does not support PyTorch SDPA attention; it runs eager attention "
                    f"(the reference implementation: correct, slower and more memory-hungry on long sequences).")
    return "eager"


def supports_flash_attention(model: Any) -> bool:
    return bool(getattr(type(model), "_supports_flash_attn", False))


def fallback_attention(model: Any) -> str:
    """The kernel to use when flash-attention 2 is not wanted: SDPA where the architecture has it, else eager."""
    return "sdpa" if getattr(type(model), "_supports_sdpa", False) else "eager"
