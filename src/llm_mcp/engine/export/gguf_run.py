"""llama.cpp itself, through llama-cpp-python (the optional `gguf` extra): k-quant quantization with
llama_model_quantize, and running an exported GGUF on the verification probe, its greedy tokens compared with
transformers' greedy tokens from the merged folder the GGUF was made from.

Imported in worker processes only. Without llama-cpp-python, f16/q8_0 files are still written and read back
(gguf_export says so in warnings); k-quants need it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llm_mcp.engine.export.probe import NEAR_TIE, Probe, greedy_tokens, is_empty, prefers_by, probes
from llm_mcp.errors import ExportError

log = logging.getLogger(__name__)

COMPARED_TOKENS = 16  # greedy tokens compared between llama.cpp and transformers
EXACT_QUANTS = ("f16", "q8_0")  # must give transformers' tokens; lower types report the agreement
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
INSTALL_HINT = "pip install 'llm-mcp-server[gguf]' (llama-cpp-python, which compiles llama.cpp from source)"


def llama_cpp_or_none() -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _threads() -> int:
    return max(1, torch.get_num_threads() or os.cpu_count() or 1)


def require_quantizer(quant: str) -> Any:
    llama_cpp = llama_cpp_or_none()
    if llama_cpp is None:
        raise ExportError(f"gguf_quantization={quant!r} needs llama.cpp's quantizer from llama-cpp-python, which is "
                          f"not installed: {INSTALL_HINT}. Or use f16 / q8_0, which need nothing more.",
                          kind="quantizer_missing")
    return llama_cpp


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), from an F16 GGUF to a k-quant one."""
    llama_cpp = require_quantizer(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = _threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's llama_model_quantize returned {rc} quantizing to {quant} (its log is in "
                          f"the worker log); export f16 or q8_0 instead.", kind="quantize_failed")


def run_gguf(path: Path, probe: Probe, n: int) -> dict[str, Any]:
    """llama.cpp's greedy answer: the probe tokenized by llama.cpp (as a user of the GGUF would), up to n tokens,
    the end-of-generation token included when one comes. llama.h's own calls, greedy as argmax of the logits."""
    import numpy as np

    lc = llama_cpp_or_none()
    assert lc is not None, "run_gguf needs llama-cpp-python"
    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    # llama.cpp's repacked CPU weight layouts (its "extra buffer types": AMX, repack) crashed the process on a Xeon
    # with AMX for Q8_0 models this small; the plain CPU kernels compute the same answers
    model_params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise ExportError(f"llama.cpp could not load {str(path)!r} (its log is in the worker log); the GGUF is not "
                          f"usable. Export format merged_16bit instead.", kind="unreadable_output")
    try:
        vocab = lc.llama_model_get_vocab(model)
        prompt = _tokenize(lc, vocab, probe.text, add_special=not probe.is_chat)
        params = lc.llama_context_default_params()
        params.n_ctx = len(prompt) + n + 8
        params.n_batch = params.n_ubatch = max(len(prompt), 1)
        params.n_threads = params.n_threads_batch = _threads()
        ctx = lc.llama_init_from_model(model, params)
        assert ctx, "llama_init_from_model failed"
        try:
            n_vocab, tokens, feed = lc.llama_vocab_n_tokens(vocab), [], prompt
            for _ in range(n):
                batch = (lc.llama_token * len(feed))(*feed)
                if lc.llama_decode(ctx, lc.llama_batch_get_one(batch, len(feed))) != 0:
                    raise ExportError("llama.cpp failed to evaluate the probe (llama_decode)", kind="export_failed")
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                tokens.append(int(np.argmax(logits)))
                if lc.llama_vocab_is_eog(vocab, tokens[-1]):
                    break
                feed = tokens[-1:]
        finally:
            lc.llama_free(ctx)
        stopped = bool(tokens) and bool(lc.llama_vocab_is_eog(vocab, tokens[-1]))
        text = _detokenize(lc, vocab, tokens[:-1] if stopped else tokens)
    finally:
        lc.llama_model_free(model)
    return {"tokens": tokens, "text": text, "prompt_ids": prompt, "stopped": stopped}


def _tokenize(lc: Any, vocab: Any, text: str, *, add_special: bool) -> list[int]:
    data = text.encode("utf-8")
    size = len(data) + 8
    while True:
        out = (lc.llama_token * size)()
        count = lc.llama_tokenize(vocab, data, len(data), out, size, add_special, True)
        if count >= 0:
            return list(out[:count])
        size = -count


def _detokenize(lc: Any, vocab: Any, tokens: list[int]) -> str:
    pieces = b""
    for token in tokens:
        buf = ctypes.create_string_buffer(256)
        length = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        pieces += buf.raw[:max(length, 0)]
    return pieces.decode("utf-8", errors="replace")


