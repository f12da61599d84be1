"""Convert a merged Hugging Face model folder to GGUF (llama.cpp / Ollama), plus an Ollama Modelfile.

Why this exists: llama.cpp's own converter (convert_hf_to_gguf.py) is not a pip-installable package, but its
file-format library `gguf` is. This module re-implements the part of convert_hf_to_gguf.py that the models we
fine-tune need (LlamaForCausalLM -> "llama", Qwen2ForCausalLM -> "qwen2", byte-level BPE tokenizers from
tokenizer.json) with the same conventions, so llama.cpp, Ollama and transformers' GGUF loader read the result:

* tensor names from gguf's TensorNameMap; for llama, q_proj/k_proj rows permuted as LlamaModel.permute does
  (llama.cpp's rope kernel expects the interleaved layout of the original Meta checkpoints); qwen2 unpermuted;
* 1-D tensors, norms and biases stay F32; 2-D weights F16 or Q8_0 (Q8_0 falls back to F16 when a row is not a
  multiple of the 32-value block); tied embeddings write no output.weight;
* q4_k_m: gguf-py cannot produce K-quants, so the F16 file is written and llama.cpp's `llama-quantize` is run.

Runs in worker processes only (imports torch, safetensors, transformers); never imported by the MCP server.
Tensors are streamed one at a time into the file, so peak memory is about one tensor, not the whole model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llm_mcp.errors import ExportError, InvalidArgument

logger = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_k_m")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

_NEXT_STEP = ("export format merged_16bit works for any architecture; convert that folder with llama.cpp's "
              "convert_hf_to_gguf.py (then llama-quantize for smaller files)")

# Pre-tokenizer split regexes as they appear in tokenizer.json, and llama.cpp's name for each
# (convert_hf_to_gguf identifies them by hashing a tokenization; matching the regex names the same ones).
_SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_KNOWN_SPLITS = {
    _SPLIT_HEAD + r"\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",  # Llama 3.x: digits in groups of up to three
    _SPLIT_HEAD + r"\p{N}" + _SPLIT_TAIL: "qwen2",  # Qwen2/2.5: one digit per piece
}

# {% generation %} / {% endgeneration %} is a transformers-only Jinja extension (assistant-token masks for
# training); llama.cpp's template engine does not know the tag, so it is removed from the GGUF copy.
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

def export_gguf(merged_dir: str | Path, out_dir: str | Path, quant: str = "f16") -> dict[str, Any]:
    """Write ``<out_dir>/model-<quant>.gguf`` and ``<out_dir>/Modelfile`` from a merged HF folder and verify the GGUF.

    quant: "f16" | "q8_0" (pure Python) | "q4_k_m" (F16 file, then llama.cpp's llama-quantize from PATH or
    env LLAMA_QUANTIZE; the intermediate model-f16.gguf is removed once quantization succeeds, unless it was
    already there from an earlier f16 export).
    Returns {"gguf_file", "modelfile", "quantization", "verified": verify_gguf(...), "warnings": [...]}.
    Raises ExportError (kind "unsupported_architecture", "quantizer_missing", "quantize_failed", ...).
    """
    if quant not in QUANTS:
        raise InvalidArgument("quant", quant, "one of " + ", ".join(QUANTS))
    merged = Path(merged_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    target = out / f"model-{quant}.gguf"
    if quant == "q4_k_m":
        f16_path = out / "model-f16.gguf"
        f16_was_there = f16_path.is_file()  # an earlier f16 export the caller asked for: keep it
        _write_gguf(merged, f16_path, "f16", warnings)
        _run_llama_quantize(f16_path, target, "Q4_K_M")
        if not f16_was_there:
            f16_path.unlink()  # only an intermediate, ~3.5x the Q4_K_M size; the merged folder can recreate it
    else:
        _write_gguf(merged, target, quant, warnings)

    verified = verify_gguf(target)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    modelfile = out / "Modelfile"
    modelfile.write_text(ollama_modelfile(target.name, tokenizer), encoding="utf-8")
    return {"gguf_file": str(target), "modelfile": str(modelfile), "quantization": quant,
            "verified": verified, "warnings": warnings}


def verify_gguf(path: str | Path) -> dict[str, Any]:
    """Read a GGUF back with gguf.GGUFReader and summarise what a loader needs from it.

    Returns architecture, name, tensor_count, tensor_types (sorted names such as "F16", "Q8_0"),
    has_tokenizer, vocab_size, has_chat_template, bos/eos token ids, file_type and size_bytes.
    Raises ExportError(kind="unreadable_output") when the file cannot be parsed or lacks an architecture.
    """
    p = Path(path)
    try:
        reader = gguf.GGUFReader(str(p))
        fields = reader.fields

        def value(key: str) -> Any:
            field = fields.get(key)
            return None if field is None else field.contents()

        arch = value("general.architecture")
        if not arch:
            raise ValueError("no general.architecture key")
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens.data) if tokens is not None else 0
        return {
            "path": str(p),
            "architecture": arch,
            "name": value("general.name"),
            "tensor_count": len(reader.tensors),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "has_tokenizer": vocab_size > 0,
            "vocab_size": vocab_size,
            "has_chat_template": bool(value("tokenizer.chat_template")),
            "bos_token_id": value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": value("tokenizer.ggml.eos_token_id"),
            "file_type": value("general.file_type"),
            "size_bytes": p.stat().st_size,
        }
    except Exception as exc:  # any parse failure means llama.cpp would reject the file too
        raise ExportError(f"GGUF file {str(p)!r} could not be read back ({type(exc).__name__}: {exc}); "
                          f"export it again, and if it fails the same way use {_NEXT_STEP}.",
                          kind="unreadable_output") from exc


def ollama_modelfile(gguf_filename: str, tokenizer: Any) -> str:
    """Text of an Ollama Modelfile for ``gguf_filename`` (a file next to the Modelfile).

    The TEMPLATE is derived from the tokenizer's HF chat template by rendering it with sentinel contents and
    replacing them with {{ .System }}, {{ .Prompt }} and {{ .Response }}; stop parameters are the EOS token and
    any special token that closes the assistant turn. If the template cannot be rendered, TEMPLATE is omitted
    and a comment says so (Ollama then uses its default).
    """
    lines = [f"FROM ./{gguf_filename}", ""]
    stops: list[str] = []
    try:
        template, end_of_turn = _ollama_template(tokenizer)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render must not block the export
        lines.append(f"# TEMPLATE omitted: the chat template could not be rendered ({type(exc).__name__}: {exc}).")
        template, end_of_turn = None, None
    if template is not None:
        if '"""' in template:
            lines.append('# TEMPLATE omitted: the rendered chat template contains """, which a Modelfile cannot quote.')
        else:
            lines.append(f'TEMPLATE """{template}"""')
    eos = getattr(tokenizer, "eos_token", None)
    for tok in (eos, end_of_turn):
        if tok and tok not in stops:
            stops.append(tok)
    if stops:
        lines.append("")
    for tok in stops:
        escaped = tok.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# GGUF writing
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _TensorPlan:
    hf_name: str | None       # None for tensors computed here (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: Path | None = None
    data: np.ndarray | None = None  # only for computed tensors


