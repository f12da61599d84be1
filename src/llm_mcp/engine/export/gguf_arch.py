"""Hugging Face architectures -> llama.cpp architectures: which GGUF architecture each becomes, the hyper-parameters
llama.cpp reads for it, and the rules by which its tensors change on the way (permuted, shifted, transposed, split
or stacked where llama.cpp's layout differs from transformers'); gguf_tensors.py applies them to each tensor.

The conventions are those of llama.cpp's convert_hf_to_gguf.py (its conversion/*.py model classes), re-derived for
the architectures the engine fine-tunes. No file I/O beyond config.json; no llama.cpp.
"""

from __future__ import annotations

import json
import math
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
