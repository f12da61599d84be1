"""The unsloth family's loading and LoRA: Unsloth's FastLanguageModel where it imports, else our transformers path.

`import unsloth` must precede transformers/trl/peft, so this module is the first engine import of an unsloth
worker. Training is the shared engine/train/run.py (TRL's SFTTrainer, which Unsloth patches). Every answer says
which engine ran; a fallback is never presented as Unsloth.
"""

from __future__ import annotations

import logging

try:  # must come first: Unsloth patches transformers, trl and peft as it imports
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    UNSLOTH_UNAVAILABLE: str | None = None
except Exception as exc:  # ImportError, or NotImplementedError ("cannot find any torch accelerator")
    FastLanguageModel = None
    UNSLOTH_UNAVAILABLE = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

import torch

from llm_mcp.config import LoraSpec, UnslothLoadConfig
from llm_mcp.engine.load import model as engine_model
from llm_mcp.engine.device import detect
from llm_mcp.engine.load.model import ModelBundle

log = logging.getLogger(__name__)

INSTALL_HINT = ("To run Unsloth, start the server with --unsloth-python pointing at an environment where "
                "`import unsloth` works (see the README's Unsloth section).")


def load_model(config: UnslothLoadConfig) -> ModelBundle:
    """Load the base model (4-bit when asked); LoRA comes at prepare time, as in Unsloth's own flow."""
    if FastLanguageModel is None:
        return _load_with_transformers(config)
    source = engine_model.check_source(config.model_name)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=config.max_seq_length, dtype=None, load_in_4bit=config.load_in_4bit,
        token=config.token, device_map=config.device_map if detect().has_cuda else "cpu",
    )
    engine_model.avoid_cpu_repack_bug(model)
    warnings: list[str] = []
    engine_model.fix_tokenizer(tokenizer, model, config.max_seq_length, chat_template=config.chat_template,
                               warnings=warnings)
    dtype = str(getattr(model.config, "dtype", None) or model.dtype).removeprefix("torch.")
    return ModelBundle(model, tokenizer, detect().device, config.max_seq_length, dtype, config.device_map,
                       engine="unsloth", quantization="nf4" if config.load_in_4bit else "none", warnings=warnings)


def _load_with_transformers(config: UnslothLoadConfig) -> ModelBundle:
    hw = detect()
    dtype = torch.bfloat16 if hw.bf16_supported else torch.float16
    warnings = [f"Unsloth could not be imported here ({UNSLOTH_UNAVAILABLE}); the transformers engine (bitsandbytes "
                f"+ peft + TRL) ran instead, with the same defaults. {INSTALL_HINT}"]
    bundle = engine_model.load_base(config.model_name, quant="nf4" if config.load_in_4bit else "none",
                                    double_quant=True, dtype=dtype,
                                    device_map=config.device_map, trust_remote_code=False,
                                    max_length=config.max_seq_length, warnings=warnings, token=config.token,
                                    chat_template=config.chat_template)
    return bundle


def attach_lora(bundle: ModelBundle, lora: LoraSpec) -> None:
    if bundle.engine != "unsloth":
        engine_model.attach_lora(bundle, r=lora.r, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                                 target_modules=lora.target_modules)
        return
    targets = engine_model.resolve_target_modules(bundle.model, lora.target_modules, bundle.warnings)
    if targets.parameters:
        bundle.warnings.append(f"Unsloth's get_peft_model adapts modules only: the experts' fused weights "
                               f"({', '.join(targets.parameters)}) are not trained.")
    bundle.model = FastLanguageModel.get_peft_model(
        bundle.model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=targets.modules, bias="none", use_gradient_checkpointing=lora.gradient_checkpointing,
        random_state=lora.seed,
    )
    bundle.target_modules = targets.modules
