"""Hugging Face architectures -> llama.cpp architectures: which GGUF architecture each becomes, the hyper-parameters
llama.cpp reads for it, and how every checkpoint tensor becomes a GGUF tensor (named with the gguf package's
TensorNameMap; permuted, shifted, transposed, split or stacked where llama.cpp's layout differs from transformers').

The conventions are those of llama.cpp's convert_hf_to_gguf.py (its conversion/*.py model classes), re-derived for
the architectures the engine fine-tunes. A plan is computed from shapes alone (torch meta tensors), so the writer can
emit the GGUF header before it reads any weight. No file I/O beyond safetensors headers; no llama.cpp.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import torch

from llm_mcp.errors import ExportError

Build = Callable[[list[torch.Tensor]], torch.Tensor]
A = gguf.MODEL_ARCH
Q = gguf.GGMLQuantizationType


@dataclass
class TensorPlan:
    """One GGUF tensor: its name, the checkpoint tensors it is built from, how, and its shape and type."""

    gguf_name: str
    sources: list[tuple[Path, str]]  # (safetensors file, tensor name); empty for computed tensors
    build: Build
    shape: tuple[int, ...] = ()
    qtype: Q = Q.F32


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture is written for llama.cpp."""

    gguf_arch: A
    hparams: Callable[[gguf.GGUFWriter, dict[str, Any], list[str]], None]
    transform: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    extra_tensors: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = field(default=lambda hp: {})
    output_is_embedding: bool = False  # llama.cpp always uses token_embd as the output head (gemma2)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters (the keys convert_hf_to_gguf writes for each model class)
# ----------------------------------------------------------------------------------------------------------

def rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """The global-attention rope settings from transformers 5's rope_parameters (per layer type for Gemma 3) or the
    older rope_theta / rope_scaling keys."""
    params = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_type", params.get("type") or "default")
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in params and hp.get(key) is not None:
            params[key] = hp[key]
    if "partial_rotary_factor" not in params and hp.get("rotary_pct") is not None:
        params["partial_rotary_factor"] = hp["rotary_pct"]
    return params


