"""Every checkpoint tensor -> the GGUF tensor llama.cpp reads: named with the gguf package's TensorNameMap,
built (permuted, shifted, transposed, split or stacked) by the architecture's rules in gguf_arch.py, and typed.
A plan is computed from safetensors headers alone, so the writer can emit the GGUF header before it reads any
weight."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import torch

from llm_mcp.engine.export.gguf_arch import A, Arch, Build, Q, TensorPlan
from llm_mcp.errors import ExportError


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
