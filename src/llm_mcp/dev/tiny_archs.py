"""Tiny random-init models of every common architecture (Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, GPT-NeoX, GPT-2,
OPT, Mixtral, Qwen2-MoE), saved as ordinary Hugging Face folders with the built-in tokenizer.

The architecture matrix test and the GGUF tests run the real stack on these: same module names, fused projections,
Conv1D layers and fused 3-D expert parameters as the real checkpoints, at a size that trains in seconds on a CPU.
Every Linear's out_features is a multiple of 32 (bitsandbytes' CPU kernels want it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llm_mcp.dev.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, _round_up, make_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 128


def _ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
            "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN)}


def _decoder(tokenizer: Any) -> dict[str, Any]:
    """The dimensions shared by the Llama-like decoders."""
    return {"vocab_size": _round_up(len(tokenizer)), "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HIDDEN // HEADS, "max_position_embeddings": 1024, "initializer_range": 0.2,
            "tie_word_embeddings": False, **_ids(tokenizer)}


def _llama(t):
    from transformers import LlamaConfig
    return LlamaConfig(**_decoder(t))


def _mistral(t):
    from transformers import MistralConfig
    return MistralConfig(**_decoder(t), sliding_window=None)


def _qwen2(t):
    from transformers import Qwen2Config
    return Qwen2Config(**_decoder(t))


def _qwen3(t):
    from transformers import Qwen3Config
    return Qwen3Config(**_decoder(t))


def _gemma(t):
    return {**_decoder(t), "tie_word_embeddings": True}  # released Gemma models tie them; llama.cpp's gemma needs it


def _gemma2(t):
    from transformers import Gemma2Config
    return Gemma2Config(**_gemma(t), query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=512)


def _gemma3(t):
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**_gemma(t), query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=512)


def _phi3(t):
    from transformers import Phi3Config
    cfg = _decoder(t)
    cfg.pop("head_dim")
    return Phi3Config(**cfg, original_max_position_embeddings=1024)


def _gpt_neox(t):
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=_round_up(len(t)), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=1024,
                         initializer_range=0.2, tie_word_embeddings=False, rotary_pct=0.25, **_ids(t))


def _gpt2(t):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=_round_up(len(t)), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=1024,
                      n_inner=INTERMEDIATE, initializer_range=0.2, **_ids(t))


def _opt(t):
    from transformers import OPTConfig
    return OPTConfig(vocab_size=_round_up(len(t)), hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=1024,
                     init_std=0.2, **_ids(t))


def _mixtral(t):
    from transformers import MixtralConfig
    return MixtralConfig(**_decoder(t), num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def _qwen2_moe(t):
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(**_decoder(t), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                          shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[])


# name -> config builder (given the tokenizer). The names are the tests' parameter ids and the README table's rows.
ARCHITECTURES: dict[str, Callable[[Any], Any]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3,
    "phi3": _phi3, "gpt_neox": _gpt_neox, "gpt2": _gpt2, "opt": _opt, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")


def make_tiny_arch(arch: str, output_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random-init tiny model of `arch` (a key of ARCHITECTURES) plus the built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r}; expected one of {sorted(ARCHITECTURES)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = ARCHITECTURES[arch](tokenizer)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