def _write_gguf(merged: Path, path: Path, quant: str, warnings: list[str]) -> None:
    hp = _read_config(merged)
    arch = _architecture(hp, merged)
    n_layers = int(hp["num_hidden_layers"])
    tensor_map = gguf.get_tensor_name_map(_GGUF_ARCH[arch], n_layers)

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(merged.name)
        _add_hparams(writer, hp, arch, quant, warnings)
        _add_vocab(writer, merged, hp, warnings)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        plans = _plan_tensors(merged, hp, arch, quant, tensor_map)
        for plan in plans:
            shape, dtype = plan.shape, _NP_DTYPE[plan.qtype]
            if plan.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            else:
                shape = gguf.quant_shape_to_byte_shape(shape, plan.qtype)
                nbytes = int(np.prod(shape))
            writer.add_tensor_info(plan.gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=plan.qtype)

        # Header, metadata and tensor index first, then the data one tensor at a time (same order as the index).
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(_tensor_data(plan, hp, arch))
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a truncated file that looks like a model
        raise
    writer.close()


_NP_DTYPE = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.Q8_0: np.uint8}


def _read_config(merged: Path) -> dict[str, Any]:
    config = merged / "config.json"
    if not config.is_file():
        hint = (" It holds a LoRA adapter (adapter_config.json): merge it into the base model first."
                if (merged / "adapter_config.json").is_file() else "")
        raise ExportError(f"{str(merged)!r} has no config.json, so it is not a Hugging Face model folder.{hint}",
                          kind="export_failed")
    return json.loads(config.read_text(encoding="utf-8"))


