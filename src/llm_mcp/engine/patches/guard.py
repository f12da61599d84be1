"""What library internals each engine patch relies on, and whether the installed libraries still have them.

The patches (lean_lora, lean_mlp, lean_norm, regional_compile, float32_compute) swap classes, set instance forwards
and write attributes that belong to torch, transformers, peft, bitsandbytes and TRL. An upgrade that moves one of
those would make a patch train wrongly or quietly do nothing, so the engine checks a patch's declaration here
before applying it and trains with the library's own code where something is gone. Applies no patch itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass
from types import CodeType
from typing import Any

from llm_mcp.engine.patches.lean_norm import RMSNORM_CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Internal:
    """`attribute` of the module or class at `path`, in the distribution `library`. With `used_by`, the name must
    appear in that method's code instead (an instance attribute its __init__ sets, or one its forward reads)."""

    library: str
    path: str
    attribute: str
    used_by: str = ""

    def describe(self) -> str:
        owner = self.path.rsplit(".", 1)[-1]
        possessive = f"{self.library}'" if self.library.endswith("s") else f"{self.library}'s"
        if self.used_by:
            return f"{possessive} {owner}.{self.used_by} using .{self.attribute}"
        return f"{possessive} {owner}.{self.attribute}"


def _used_by(library: str, path: str, method: str, *attributes: str) -> tuple[Internal, ...]:
    return tuple(Internal(library, path, attribute, method) for attribute in attributes)


_LORA_LAYER = "peft.tuners.lora.layer.LoraLayer"
# the LoRA layers over plain and 4-bit linears: forward computes base(x) + lora_B(lora_A(dropout(x))) * scaling
_LORA_LINEARS = ("peft.tuners.lora.layer.Linear", "peft.tuners.lora.bnb.Linear4bit")
# transformers' SwiGLU MLPs of the families lean_mlp is for (it recognises any *MLP of this shape)
_SWIGLU_MLPS = ("llama.modeling_llama.LlamaMLP", "qwen2.modeling_qwen2.Qwen2MLP", "qwen3.modeling_qwen3.Qwen3MLP",
                "mistral.modeling_mistral.MistralMLP", "qwen2_moe.modeling_qwen2_moe.Qwen2MoeMLP",
                "qwen3_moe.modeling_qwen3_moe.Qwen3MoeMLP")
# lean_norm recognises its RMSNorms by class name; where each lives in transformers
_RMSNORM_MODULES = {"LlamaRMSNorm": "llama", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
                    "MistralRMSNorm": "mistral", "Qwen2MoeRMSNorm": "qwen2_moe", "Qwen3MoeRMSNorm": "qwen3_moe",
                    "MixtralRMSNorm": "mixtral", "Phi3RMSNorm": "phi3"}

_LEAN_LORA_DROPOUT = (
    # found by these names: a ModuleDict of nn.Dropout and one of the plain nn.Linear A matrices, per adapter
    *_used_by("peft", _LORA_LAYER, "__init__", "lora_dropout", "lora_A"),
    # the dropout moves into lora_A, which is right only while forward applies lora_A to dropout(x)
    *(i for path in _LORA_LINEARS for i in _used_by("peft", path, "forward", "lora_dropout", "lora_A")),
    *_used_by("torch", "torch.nn.Dropout", "__init__", "p"),
)

_LEAN_MLP = (
    *(i for path in _SWIGLU_MLPS for i in _used_by(
        "transformers", f"transformers.models.{path}", "forward", "gate_proj", "up_proj", "down_proj", "act_fn")),
    # read to decide that a projection is plain LoRA: a layer with a variant (DoRA) must keep peft's forward
    *(Internal("peft", _LORA_LAYER, name) for name in ("merged", "disable_adapters", "active_adapters",
                                                        "get_base_layer")),
    *_used_by("peft", _LORA_LAYER, "__init__", "lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant"),
    *(i for path in _LORA_LINEARS for i in _used_by(
        "peft", path, "forward", "base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant")),
    # 4-bit bases are recognised by these class names and their gradient dequantized as bitsandbytes does
    Internal("bitsandbytes", "bitsandbytes.nn", "Linear4bit"),
    Internal("bitsandbytes", "bitsandbytes.nn", "Params4bit"),
    *_used_by("bitsandbytes", "bitsandbytes.nn.Linear4bit", "forward", "compute_dtype"),
    *_used_by("bitsandbytes", "bitsandbytes.nn.Params4bit", "__new__", "quant_state"),
    Internal("bitsandbytes", "bitsandbytes.functional", "dequantize_4bit"),
)

_LEAN_RMSNORM = tuple(
    i for name in RMSNORM_CLASSES for i in _used_by(
        "transformers", f"transformers.models.{_RMSNORM_MODULES[name]}.modeling_{_RMSNORM_MODULES[name]}.{name}",
        "forward", "weight", "variance_epsilon"))

