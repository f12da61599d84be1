"""nf4_optimized: pick the linear layers that NF4 hurts most and keep them in 16-bit, within a memory budget.

Each linear weight is streamed from the model's safetensors files (never the whole model in 16-bit), quantized
to NF4 with bitsandbytes and dequantized; its RMS reconstruction error is the layer's
sensitivity, measured against the scale of the weight's bulk (outlier weights stretch a block's absmax and
blur the rest of the block). The most sensitive
layers are kept in 16-bit, greedily, while their extra bytes over NF4 stay within `budget` x the NF4 bytes of
all linear layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

NF4_BLOCK = 64
_SKIP_NAMES = ("embed", "lm_head", "norm", "wte", "wpe")


@dataclass(frozen=True)
class LayerSensitivity:
    module: str
    relative_error: float
    params: int

    @property
    def nf4_bytes(self) -> int:  # 4-bit values plus one absmax byte per block (double quantization)
        return self.params // 2 + self.params // NF4_BLOCK

    def extra_bytes(self, bytes_per_param: int) -> int:
        return self.params * bytes_per_param - self.nf4_bytes


def weight_files(model_dir: str) -> list[Path]:
    """The safetensors files of a local model folder or a (cached) hub model."""
    path = Path(model_dir)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_dir, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def measure(model_dir: str, *, dtype: torch.dtype = torch.bfloat16) -> list[LayerSensitivity]:
    """NF4 reconstruction error of every linear weight, one tensor in memory at a time."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors import safe_open

    found = []
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(".weight") or any(s in key for s in _SKIP_NAMES):
                    continue
                weight = f.get_tensor(key)
                if weight.dim() != 2:
                    continue
                w = weight.to(dtype)
                packed, state = quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")
                restored = dequantize_4bit(packed, state, blocksize=NF4_BLOCK, quant_type="nf4").to(torch.float32)
                found.append(LayerSensitivity(key.removesuffix(".weight"), _relative_error(w.float(), restored),
                                              w.numel()))
    return found


def _relative_error(weight: torch.Tensor, restored: torch.Tensor) -> float:
    """RMS quantization error over the RMS of the weight's bulk (|w| up to its 99th percentile). Against the
    plain RMS, outliers would hide their own damage: they dominate the norm while blurring the rest."""
    flat = weight.abs().flatten()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    cutoff = torch.quantile(sample, 0.99)
    bulk = weight[weight.abs() <= cutoff]
    scale = bulk.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((weight - restored).pow(2).mean().sqrt() / scale)


def choose_kept(layers: list[LayerSensitivity], budget: float, *, bytes_per_param: int = 2) -> list[LayerSensitivity]:
    """The most sensitive layers whose 16-bit copies fit in budget x (NF4 bytes of all layers)."""
    allowance = budget * sum(layer.nf4_bytes for layer in layers)
    kept, spent = [], 0
    for layer in sorted(layers, key=lambda x: x.relative_error, reverse=True):
        cost = layer.extra_bytes(bytes_per_param)
        if spent + cost <= allowance:
            kept.append(layer)
            spent += cost
    return kept


def report(layers: list[LayerSensitivity], kept: list[LayerSensitivity], budget: float,
           bytes_per_param: int = 2) -> dict:
    """What the load answer says about the choice."""
    kept_names = {k.module for k in kept}
    errors = sorted(layers, key=lambda x: x.relative_error, reverse=True)
    return {
        "budget": budget,
        "kept_16bit": [{"module": k.module, "relative_error": round(k.relative_error, 5),
                        "extra_bytes": k.extra_bytes(bytes_per_param)} for k in kept],
        "kept_16bit_extra_bytes": sum(k.extra_bytes(bytes_per_param) for k in kept),
        "nf4_linear_bytes": sum(layer.nf4_bytes for layer in layers),
        "most_sensitive_quantized": [{"module": e.module, "relative_error": round(e.relative_error, 5)}
                                     for e in errors if e.module not in kept_names][:5],
    }


def logit_distances(model_dir: Path, budget: float, texts: list[str]) -> dict[str, dict[str, Any]]:
    """How far plain NF4's and nf4_optimized's logits are from the unquantized (bfloat16) model's on `texts`."""
    from llm_mcp.config import LoadConfig
    from llm_mcp.engine.load.model import load_model

    def logits(quant_type: str) -> tuple[torch.Tensor, dict]:
        bundle = load_model(LoadConfig(model_name=str(model_dir), quant_type=quant_type, compute_dtype="bfloat16",
                                       lora_rank=8, nf4_optimized_budget=budget))
        batch = bundle.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():  # LoRA B is zero at init: these are the base model's logits
            out = bundle.model(**batch).logits.float()
        return out[batch.attention_mask.bool()], bundle.describe()

    reference, _ = logits("none")
    results = {}
    for quant_type in ("nf4", "nf4_optimized"):
        got, info = logits(quant_type)
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        results[quant_type] = {"mean_abs_logit_diff": float((got - reference).abs().mean()), "kl": float(kl),
                               "linear_weight_bytes": info["memory"]["linear_weight_bytes"],
                               "kept": [k["module"] for k in (info.get("nf4_optimized") or {}).get("kept_16bit", [])]}
    return results