def _architecture(hp: dict[str, Any], merged: Path) -> str:
    archs = hp.get("architectures") or []
    for name in archs:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    raise ExportError(
        f"GGUF export supports {sorted(SUPPORTED_ARCHITECTURES)}; {str(merged)!r} is "
        f"{archs or hp.get('model_type')!r}. The {_NEXT_STEP}.", kind="unsupported_architecture")


def _rope_settings(hp: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict) from either transformers<5 keys (rope_theta/rope_scaling) or rope_parameters."""
    params = hp.get("rope_parameters") or {}
    scaling = hp.get("rope_scaling") or params or {}
    theta = hp.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    return float(theta), scaling


def _head_dim(hp: dict[str, Any]) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _add_hparams(writer: gguf.GGUFWriter, hp: dict[str, Any], arch: str, quant: str, warnings: list[str]) -> None:
    # The same keys convert_hf_to_gguf's TextModel/LlamaModel/Qwen2Model write.
    n_head = int(hp["num_attention_heads"])
    writer.add_context_length(int(hp.get("max_position_embeddings") or hp.get("max_length") or 4096))
    writer.add_embedding_length(int(hp["hidden_size"]))
    writer.add_block_count(int(hp["num_hidden_layers"]))
    writer.add_feed_forward_length(int(hp["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(hp.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
    if hp.get("head_dim"):  # explicit head_dim may differ from hidden/heads; llama.cpp needs it then
        writer.add_key_length(int(hp["head_dim"]))
        writer.add_value_length(int(hp["head_dim"]))
    writer.add_vocab_size(int(hp["vocab_size"]))
    writer.add_rope_dimension_count(_head_dim(hp))
    theta, scaling = _rope_settings(hp)
    writer.add_rope_freq_base(theta)
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type == "linear" and "factor" in scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type == "yarn" and "factor" in scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor instead
        warnings.append(f"rope scaling type {rope_type!r} is not written to the GGUF; long contexts may degrade.")
    writer.add_file_type(_FILE_TYPE[quant])


def _pre_tokenizer_name(tok_json: dict[str, Any], warnings: list[str]) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [(p.get("pattern") or {}).get("Regex") for p in items if p.get("type") == "Split"]
    if splits:
        for regex in splits:
            if regex in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[regex]
        warnings.append("unknown pre-tokenizer split regex; wrote tokenizer.ggml.pre='default', so llama.cpp may "
                        "split text differently from transformers. convert_hf_to_gguf.py knows more tokenizers.")
        return "default"
    if any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in items):
        return "gpt-2"  # plain ByteLevel with its built-in regex is GPT-2's split
    warnings.append("no recognised pre-tokenizer; wrote tokenizer.ggml.pre='default'.")
    return "default"


def _add_vocab(writer: gguf.GGUFWriter, merged: Path, hp: dict[str, Any], warnings: list[str]) -> None:
    """Byte-level BPE vocabulary the way convert_hf_to_gguf's _set_vocab_gpt2 / get_vocab_base writes it."""
    from transformers import AutoTokenizer

    tok_file = merged / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{str(merged)!r} has no tokenizer.json; GGUF export needs a fast (tokenizers) BPE "
                          f"tokenizer. The {_NEXT_STEP}.", kind="unsupported_tokenizer")
    tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tok_json.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer")) + json.dumps(tok_json.get("decoder"))
    if model.get("type") != "BPE" or not byte_level or model.get("byte_fallback"):
        raise ExportError(f"tokenizer in {str(merged)!r} is {model.get('type')!r} "
                          f"({'byte-level' if byte_level else 'sentencepiece-style'}); GGUF export here handles "
                          f"byte-level BPE only. The {_NEXT_STEP}.", kind="unsupported_tokenizer")

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    vocab = tokenizer.get_vocab()
    vocab_size = int(hp.get("vocab_size") or len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but config vocab_size is {vocab_size}; "
                          "resize the model's embeddings to the tokenizer before merging.", kind="export_failed")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            info = added_decoder.get(i)
            if (info is not None and info.special) or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalise user-defined spaces, as llama.cpp does
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json, warnings))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(merged, load_merges=True, n_vocab=vocab_size)
    chat_template = special.chat_template or getattr(tokenizer, "chat_template", None)
    special.chat_template = None  # written below, cleaned for llama.cpp
    # What the tokenizer really does with plain text decides add_bos/add_eos when the files do not say.
    probe = tokenizer("a").input_ids
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    if "eos" not in special.add_special_token:
        special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    if isinstance(chat_template, str):
        writer.add_chat_template(_GENERATION_TAG.sub("", chat_template))
    elif chat_template:
        writer.add_chat_template([{**c, "template": _GENERATION_TAG.sub("", c.get("template", ""))}
                                  for c in chat_template])
    if not special.merges:
        warnings.append("tokenizer.json has no merges; llama.cpp cannot tokenize with this GGUF.")


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special: some models mark control tokens as not special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _weight_files(merged: Path) -> list[Path]:
    files = sorted(merged.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{str(merged)!r} has no .safetensors weights; save the merged model with "
                          "safe_serialization=True.", kind="export_failed")
    return files


