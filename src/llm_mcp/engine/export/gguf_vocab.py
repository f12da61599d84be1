"""The tokenizer of a Hugging Face folder written into a GGUF the way llama.cpp's convert_hf_to_gguf.py writes it:
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: tokenizer model "gpt2" with merges and a pre-tokenizer name) or
SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma tokenizer.json: model "llama" with scores and
byte tokens), plus special tokens, add_bos/add_eos and the chat template. Reads tokenizer files only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from llm_mcp.errors import ExportError

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
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_NEXT_STEP = "export format merged_16bit works for any tokenizer"


def add_vocab(writer: gguf.GGUFWriter, folder: Path, hp: dict[str, Any], warnings: list[str]) -> list[str]:
    """Tokens, types (and scores or merges), special ids, add_bos/add_eos and the chat template; returns the
    token list written."""
    from transformers import AutoTokenizer

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{str(folder)!r} has no tokenizer.json; GGUF export needs a fast (tokenizers) BPE "
                          f"tokenizer. The {_NEXT_STEP}.", kind="unsupported_tokenizer")
    tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tok_json.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(tok_json.get("pre_tokenizer")) + json.dumps(tok_json.get("decoder"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab_size = int(hp.get("vocab_size") or len(tokenizer))
    if model.get("type") == "BPE" and byte_level and not model.get("byte_fallback"):
        tokens = _byte_level_bpe(writer, tokenizer, tok_json, vocab_size, warnings)
        load_merges = True
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens = _sentencepiece_bpe(writer, tokenizer, tok_json, vocab_size)
        load_merges = False
    else:
        raise ExportError(f"tokenizer in {str(folder)!r} is {model.get('type')!r}; GGUF export here handles BPE "
                          f"tokenizers (byte-level, or with byte fallback). The {_NEXT_STEP}.",
                          kind="unsupported_tokenizer")
    _add_specials(writer, folder, tokenizer, vocab_size, load_merges, warnings)
    return tokens


def _reverse_vocab(tokenizer: Any, vocab_size: int) -> dict[int, str]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but config vocab_size is {vocab_size}; "
                          "resize the model's embeddings to the tokenizer before merging.", kind="export_failed")
    return {i: t for t, i in vocab.items()}


def _byte_level_bpe(writer: gguf.GGUFWriter, tokenizer: Any, tok_json: dict[str, Any], vocab_size: int,
                    warnings: list[str]) -> list[str]:
    """convert_hf_to_gguf's _set_vocab_gpt2 / get_vocab_base."""
    reverse = _reverse_vocab(tokenizer, vocab_size)
    added, added_decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
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
            if (info is not None and info.special) or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalise user-defined spaces, as llama.cpp does
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok_json, warnings))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return tokens


def _sentencepiece_bpe(writer: gguf.GGUFWriter, tokenizer: Any, tok_json: dict[str, Any],
                       vocab_size: int) -> list[str]:
    """A BPE tokenizer.json with byte fallback (what transformers converts a SentencePiece BPE model to) as
    llama.cpp's "llama" (SentencePiece) vocabulary: pieces keep their U+2581 spaces, <0xNN> pieces are BYTE
    tokens, and each merged piece scores minus its merge rank, so llama.cpp's highest-score-first merging follows
    the BPE merge order."""
    reverse = _reverse_vocab(tokenizer, vocab_size)
    rank: dict[str, int] = {}
    for r, merge in enumerate(tok_json["model"].get("merges") or []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    special_ids = set(tokenizer.all_special_ids)
    added, unk = tokenizer.get_added_vocab(), tok_json["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        if token == unk:
            kind = gguf.TokenType.UNKNOWN
        elif _BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        elif i in special_ids or (token in added and looks_special(token)):
            kind = gguf.TokenType.CONTROL
        elif token in added:
            kind = gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        scores.append(-float(rank[token]) if token in rank else (0.0 if kind == gguf.TokenType.NORMAL else -1000.0))
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tok_json))
    return tokens


def _adds_space_prefix(tok_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts U+2581 before the first word (Llama 2, Mistral: yes; Gemma: no)."""
    blob = json.dumps(tok_json.get("normalizer")) + json.dumps(tok_json.get("pre_tokenizer"))
    if '"Prepend"' in blob:
        return True
    pre = json.dumps(tok_json.get("pre_tokenizer"))
    return '"Metaspace"' in pre and '"prepend_scheme": "never"' not in pre and '"add_prefix_space": false' not in pre


def _add_specials(writer: gguf.GGUFWriter, folder: Path, tokenizer: Any, vocab_size: int, load_merges: bool,
                  warnings: list[str]) -> None:
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=vocab_size)
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
    if load_merges and not special.merges:
        warnings.append("tokenizer.json has no merges; llama.cpp cannot tokenize with this GGUF.")


def pre_tokenizer_name(tok_json: dict[str, Any], warnings: list[str]) -> str:
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


def looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special: some models mark control tokens as not special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))
