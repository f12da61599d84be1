"""Estimate the memory a LoRA fine-tuning run needs, from the model's config.json alone (no weights, no torch).

Weights (linear layers at their quantized size, embeddings and lm_head in 16/32-bit), LoRA parameters, their
gradients and optimizer state, activations (with or without gradient checkpointing) and logits, plus the
runtime's own footprint. Also reads the device's free memory, and says the cheapest change that makes a run fit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm_mcp.config import NOT_DEFAULT_LORA_TARGETS
from llm_mcp.errors import InvalidArgument
from llm_mcp.paths import stat_kind

GIB = 1024**3
# Bytes per weight of a quantized linear layer, scales included (bitsandbytes block 64 + double quant; torchao
# int4's portable route keeps each value in a byte on CPU, packed on CUDA).
_LINEAR_BYTES = {"nf4": 0.516, "nf4_optimized": 0.516 * 1.1, "int8": 1.01, "fp8": 1.01, "int4": 1.16}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# torch + transformers + peft + trl in a worker process before any model (measured: ~0.55 GB RSS on CPU);
# a CUDA context plus allocator slack on a GPU.
RUNTIME_BYTES = {"cpu": int(0.6 * GIB), "cuda": int(0.9 * GIB)}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    model_type: str = "llama"
    experts: int = 0  # routed experts per MoE layer (0: a dense model)
    expert_intermediate: int = 0  # each expert's MLP width
    shared_expert_intermediate: int = 0  # Qwen-MoE's always-on shared expert
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2, OPT); rotary models have none

    def linear_layers(self) -> list[tuple[str, int, int]]:
        """(leaf name, in_features, out_features) of each linear projection of one decoder layer, named as the
        architecture names them (fused projections and Conv1D layers as one layer each)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.model_type == "gpt2":
            return [("c_attn", h, 3 * h), ("c_proj", h, h), ("c_fc", h, i), ("c_proj", i, h)]
        if self.model_type == "gpt_neox":
            return [("query_key_value", h, 3 * h), ("dense", h, h), ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h)]
        attention = ([("qkv_proj", h, q + 2 * kv)] if self.model_type == "phi3" else
                     [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv)])
        attention.append(("out_proj", q, h) if self.model_type == "opt" else ("o_proj", q, h))
        if self.model_type == "opt":
            return attention + [("fc1", h, i), ("fc2", i, h)]
        if self.model_type == "phi3":
            return attention + [("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        if self.experts:  # routed experts are 3-D parameters (expert_layers); the router is a few logits per token
            shared = self.shared_expert_intermediate
            mlp = [("gate_proj", h, shared), ("up_proj", h, shared), ("down_proj", shared, h),
                   ("shared_expert_gate", h, 1)] if shared else []
            return attention + mlp
        return attention + [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def expert_layers(self) -> list[tuple[str, int, int, int]]:
        """(path, experts, in_features, out_features) of the fused expert weights of one decoder layer."""
        if not self.experts:
            return []
        h, i = self.hidden, self.expert_intermediate
        return [("mlp.experts.gate_up_proj", self.experts, h, 2 * i),
                ("mlp.experts.down_proj", self.experts, i, h)]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) by leaf name (a name used twice, as GPT-2's c_proj, sums its sizes)."""
        out: dict[str, tuple[int, int]] = {}
        for name, i, o in self.linear_layers():
            prev = out.get(name, (0, 0))
            out[name] = (prev[0] + i, prev[1] + o) if name in out else (i, o)
        return out


def read_shape(model_name: str) -> ModelShape:
    """The dimensions that matter, from config.json of a local folder or the hub (cached)."""
    path = Path(os.path.expanduser(model_name))
    if stat_kind(path) == "dir":
        config_file = path / "config.json"
        if not config_file.is_file():
            raise InvalidArgument("model_name", model_name, "a model folder containing config.json")
    elif model_name.startswith((".", "/", "~")):
        raise InvalidArgument("model_name", model_name, "an existing model folder (no such folder) or a hub id")
    else:
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(model_name, "config.json"))
        except Exception as exc:
            raise InvalidArgument("model_name", model_name, f"a local model folder or a reachable hub id ({exc})")
    shape = shape_from_config(json.loads(config_file.read_text()))
    if shape is None:
        raise InvalidArgument("model_name", model_name, "a decoder-only LM config with hidden_size and "
                                                        "num_attention_heads")
    return shape


def shape_from_config(config: dict[str, Any]) -> ModelShape | None:
    """The dimensions from a config.json mapping (or a transformers config's to_dict()); None if not an LM's."""
    config = config.get("text_config") or config  # multimodal wrappers keep the LM's config inside
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    heads = config.get("num_attention_heads") or config.get("n_head")
    if not hidden or not heads:
        return None
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    intermediate = (config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner")
                    or 4 * hidden)
    return ModelShape(
        hidden=hidden, intermediate=intermediate,
        layers=config.get("num_hidden_layers") or config.get("n_layer"), heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or hidden // heads,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", config.get("model_type") in ("gpt2", "opt"))),
        model_type=str(config.get("model_type") or "llama"), experts=experts,
        expert_intermediate=int(config.get("moe_intermediate_size") or intermediate) if experts else 0,
        shared_expert_intermediate=int(config.get("shared_expert_intermediate_size") or 0),
        learned_positions=int(config.get("n_positions") or config.get("max_position_embeddings") or 0)
        if config.get("model_type") in ("gpt2", "opt") else 0,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    lora_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    runtime_bytes: int
    total_bytes: int
    device: str
    free_bytes: int | None
    fits: bool | None
    advice: str | None
    num_processes: int = 1
    distributed_strategy: str = "ddp"
    # every process's bytes together where they share this machine's memory (CPU); one device's on GPUs
    needed_here_bytes: int | None = None
    method: str = "sft"
    reference_bytes: int = 0  # dpo/kto: the frozen copy of the adapter their reference runs through
    generation_bytes: int = 0  # grpo: the KV cache of sampling its generation batch

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_gib"] = round(self.total_bytes / GIB, 3)
        out["free_gib"] = None if self.free_bytes is None else round(self.free_bytes / GIB, 3)
        return out


def estimate(shape: ModelShape, *, quant_type: str, compute_dtype: str, lora_rank: int, batch_size: int,
             max_length: int, use_gradient_checkpointing: bool, optim: str = "adamw_torch",
             target_modules: tuple[str, ...] | None = None, device: str | None = None,
             free_bytes: int | None = None, with_advice: bool = True, num_processes: int = 1,
             distributed_strategy: str = "ddp", method: str = "sft", max_completion_length: int = 512,
             gradient_accumulation_steps: int = 1) -> MemoryEstimate:
    """One device's bytes (per process, when num_processes > 1: DDP keeps a full copy on each device, FSDP shards
    weights, adapters, gradients and optimizer state across them; activations are each process's own).

    The method: dpo and orpo run each pair's two answers in one batch, kto each completion with a mismatched one
    (twice the tokens); dpo and kto add the frozen reference adapter (the base is shared, never copied); grpo's
    batch_size counts completions of up to max_length + max_completion_length tokens, and sampling holds the KV
    cache of batch_size x gradient_accumulation_steps completions at once."""
    device = device or detect_device()
    dtype_bytes = _DTYPE_BYTES[compute_dtype]
    linear_params = sum(i * o for _, i, o in shape.linear_layers()) * shape.layers
    # bitsandbytes' k-bit preparation upcasts the unquantized parameters (embeddings, lm_head) to float32
    other_bytes = 4 if quant_type in ("nf4", "nf4_optimized", "int8") else dtype_bytes
    embed_params = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) + \
        shape.learned_positions * shape.hidden
    linear_bytes = _LINEAR_BYTES.get(quant_type, dtype_bytes)
    if quant_type == "int4" and device == "cuda":
        linear_bytes = 0.53
    # fused expert weights are not Linear layers: they stay in the compute dtype whatever quant_type says
    expert_params = sum(e * i * o for _, e, i, o in shape.expert_layers()) * shape.layers
    weights = int(linear_params * linear_bytes + embed_params * other_bytes + expert_params * dtype_bytes)

    targets = lora_targets(shape, target_modules)
    lora_params = shape.layers * (
        sum(lora_rank * (i + o) for name, i, o in shape.linear_layers() if name in targets)
        + sum(lora_rank * e * (i + o) for path, e, i, o in shape.expert_layers() if _names_expert(path, targets, shape)))
    lora = lora_params * 4  # peft keeps adapters in float32
    gradients = lora_params * 4
    optimizer = lora_params * (2 if "8bit" in optim else 8)  # Adam's two moments, 8-bit or 32-bit

    tokens = batch_size * max_length
    reference = lora if method in ("dpo", "kto") else 0
    generation = 0
    if method in ("dpo", "orpo", "kto"):
        tokens *= 2
    elif method == "grpo":
        tokens = batch_size * (max_length + max_completion_length)
        generation = (batch_size * gradient_accumulation_steps * (max_length + max_completion_length) * shape.layers
                      * 2 * shape.kv_heads * shape.head_dim * _DTYPE_BYTES[compute_dtype])
    act_bytes = 4 if compute_dtype == "float32" else 2
    # saved for backward per decoder layer: norms, q/k/v (+rope), attention and o_proj inputs, residuals (~14 h)
    # and the MLP's gate, up, activation, product and down input (~5 I)
    per_layer_full = tokens * (14 * shape.hidden + 5 * shape.intermediate) * act_bytes
    if use_gradient_checkpointing:
        activations = tokens * shape.hidden * act_bytes * shape.layers + per_layer_full
    else:
        activations = per_layer_full * shape.layers
    activations += logits_bytes(tokens, shape.vocab, shape.hidden, device=device, compute_dtype=compute_dtype)
    runtime = RUNTIME_BYTES["cuda" if device == "cuda" else "cpu"]
    if distributed_strategy == "fsdp" and num_processes > 1:
        weights, lora, gradients, optimizer = (-(-b // num_processes) for b in (weights, lora, gradients, optimizer))
    total = weights + lora + gradients + optimizer + activations + runtime + reference + generation
    needed_here = total * num_processes if device != "cuda" else total  # CPU processes share one memory
    free = free_bytes if free_bytes is not None else free_memory(device)
    fits = None if free is None else needed_here <= free
    advice = None
    if fits is False and with_advice:
        advice = _cheapest_fix(shape, free, quant_type=quant_type, compute_dtype=compute_dtype, lora_rank=lora_rank,
                               batch_size=batch_size, max_length=max_length, optim=optim,
                               use_gradient_checkpointing=use_gradient_checkpointing, target_modules=target_modules,
                               device=device, num_processes=num_processes,
                               distributed_strategy=distributed_strategy, method=method,
                               max_completion_length=max_completion_length,
                               gradient_accumulation_steps=gradient_accumulation_steps)
    return MemoryEstimate(weights, lora, gradients, optimizer, activations, runtime, total, device, free, fits,
                          advice, num_processes, distributed_strategy, needed_here, method, reference, generation)


def lora_targets(shape: ModelShape, target_modules: tuple[str, ...] | None) -> set[str]:
    """The names LoRA adapts, as the engine chooses them: the given ones, or every linear projection of attention
    and MLP plus the experts' fused weights."""
    if target_modules:
        return set(target_modules)
    return ({name for name, _, _ in shape.linear_layers() if name not in NOT_DEFAULT_LORA_TARGETS}
            | {path for path, *_ in shape.expert_layers()})


def _names_expert(path: str, targets: set[str], shape: ModelShape) -> bool:
    """Whether the targets adapt an expert weight: by its path, or by its leaf name where no linear layer has that
    name (the engine's rule: "down_proj" in Qwen2-MoE is the shared expert's Linear)."""
    leaf = path.rsplit(".", 1)[-1]
    return path in targets or (leaf in targets and leaf not in shape.linear_shapes())


# TRL's fused LM head (SFTTrainer, trl >= 1.16) scores tokens against the vocabulary in tiles of at most this many
# tokens x vocabulary entries, so the [tokens, vocab] logits never exist at once (trl.kernels.chunked_logprob).
LOGITS_TILE = (4096, 32768)


def logits_bytes(tokens: int, vocab: int, hidden: int, *, device: str, compute_dtype: str) -> int:
    """The LM head's share of the peak: one tile of logits and what sits beside it. On CPU TRL folds a tile with
    torch ops, ~8 float32 copies of it at once (calibrated on a 30M-parameter model and a 128k vocabulary,
    docs/benchmarks.md); on CUDA a Triton kernel folds it in place, beside the tile's slice of the LM head cast to the
    compute dtype."""
    tile_tokens, tile_vocab = min(tokens, LOGITS_TILE[0]), min(vocab, LOGITS_TILE[1])
    if device != "cuda":
        return tile_tokens * tile_vocab * 4 * 8
    return tile_vocab * (tile_tokens + hidden) * _DTYPE_BYTES[compute_dtype]


def _cheapest_fix(shape: ModelShape, free: int, **settings: Any) -> str:
    """Try changes from least to most costly for the result; name the first that fits."""
    tries = [
        ("use_gradient_checkpointing=true", {"use_gradient_checkpointing": True}),
        (f"batch_size={max(1, settings['batch_size'] // 2)} (double gradient_accumulation_steps to keep the "
         f"effective batch)", {"batch_size": max(1, settings["batch_size"] // 2)}),
        ("batch_size=1", {"batch_size": 1, "use_gradient_checkpointing": True}),
        (f"max_length={max(256, settings['max_length'] // 2)}", {"batch_size": 1, "use_gradient_checkpointing": True,
                                                                 "max_length": max(256, settings["max_length"] // 2)}),
        ("an 8-bit optimizer (optim='adamw_8bit')", {"optim": "adamw_8bit", "batch_size": 1,
                                                     "use_gradient_checkpointing": True}),
        ("quant_type='nf4'", {"quant_type": "nf4", "batch_size": 1, "use_gradient_checkpointing": True}),
    ]
    for label, change in tries:
        if all(settings.get(k) == v for k, v in change.items()):
            continue
        candidate = estimate(shape, **{**settings, **change}, free_bytes=free, with_advice=False)
        if candidate.fits:
            return f"it would fit with {label} (estimated {candidate.total_bytes / GIB:.2f} GiB)"
    return "it does not fit even with NF4, batch_size=1 and gradient checkpointing: use a smaller model or a " \
           "device with more memory"


def detect_device() -> str:
    """'cuda' when an NVIDIA GPU is visible (without importing torch), else 'cpu'."""
    return "cuda" if _gpu_free_bytes() is not None else "cpu"


def free_memory(device: str) -> int | None:
    if device == "cuda":
        return _gpu_free_bytes()
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def proc_kib_field(path: str, field: str) -> int | None:
    """A 'Field:  N kB' line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_free_bytes() -> int | None:
    free = nvidia_smi_query("memory.free")
    return int(free[0]) * 1024 * 1024 if free else None


def nvidia_smi_query(field: str) -> list[str] | None:
    """One `nvidia-smi --query-gpu` field, a line per GPU (no header, no units); None where nvidia-smi is missing
    or fails (no torch import: the server calls it before any worker starts)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]