def _plan_tensors(merged: Path, hp: dict[str, Any], arch: str, quant: str,
                  tensor_map: gguf.TensorNameMap) -> list[_TensorPlan]:
    from safetensors import safe_open

    tied = bool(hp.get("tie_word_embeddings", False))
    plans: list[_TensorPlan] = []
    rope_freqs = _llama3_rope_freqs(hp) if arch == "llama" else None
    if rope_freqs is not None:
        plans.append(_TensorPlan(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                 rope_freqs.shape, gguf.GGMLQuantizationType.F32, data=rope_freqs))
    for file in _weight_files(merged):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
                    continue  # recomputed by llama.cpp
                if tied and name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ExportError(f"tensor {name!r} in {file.name} has no GGUF name for architecture {arch!r}; "
                                      f"the model has parts this exporter does not know. The {_NEXT_STEP}.",
                                      kind="unsupported_architecture")
                shape = tuple(int(d) for d in f.get_slice(name).get_shape())
                plans.append(_TensorPlan(name, new_name, shape, _choose_qtype(name, new_name, shape, quant), file))
    return plans


def _choose_qtype(hf_name: str, new_name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    # convert_hf_to_gguf prepare_tensors: 1-D tensors, norms and non-.weight tensors (biases) stay F32
    if len(shape) <= 1 or new_name.endswith("_norm.weight") or not hf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if shape[-1] % block == 0:
            return gguf.GGMLQuantizationType.Q8_0
        # gguf.quants raises QuantError for such rows; llama.cpp then falls back to F16
    return gguf.GGMLQuantizationType.F16


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf LlamaModel.permute: HF's rotate-half q/k rows -> llama.cpp's interleaved rope layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _tensor_data(plan: _TensorPlan, hp: dict[str, Any], arch: str) -> np.ndarray:
    if plan.data is not None:
        data = plan.data
    else:
        import torch
        from safetensors import safe_open

        with safe_open(str(plan.source), framework="pt") as f:
            tensor = f.get_tensor(plan.hf_name)
        data = tensor.to(torch.float32).numpy()  # float32 first: numpy has no bfloat16
        if arch == "llama":
            n_head = int(hp["num_attention_heads"])
            n_kv = int(hp.get("num_key_value_heads") or n_head)
            if plan.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, n_head, n_head)
            elif plan.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, n_head, n_kv)
    return np.ascontiguousarray(gguf.quants.quantize(data, plan.qtype))


