"""Whether a checkpoint's LoRA adapter fits the loaded model: base model, rank per module, target modules, and the
tensor shapes. Read from adapter_config.json and the safetensors header; no tensor is loaded.

Resuming another model's checkpoint otherwise fails deep in torch with "size mismatch" naming no file, or, where
the shapes happen to agree, silently continues another model's run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp.errors import InvalidArgument

_SHOWN_TENSORS = 3  # tensor differences named in a refusal; the rest are counted


@dataclass(frozen=True)
class LoraShape:
    """What decides whether an adapter's tensors fit a model's LoRA layers."""

    base: str | None  # the base model's folder or hub name, where recorded
    r: int
    rank_pattern: tuple[tuple[str, int], ...]
    targets: tuple[str, ...] | str  # module names, or peft's regular expression
    target_parameters: tuple[str, ...]

    def describe(self) -> str:
        on = f"[{', '.join(self.targets)}]" if isinstance(self.targets, tuple) else repr(self.targets)
        text = f"LoRA r={self.r} on {on}"
        if self.rank_pattern:
            text += f" (r per module: {dict(self.rank_pattern)})"
        if self.target_parameters:
            text += f" and parameters [{', '.join(self.target_parameters)}]"
        return text + (f" of model {self.base}" if self.base else "")

    def differences(self, live: "LoraShape") -> list[str]:
        """What differs, each as '<what>: <here in the checkpoint> there, <in the model> here'."""
        found = []
        if self.base and live.base and self.base != live.base:
            found.append(f"base model: {self.base} there, {live.base} here")
        for what, there, here in (("rank r", self.r, live.r), ("r per module", self.rank_pattern, live.rank_pattern),
                                  ("target modules", self.targets, live.targets),
                                  ("target parameters", self.target_parameters, live.target_parameters)):
            if there != here:
                found.append(f"{what}: {_shown(there)} there, {_shown(here)} here")
        return found


def lora_shape(config: Any) -> LoraShape:
    """The shape of a peft LoraConfig, or of the dict adapter_config.json holds."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    base = get("base_model_name_or_path")
    targets = get("target_modules") or ()
    return LoraShape(
        base=Path(str(base).rstrip("/")).name if base else None,
        r=int(get("r") or 0),
        rank_pattern=tuple(sorted((str(k), int(v)) for k, v in (get("rank_pattern") or {}).items())),
        targets=targets if isinstance(targets, str) else tuple(sorted(targets)),
        target_parameters=tuple(sorted(get("target_parameters") or ())),
    )


def check_resume_fits(checkpoint: Path, model: Any) -> None:
    """Refuse (InvalidArgument naming both shapes) a checkpoint whose adapter does not fit the model's LoRA."""
    from peft.utils import CONFIG_NAME

    config_file = checkpoint / CONFIG_NAME
    if not config_file.is_file():  # not a peft checkpoint: the trainer says what it cannot load
        return
    adapter = model.active_adapter
    saved, live = lora_shape(json.loads(config_file.read_text())), lora_shape(model.peft_config[adapter])
    differences = saved.differences(live) or _tensor_differences(checkpoint, model, adapter)
    if differences:
        raise InvalidArgument(
            "resume_from_checkpoint", str(checkpoint),
            f"a checkpoint of an adapter shaped like this model's; {checkpoint.name} holds {saved.describe()}, "
            f"this model has {live.describe()} ({'; '.join(differences)}). Resume from a checkpoint of this "
            "model's own run, load the model with the checkpoint's LoRA settings, or pass "
            "resume_from_checkpoint=false with another output_dir")


def _tensor_differences(checkpoint: Path, model: Any, adapter: str) -> list[str]:
    """Tensors missing on either side or shaped differently: peft's own state dict of the live adapter (the names
    it saves under) against the checkpoint's safetensors header."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors import safe_open

    weights = checkpoint / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        return []
    live = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    with safe_open(str(weights), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    found = [f"{k} is {list(saved[k])} there, {list(live[k])} here" for k in sorted(saved.keys() & live.keys())
             if saved[k] != live[k]]
    found += [f"{k} is only there" for k in sorted(saved.keys() - live.keys())]
    found += [f"{k} is only here" for k in sorted(live.keys() - saved.keys())]
    if len(found) > _SHOWN_TENSORS:
        found = found[:_SHOWN_TENSORS] + [f"{len(found) - _SHOWN_TENSORS} more tensors differ"]
    return found


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return f"[{', '.join(value)}]"
    if isinstance(value, tuple):
        return str(dict(value)) if value else "none"
    return str(value)