def verify_with_llama_cpp(path: Path, merged: Path, quant: str, probe_prompt: str | None,
                          warnings: list[str]) -> dict[str, Any]:
    """Run the GGUF in llama.cpp and compare its greedy answer with transformers' on the merged folder."""
    if llama_cpp_or_none() is None:
        warnings.append(f"the GGUF was read back but not run: llama-cpp-python is not installed ({INSTALL_HINT}).")
        return {"ran": False, "reason": "llama-cpp-python is not installed"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    probe, expected = _answered_probe(model, tokenizer, probe_prompt, warnings)
    if probe is None:
        got = run_gguf(path, probes(tokenizer, probe_prompt)[0], COMPARED_TOKENS)
        warnings.append("every probe got an empty answer (EOS first) from the merged model, so llama.cpp's answer "
                        "was not compared; check the GGUF with a prompt of your own.")
        return {"ran": True, "compared": False, "answer": got["text"]}
    got = run_gguf(path, probe, COMPARED_TOKENS)
    result = _agreement(expected["tokens"], got["tokens"], expected["stops"], got["stopped"])
    result.update({"ran": True, "compared": True, "probe": probe.describe(), "answer": got["text"],
                   "merged_model_answer": expected["text"],
                   "prompt_tokens_match": got["prompt_ids"] == expected["prompt_ids"]})
    if not result["greedy_matches_merged_model"] and result["matching_tokens"] < len(got["tokens"]):
        at = result["matching_tokens"]
        result["merged_model_margin_at_divergence"] = prefers_by(
            model, expected["prompt_ids"] + expected["tokens"][:at], expected["tokens"][at], got["tokens"][at])
    del model
    _warn(result, quant, warnings)
    log.info("llama.cpp ran %s: %s/%s greedy tokens as the merged model", path.name, result["matching_tokens"],
             result["tokens_compared"])
    return result


def _answered_probe(model: Any, tokenizer: Any, probe_prompt: str | None,
                    warnings: list[str]) -> tuple[Probe | None, dict[str, Any]]:
    for probe in probes(tokenizer, probe_prompt):
        expected = greedy_tokens(model, tokenizer, probe, COMPARED_TOKENS)
        if not is_empty(expected["tokens"], expected["stops"]):
            return probe, expected
        warnings.append(f"the merged model answers the probe {probe.label!r} ({probe.kind}) with nothing (EOS "
                        f"first), which proves nothing about the GGUF; tried the next probe instead.")
    return None, {}


def _agreement(expected: list[int], got: list[int], stops: list[int], got_stopped: bool) -> dict[str, Any]:
    """Leading tokens that agree, out of transformers' answer (at most COMPARED_TOKENS, its stop token counted)."""
    same = 0
    for a, b in zip(expected, got):
        if a != b:
            break
        same += 1
    return {"tokens_compared": len(expected), "matching_tokens": same,
            "agreement": round(same / len(expected), 4) if expected else None,
            "greedy_matches_merged_model": got == expected,
            # transformers stopped and llama.cpp went on: the stop token is not end-of-generation in the GGUF
            "stops_where_merged_model_stops": not (expected and expected[-1] in stops and same == len(expected)
                                                   and not got_stopped)}


def _warn(result: dict[str, Any], quant: str, warnings: list[str]) -> None:
    agreement = f"{result['matching_tokens']}/{result['tokens_compared']} greedy tokens"
    if not result["prompt_tokens_match"]:
        warnings.append("llama.cpp tokenizes the probe differently from transformers, so the GGUF reads prompts "
                        "differently from the fine-tuned model.")
    if not result["stops_where_merged_model_stops"]:
        warnings.append("llama.cpp does not stop where the merged model stops: the GGUF does not treat its "
                        "end-of-turn token as end of generation.")
    margin = result.get("merged_model_margin_at_divergence")
    tie = (f" They part where the merged model's own choice leads llama.cpp's by only {margin} logits, a near-tie "
           f"that rounding flips." if margin is not None and margin < NEAR_TIE else "")
    if quant in EXACT_QUANTS and not result["greedy_matches_merged_model"]:
        warnings.append(f"llama.cpp's {quant} answer agrees with the merged model's on {agreement} only; {quant} "
                        f"should match exactly.{tie} Compare them before shipping this GGUF.")
    elif quant not in EXACT_QUANTS:
        warnings.append(f"{quant} is a low-bit type and can lose what fine-tuning taught: on the probe, llama.cpp's "
                        f"answer agrees with the merged model's on {agreement} (agreement {result['agreement']}).{tie} "
                        f"Check the facts you trained, or use q8_0.")