def _llama3_rope_freqs(hp: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1+ 'llama3' rope scaling travels as a rope_freqs tensor (LlamaModel.generate_extra_tensors)."""
    theta, scaling = _rope_settings(hp)
    if str(scaling.get("rope_type", scaling.get("type", ""))).lower() != "llama3":
        return None
    dim = _head_dim(hp)
    factor = float(scaling.get("factor", 8.0))
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for i in range(0, dim, 2):
        freq = 1.0 / (theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _run_llama_quantize(src: Path, dst: Path, qtype: str) -> None:
    env_path = os.environ.get("LLAMA_QUANTIZE")
    binary = env_path if env_path and os.access(env_path, os.X_OK) else shutil.which("llama-quantize")
    if binary is None:
        where = (f"LLAMA_QUANTIZE={env_path!r} is not an executable file" if env_path
                 else "llama-quantize is not on PATH and LLAMA_QUANTIZE is not set")
        raise ExportError(
            f"{qtype.lower()} needs llama.cpp's llama-quantize, but {where}. The f16 GGUF was written at "
            f"{str(src)!r}; quantize it yourself with: llama-quantize {src} {dst} {qtype} "
            f"(or set LLAMA_QUANTIZE to the binary's path and export again, or use quant f16 / q8_0, "
            f"which need no extra tool).", kind="quantizer_missing")
    proc = subprocess.run([binary, str(src), str(dst), qtype], check=False, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = (proc.stderr or proc.stdout or "").strip()[-800:]
        raise ExportError(f"{binary} exited with {proc.returncode} quantizing {str(src)!r} to {qtype}: {tail}. "
                          f"The f16 GGUF is still at {str(src)!r}.", kind="quantize_failed")


# ----------------------------------------------------------------------------------------------------------
# Ollama template
# ----------------------------------------------------------------------------------------------------------

_SYS, _USER, _ASSISTANT = "SYSTEMSENTINELXQ7", "USERSENTINELXQ7", "ASSISTANTSENTINELXQ7"


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def _go_literal(text: str) -> str:
    # "{{" would start a Go template action; emit it as a string action instead
    return text.replace("{{", '{{ "{{" }}')


def _ollama_template(tokenizer: Any) -> tuple[str, str | None]:
    """(Go template, end-of-turn special token after the assistant content or None)."""
    turn = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
    plain = _render(tokenizer, turn)
    for sentinel in (_USER, _ASSISTANT):
        if plain.count(sentinel) != 1:
            raise ValueError(f"the template does not render each message once ({sentinel} x{plain.count(sentinel)})")
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": _SYS}, *turn])
        if with_sys.count(_SYS) != 1:
            with_sys = None
    except Exception:  # noqa: BLE001 - templates such as Gemma's reject a system role
        with_sys = None

    if with_sys is None:
        head, body = "", plain
    else:
        # with_sys = prefix + sys_block + rest, plain = prefix + plain_mid + rest
        p = 0
        while p < min(len(with_sys), len(plain)) and with_sys[p] == plain[p] and with_sys[p:p + len(_SYS)] != _SYS:
            p += 1
        s = 0
        while (s < min(len(with_sys), len(plain)) - p and with_sys[-1 - s] == plain[-1 - s]
               and len(with_sys) - 1 - s >= with_sys.index(_SYS) + len(_SYS)):
            s += 1
        prefix, rest = with_sys[:p], with_sys[len(with_sys) - s:]
        sys_block, plain_mid = with_sys[p:len(with_sys) - s], plain[p:len(plain) - s]
        if not plain_mid:
            # Slide the split left while it stays valid, so the block starts at the turn marker ("<|im_start|>system")
            while prefix and prefix[-1] == sys_block[-1] and _SYS in prefix[-1] + sys_block[:-1]:
                sys_block, rest, prefix = prefix[-1] + sys_block[:-1], sys_block[-1] + rest, prefix[:-1]
        sys_part = _go_literal(sys_block).replace(_SYS, "{{ .System }}")
        alt = f"{{{{ else }}}}{_go_literal(plain_mid)}" if plain_mid else ""
        head = f"{_go_literal(prefix)}{{{{ if .System }}}}{sys_part}{alt}{{{{ end }}}}"
        body = rest

    # llama.cpp/Ollama add BOS themselves when the tokenizer does; a template-rendered BOS would double it
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and head.startswith(bos):
        head = head[len(bos):]
    elif adds_bos and not head and body.startswith(bos):
        body = body[len(bos):]

    after = plain[plain.index(_ASSISTANT) + len(_ASSISTANT):]
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
    end_of_turn = next((t for t in specials if after.startswith(t)), None)
    # replaced in head too: a template may render the system block after the user's text
    template = head + _go_literal(body)
    return template.replace(_USER, "{{ .Prompt }}").replace(_ASSISTANT, "{{ .Response }}"), end_of_turn
