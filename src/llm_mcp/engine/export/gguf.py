"""Convert a merged Hugging Face model folder to GGUF (llama.cpp / Ollama), run it, and write an Ollama Modelfile.

Why this exists: llama.cpp's own converter (convert_hf_to_gguf.py) is not a pip-installable package, but its
file-format library `gguf` is. This module writes GGUF files with it following convert_hf_to_gguf's conventions
for every architecture in gguf_arch.ARCHITECTURES (hyper-parameters and tensor layouts there, tokenizers in
gguf_vocab), so llama.cpp, Ollama and transformers' GGUF loader read the result:

* f16 and q8_0 are written here (1-D tensors, norms, biases and routers stay F32; Q8_0 falls back to F16 where a
  row is not a multiple of its 32-value block); tied embeddings write no output.weight;
* q4_k_m, q5_k_m and q6_k: an F16 file quantized by llama.cpp's own llama_model_quantize (llama-cpp-python);
* verification reads the file back (gguf.GGUFReader), then runs it in llama.cpp on the probe and compares the
  greedy tokens with transformers' on the merged folder (gguf_run).

Runs in worker processes only (imports torch, safetensors, transformers); never imported by the MCP server.
Tensors are streamed one at a time into the file, so peak memory is about one tensor, not the whole model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llm_mcp.engine.export.gguf_arch import (ARCHITECTURES, SUPPORTED_ARCHITECTURES, Arch, TensorPlan,
                                             architecture_of, permute_qk, read_config)
from llm_mcp.engine.export.gguf_run import K_QUANTS, quantize, require_quantizer, verify_with_llama_cpp
from llm_mcp.engine.export.gguf_tensors import plan_tensors
from llm_mcp.engine.export.gguf_vocab import add_vocab, pre_tokenizer_name
from llm_mcp.engine.export.ollama import ollama_modelfile
from llm_mcp.errors import ExportError, InvalidArgument

logger = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", *K_QUANTS)
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_NP_DTYPE = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.Q8_0: np.uint8}
_NEXT_STEP = "export format merged_16bit works for any architecture"

__all__ = ["QUANTS", "SUPPORTED_ARCHITECTURES", "ARCHITECTURES", "check_architecture", "export_gguf",
           "ollama_modelfile", "verify_gguf", "permute_qk", "pre_tokenizer_name"]


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The llama.cpp architecture a model config (config.json's contents) becomes, or ExportError listing the
    supported ones (called before any export work, so an unsupported model fails in a second)."""
    return architecture_of(config, where)[1].name


def export_gguf(merged_dir: str | Path, out_dir: str | Path, quant: str = "f16", *, probe_prompt: str | None = None,
                run: bool = True, name: str | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/model-<quant>.gguf`` and ``<out_dir>/Modelfile`` from a merged HF folder, and verify it.

    quant: "f16" | "q8_0" (written here) | "q4_k_m" | "q5_k_m" | "q6_k" (llama.cpp's quantizer; no intermediate
    file is left). run: run the GGUF in llama.cpp and compare its greedy answer with transformers'.
    name: general.name in the file (default: the merged folder's name).
    Returns {"gguf_file", "modelfile", "quantization", "architecture", "verified" (read back),
    "verified_llama_cpp" (when run), "warnings"}.
    Raises ExportError (kind "unsupported_architecture", "unsupported_tokenizer", "quantizer_missing",
    "quantize_failed", "unreadable_output", "export_failed").
    """
    if quant not in QUANTS:
        raise InvalidArgument("gguf_quantization", quant, "one of " + ", ".join(QUANTS))
    merged, out = Path(merged_dir), Path(out_dir)
    hp = read_config(merged)
    _, arch = architecture_of(hp, repr(str(merged)))
    if quant in K_QUANTS:
        require_quantizer(quant)  # before any work
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    target = out / f"model-{quant}.gguf"
    if quant in K_QUANTS:
        intermediate = out / f".model-f16-for-{quant}.gguf"
        try:
            write_gguf(merged, intermediate, "f16", hp, arch, warnings, name=name)
            quantize(intermediate, target, quant)
        finally:
            intermediate.unlink(missing_ok=True)
    else:
        write_gguf(merged, target, quant, hp, arch, warnings, name=name)
    logger.info("wrote %s (%s, %s)", target, arch.name, quant)
    answer: dict[str, Any] = {"gguf_file": str(target), "quantization": quant, "architecture": arch.name,
                              "verified": verify_gguf(target)}

    from transformers import AutoTokenizer

    modelfile = out / "Modelfile"
    modelfile.write_text(ollama_modelfile(target.name, AutoTokenizer.from_pretrained(str(merged))), encoding="utf-8")
    answer["modelfile"] = str(modelfile)
    if run:
        answer["verified_llama_cpp"] = verify_with_llama_cpp(target, merged, quant, probe_prompt, warnings)
    answer["warnings"] = warnings
    return answer


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


def write_gguf(merged: Path, path: Path, quant: str, hp: dict[str, Any], arch: Arch, warnings: list[str], *,
               name: str | None = None) -> None:
    """Header, metadata and tensor index first, then the data one tensor at a time (the index's order)."""
    plans = plan_tensors(merged, hp, arch, quant)
    writer = gguf.GGUFWriter(str(path), arch.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        arch.hparams(writer, hp, warnings)
        writer.add_file_type(_FILE_TYPE[quant])
        tokens = add_vocab(writer, merged, hp, warnings)
        writer.add_name(_model_name(name or merged.name, tokens))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for plan in plans:
            shape, dtype = plan.shape, _NP_DTYPE[plan.qtype]
            if plan.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            else:
                shape = gguf.quant_shape_to_byte_shape(shape, plan.qtype)
                nbytes = int(np.prod(shape))
            writer.add_tensor_info(plan.gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(_tensor_data(plan))
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a truncated file that looks like a model
        raise
    writer.close()


def _model_name(name: str, tokens: list[str]) -> str:
    # llama.cpp gives Phi-3's special tokens their strip attributes when general.name says phi3, and fails to load
    # a vocabulary that lacks any of them (a Phi-3 architecture with another tokenizer)
    if re.search(r"phi-?3", name.lower()) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(tokens):
        return re.sub(r"(?i)phi-?3", "phi", name)
    return name


def _tensor_data(plan: TensorPlan) -> np.ndarray:
    import torch
    from safetensors import safe_open

    sources = []
    for file, name in plan.sources:
        with safe_open(str(file), framework="pt") as f:
            sources.append(f.get_tensor(name).to(torch.float32))  # float32 first: numpy has no bfloat16
    data = plan.build(sources).contiguous().numpy()
    assert data.shape == plan.shape, f"{plan.gguf_name}: planned {plan.shape}, built {data.shape}"
    return np.ascontiguousarray(gguf.quants.quantize(data, plan.qtype))