def head_dim(hp: dict[str, Any]) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _add_rope(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    rope = rope_parameters(hp)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    kind, factor = str(rope["rope_type"]).lower(), rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        if rope.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        warnings.append(f"rope scaling type {kind!r} is not written to the GGUF; long contexts may degrade.")


def _decoder(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    """The keys every Llama-like decoder has (TextModel.set_gguf_parameters)."""
    n_head = int(hp["num_attention_heads"])
    w.add_context_length(int(hp.get("max_position_embeddings") or 4096))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_block_count(int(hp["num_hidden_layers"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(hp.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps") or 1e-6))
    if hp.get("head_dim"):  # may differ from hidden/heads (Gemma, Qwen3); llama.cpp needs it then
        w.add_key_length(int(hp["head_dim"]))
        w.add_value_length(int(hp["head_dim"]))
    w.add_vocab_size(int(hp["vocab_size"]))
    rotary = float(rope_parameters(hp).get("partial_rotary_factor") or 1.0)
    w.add_rope_dimension_count(int(head_dim(hp) * rotary))
    _add_rope(w, hp, warnings)


def _experts(w: gguf.GGUFWriter, hp: dict[str, Any]) -> None:
    n_experts = hp.get("num_local_experts") or hp.get("num_experts")
    if n_experts:
        w.add_expert_count(int(n_experts))
        w.add_expert_used_count(int(hp["num_experts_per_tok"]))


def _llama_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    _decoder(w, hp, warnings)
    _experts(w, hp)  # Mixtral: llama with ffn_*_exps


def _qwen2moe_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    if hp.get("mlp_only_layers") or int(hp.get("decoder_sparse_step") or 1) != 1:
        raise ExportError("this Qwen2-MoE has dense (non-expert) layers (mlp_only_layers / decoder_sparse_step); "
                          "llama.cpp's qwen2moe expects experts in every layer. Export merged_16bit instead.",
                          kind="unsupported_architecture")
    _decoder(w, hp, warnings)
    _experts(w, hp)
    w.add_expert_feed_forward_length(int(hp["moe_intermediate_size"]))
    w.add_expert_shared_feed_forward_length(int(hp["shared_expert_intermediate_size"]))
    if hp.get("norm_topk_prob"):
        warnings.append("norm_topk_prob=true: llama.cpp's qwen2moe does not renormalise the chosen experts' "
                        "weights, so its answers can drift from transformers'.")


def _swa_pattern(w: gguf.GGUFWriter, hp: dict[str, Any]) -> None:
    types = hp.get("layer_types")
    if types:  # per layer, as transformers runs it (llama.cpp otherwise assumes Gemma's fixed pattern)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma2_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    _decoder(w, hp, warnings)
    if hp.get("attn_logit_softcapping") is not None:
        w.add_attn_logit_softcapping(float(hp["attn_logit_softcapping"]))
    if hp.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    w.add_sliding_window(int(hp["sliding_window"]))
    _swa_pattern(w, hp)
    _query_scale_note(hp, warnings)


def _gemma3_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    _decoder(w, hp, warnings)  # rope base: the global layers' theta
    local = (hp.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta") \
        or hp.get("rope_local_base_freq")
    if local is not None:
        w.add_rope_freq_base_swa(float(local))
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    if hp.get("sliding_window"):
        w.add_sliding_window(int(hp["sliding_window"]))
        _swa_pattern(w, hp)
    _query_scale_note(hp, warnings)


def _query_scale_note(hp: dict[str, Any], warnings: list[str]) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B sizes only)
    scalar = hp.get("query_pre_attn_scalar")
    allowed = {head_dim(hp), hp["hidden_size"] // hp["num_attention_heads"]}
    if scalar is not None and int(scalar) not in allowed:
        warnings.append(f"query_pre_attn_scalar={scalar} is not head_dim; llama.cpp scales queries by "
                        f"1/sqrt(head_dim), so its answers can differ from transformers'.")


def _phi3_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    rope = rope_parameters(hp)
    n_head = int(hp["num_attention_heads"])
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                        or hp["max_position_embeddings"]))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_block_count(int(hp["num_hidden_layers"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(hp.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    w.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor") or 1.0) * hp["hidden_size"]) // n_head)
    w.add_rope_freq_base(float(rope.get("rope_theta") or 10000.0))
    w.add_sliding_window(int(hp.get("sliding_window") or 0))  # 0: no sliding window (Phi3MiniModel)
    w.add_vocab_size(int(hp["vocab_size"]))
    if rope.get("long_factor"):
        scale = hp["max_position_embeddings"] / rope["original_max_position_embeddings"]
        orig = rope["original_max_position_embeddings"]
        kind = str(rope["rope_type"]).lower()
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        else:
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(attn)


def _phi3_extra(hp: dict[str, Any]) -> dict[str, torch.Tensor]:
    rope = rope_parameters(hp)
    if not rope.get("long_factor"):
        return {}
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight":
            torch.tensor(rope["long_factor"], dtype=torch.float32),
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight":
            torch.tensor(rope["short_factor"], dtype=torch.float32)}


def _gptneox_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    rotary = float(rope_parameters(hp).get("partial_rotary_factor") or 1.0)
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_block_count(int(hp["num_hidden_layers"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_rope_dimension_count(int(rotary * head_dim(hp)))
    w.add_head_count(int(hp["num_attention_heads"]))
    w.add_parallel_residual(bool(hp.get("use_parallel_residual", True)))
    w.add_layer_norm_eps(float(hp["layer_norm_eps"]))
    _add_rope(w, hp, warnings)


def _gpt2_hparams(w: gguf.GGUFWriter, hp: dict[str, Any], warnings: list[str]) -> None:
    n_embd = int(hp["n_embd"])
    w.add_block_count(int(hp["n_layer"]))
    w.add_context_length(int(hp.get("n_ctx") or hp["n_positions"]))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(hp.get("n_inner") or 4 * n_embd))  # n_inner=None means 4 x n_embd
    w.add_head_count(int(hp["n_head"]))
    w.add_layer_norm_eps(float(hp["layer_norm_epsilon"]))


# ----------------------------------------------------------------------------------------------------------
# Per-tensor layout changes
# ----------------------------------------------------------------------------------------------------------

def permute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """HF's rotate-half q/k rows -> the interleaved rope layout llama.cpp's llama kernel expects
    (convert_hf_to_gguf LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama_transform(name: str, t: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    n_head = int(hp["num_attention_heads"])
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(t, n_head, n_head)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(t, n_head, int(hp.get("num_key_value_heads") or n_head))
    return t


def _gemma_transform(name: str, t: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight
    return t + 1 if name.endswith("norm.weight") else t


def _gpt2_transform(name: str, t: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    # Conv1D stores (in, out); llama.cpp wants Linear's (out, in)
    return t.transpose(0, 1) if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else t


def _gptneox_transform(name: str, t: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    # query_key_value rows are interleaved per head (q0 k0 v0 q1 k1 v1 ...); llama.cpp wants all q, all k, all v
    if not name.endswith((".attention.query_key_value.weight", ".attention.query_key_value.bias")):
        return t
    n_head, n_embd = int(hp["num_attention_heads"]), int(hp["hidden_size"])
    per_head = t.reshape(n_head, 3, n_embd // n_head, *t.shape[1:])
    return torch.cat([per_head[:, i].reshape(n_embd, *t.shape[1:]) for i in range(3)], dim=0)


def _llama_extra(hp: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Llama 3.1+ 'llama3' rope scaling travels as a rope_freqs tensor (LlamaModel.generate_extra_tensors)."""
    rope = rope_parameters(hp)
    if str(rope["rope_type"]).lower() != "llama3":
        return {}
    base, dim = float(rope.get("rope_theta") or 10000.0), head_dim(hp)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": torch.tensor(factors, dtype=torch.float32)}


# Every Hugging Face architecture llama.cpp runs that the engine fine-tunes, by config.json's "architectures" name.
ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch(A.LLAMA, _llama_hparams, _llama_transform, _llama_extra),
    "MistralForCausalLM": Arch(A.LLAMA, _llama_hparams, _llama_transform, _llama_extra),
    "MixtralForCausalLM": Arch(A.LLAMA, _llama_hparams, _llama_transform, _llama_extra),
    "Qwen2ForCausalLM": Arch(A.QWEN2, _decoder),
    "Qwen3ForCausalLM": Arch(A.QWEN3, _decoder),
    "Qwen2MoeForCausalLM": Arch(A.QWEN2MOE, _qwen2moe_hparams),
    "Gemma2ForCausalLM": Arch(A.GEMMA2, _gemma2_hparams, _gemma_transform, output_is_embedding=True),
    "Gemma3ForCausalLM": Arch(A.GEMMA3, _gemma3_hparams, _gemma_transform),
    "Phi3ForCausalLM": Arch(A.PHI3, _phi3_hparams, extra_tensors=_phi3_extra),
    "GPTNeoXForCausalLM": Arch(A.GPTNEOX, _gptneox_hparams, _gptneox_transform),
    "GPT2LMHeadModel": Arch(A.GPT2, _gpt2_hparams, _gpt2_transform),
}
SUPPORTED_ARCHITECTURES = {name: arch.name for name, arch in ARCHITECTURES.items()}


def architecture_of(hp: dict[str, Any], where: str) -> tuple[str, Arch]:
    """(HF architecture name, its Arch) for a config.json, or ExportError listing what is supported."""
    names = hp.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise ExportError(
        f"GGUF export supports {sorted(ARCHITECTURES)} (the architectures llama.cpp runs); {where} is "
        f"{names or hp.get('model_type')!r}, which llama.cpp cannot run. Export format merged_16bit instead, "
        f"which works for every architecture.", kind="unsupported_architecture")


def read_config(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    if not config.is_file():
        hint = (" It holds a LoRA adapter (adapter_config.json): merge it into the base model first."
                if (folder / "adapter_config.json").is_file() else "")
        raise ExportError(f"{str(folder)!r} has no config.json, so it is not a Hugging Face model folder.{hint}",
                          kind="export_failed")
    return json.loads(config.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Tensor plan
# ----------------------------------------------------------------------------------------------------------

_SKIPPED = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")  # transformers' on-disk MoE layout
_FUSED_GATE_UP = re.compile(r"^(.*\.experts)\.gate_up_proj(?:\.weight)?$")  # transformers 5's in-memory layout
_FUSED_DOWN = re.compile(r"^(.*\.experts)\.down_proj$")
# Kept in F32 whatever the file type, as convert_hf_to_gguf and llama-quantize keep them (routers, positions).
_ALWAYS_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.POS_EMBD)


def _one(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(ts, dim=0)


def _half(i: int) -> Build:
    def build(ts: list[torch.Tensor]) -> torch.Tensor:
        n = ts[0].shape[-2] // 2
        return ts[0][..., i * n:(i + 1) * n, :]
    return build


def _then(build: Build, name: str, arch: Arch, hp: dict[str, Any]) -> Build:
    if arch.transform is None:
        return build
    return lambda ts: arch.transform(name, build(ts), hp)


def weight_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (safetensors file, shape), from the files' headers."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{str(folder)!r} has no .safetensors weights; save the merged model with "
                          "safe_serialization=True.", kind="export_failed")
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                index[name] = (file, tuple(int(d) for d in f.get_slice(name).get_shape()))
    return index


def plan_tensors(folder: Path, hp: dict[str, Any], arch: Arch, quant: str) -> list[TensorPlan]:
    """Every GGUF tensor of the model in `folder`, in file order, with shape and type known and no weight read."""
    index = weight_index(folder)
    tied = bool(hp.get("tie_word_embeddings", arch.gguf_arch == A.GPT2))
    if arch.output_is_embedding and "lm_head.weight" in index and not tied:
        _check_head_is_embedding(index, arch)
    items: list[tuple[str, list[str], Build]] = []
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in index:
        if name.endswith(_SKIPPED) or (name == "lm_head.weight" and (tied or arch.output_is_embedding)):
            continue  # recomputed by llama.cpp, or the output head is the embedding
        if m := _PER_EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = name
        elif m := _FUSED_GATE_UP.match(name):
            items += [(f"{m[1]}.gate_proj.weight", [name], _half(0)), (f"{m[1]}.up_proj.weight", [name], _half(1))]
        elif m := _FUSED_DOWN.match(name):
            items.append((f"{m[1]}.down_proj.weight", [name], _one))
        else:
            items.append((name, [name], _one))
    for (prefix, proj), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ExportError(f"experts of {prefix}.*.{proj} are numbered {sorted(by_index)}; expected 0..n-1",
                              kind="export_failed")
        items.append((f"{prefix}.{proj}.weight", [by_index[i] for i in sorted(by_index)], _stack))

    tensor_map = gguf.get_tensor_name_map(arch.gguf_arch, int(hp.get("num_hidden_layers") or hp["n_layer"]))
    plans = [TensorPlan(name, [], (lambda t: lambda ts: t)(t), tuple(t.shape), Q.F32)
             for name, t in arch.extra_tensors(hp).items()]
    for hf_name, names, build in items:
        new_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name for llama.cpp's {arch.name!r}; the model has "
                              f"parts this exporter does not know. Export format merged_16bit instead.",
                              kind="unsupported_architecture")
        full = _then(build, hf_name, arch, hp)
        shape = tuple(full([torch.empty(index[n][1], device="meta") for n in names]).shape)
        plans.append(TensorPlan(new_name, [(index[n][0], n) for n in names], full, shape,
                                choose_qtype(hf_name, new_name, shape, quant)))
    return plans


def _check_head_is_embedding(index: dict[str, tuple[Path, tuple[int, ...]]], arch: Arch) -> None:
    from safetensors import safe_open

    embed = next((n for n in index if n.endswith("embed_tokens.weight")), None)
    tensors = []
    for name in ("lm_head.weight", embed):
        if name is None:
            break
        with safe_open(str(index[name][0]), framework="pt") as f:
            tensors.append(f.get_tensor(name))
    if len(tensors) != 2 or not torch.equal(tensors[0], tensors[1]):
        raise ExportError(f"llama.cpp's {arch.name!r} always uses the token embedding as the output head, but this "
                          f"model's lm_head differs from its embed_tokens (tie_word_embeddings=false), so a GGUF "
                          f"would answer differently. Export format merged_16bit instead.",
                          kind="unsupported_architecture")


def choose_qtype(hf_name: str, new_name: str, shape: tuple[int, ...], quant: str) -> Q:
    """convert_hf_to_gguf's rule: 1-D tensors, norms, biases, routers and position embeddings stay F32; other
    weights F16 or Q8_0 (F16 where a row is not a multiple of Q8_0's 32-value block)."""
    if len(shape) <= 1 or new_name.endswith("_norm.weight") or not hf_name.endswith(".weight"):
        return Q.F32
    if any(_matches(new_name, t) for t in _ALWAYS_F32):
        return Q.F32
    if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _matches(new_name: str, tensor: gguf.MODEL_TENSOR) -> bool:
    pattern = re.escape(gguf.TENSOR_NAMES[tensor]).replace(re.escape("{bid}"), r"\d+")
    return re.fullmatch(pattern + r"\.(weight|bias)", new_name) is not None