_TORCH_COMPILE = (
    Internal("torch", "torch.nn.Module", "compile"),
    # compile() stores the compiled call there and every call runs it unless it is None, which restores eager
    Internal("torch", "torch.nn.Module", "_compiled_call_impl"),
    *_used_by("torch", "torch.nn.Module", "compile", "_compiled_call_impl"),
    *_used_by("torch", "torch.nn.Module", "_wrapped_call_impl", "_compiled_call_impl"),
)

_FLOAT32_COMPUTE = (
    # the 4-bit layers' compute dtype, set at construction and cast to in forward
    *_used_by("bitsandbytes", "bitsandbytes.nn.Linear4bit", "__init__", "compute_dtype"),
    *_used_by("bitsandbytes", "bitsandbytes.nn.Linear4bit", "forward", "compute_dtype"),
    # building SFTTrainer casts a quantized model's trainable tensors in place (param.data), which is undone
    *_used_by("trl", "trl.trainer.sft_trainer.SFTTrainer", "__init__", "data", "bfloat16"),
)

_FLOAT_WEIGHTS = (
    # found by class; its weight dequantized as bitsandbytes does, then multiplied as its forward does
    Internal("bitsandbytes", "bitsandbytes.nn", "Linear4bit"),
    *_used_by("bitsandbytes", "bitsandbytes.nn.Linear4bit", "forward", "compute_dtype", "weight", "bias"),
    *_used_by("bitsandbytes", "bitsandbytes.nn.Params4bit", "__new__", "quant_state"),
    Internal("bitsandbytes", "bitsandbytes.functional", "dequantize_4bit"),
    # peft's LoRA layer over a 4-bit one: what decides that it runs one plain adapter, and what forward reads
    *(Internal("peft", _LORA_LAYER, name) for name in ("merged", "disable_adapters", "active_adapters")),
    *_used_by("peft", _LORA_LAYER, "__init__", "lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant",
              "base_layer"),
    *_used_by("peft", "peft.tuners.lora.bnb.Linear4bit", "forward", "base_layer", "lora_A", "lora_B",
              "lora_dropout", "scaling", "lora_variant"),
)

# engine choice (TrainingConfig flag / effective_config key, or float_weights while generating) -> the internals
# its patch relies on
PATCH_INTERNALS: dict[str, tuple[Internal, ...]] = {
    "lean_lora_dropout": _LEAN_LORA_DROPOUT,
    "lean_mlp": _LEAN_MLP,
    "lean_rmsnorm": _LEAN_RMSNORM,
    "torch_compile": _TORCH_COMPILE,
    "float32_compute": _FLOAT32_COMPUTE,
    "float_weights": _FLOAT_WEIGHTS,
}


def missing_internals(patch: str) -> list[str]:
    """What of `patch`'s declaration the installed libraries lack, each naming the library and its version."""
    return [f"{internal.describe()} ({_not_found_in(internal.library)})"
            for internal in PATCH_INTERNALS[patch] if not _is_present(internal)]


def may_apply(patch: str, warnings: list[str] | None = None, *, ran: str = "trained") -> bool:
    """Whether `patch` may be applied here; where it may not, a warning (logged, and added to `warnings`) names
    what moved and says the run used the library's own code (`ran`: what the run did, e.g. 'trained')."""
    missing = missing_internals(patch)
    if missing:
        warning = not_applied(patch, missing, ran)
        log.warning(warning)
        if warnings is not None:
            warnings.append(warning)
    return not missing


def not_applied(patch: str, missing: list[str], ran: str = "trained") -> str:
    """The warning for a patch left out because the internals `missing` are gone."""
    return f"{patch} was not applied: it relies on {'; '.join(missing)}; {ran} with the library's own code."


def _not_found_in(library: str) -> str:
    try:
        return f"not found in {library} {importlib.metadata.version(library)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{library} is not installed"


def _is_present(internal: Internal) -> bool:
    owner = _resolve(internal.path)
    if owner is None:
        return False
    if not internal.used_by:
        return hasattr(owner, internal.attribute)
    method = getattr(owner, internal.used_by, None)
    return method is not None and internal.attribute in _names_in_code(method)


def _resolve(path: str) -> Any:
    """The module, class or function at a dotted path; None where it is gone."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        except Exception:  # a library failing at import: its internals count as gone rather than end the run
            return None
        for name in parts[cut:]:
            found = getattr(found, name, None)
            if found is None:
                return None
        return found
    return None


def _names_in_code(function: Any) -> set[str]:
    """The attribute and global names a function's code uses, and its string constants (getattr(self, 'name')),
    nested functions and comprehensions included; through decorators, with or without functools.wraps."""
    function = inspect.unwrap(function)
    codes = [getattr(function, "__code__", None)]
    for cell in getattr(function, "__closure__", None) or ():  # a wrapper without __wrapped__ closes over it
        try:
            codes.append(getattr(cell.cell_contents, "__code__", None))
        except ValueError:  # an empty cell
            continue
    names: set[str] = set()
    pending = [code for code in codes if isinstance(code, CodeType)]
    while pending:
        code = pending.pop()
        names.update(code.co_names)
        for constant in code.co_consts:
            if isinstance(constant, CodeType):
                pending.append(constant)
            elif isinstance(constant, str):
                names.add(constant)
    return names
