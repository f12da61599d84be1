"""SentencePiece-style tokenizers in GGUF: a BPE tokenizer.json with byte fallback (the form transformers gives Llama 2,
Mistral and Gemma tokenizers) is written as llama.cpp's "llama" vocabulary (pieces with U+2581, <0xNN> byte tokens,
scores from the merge order), and llama.cpp must tokenize text exactly as transformers does and give the same
greedy tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("LLM_MCP_REQUIRE_LLAMA_CPP"):  # CI: a missing llama-cpp-python fails here, never skips
    import llama_cpp  # noqa: F401
else:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional [gguf] extra")

TEXTS = ["Hello world, what is the capital of Zorbland?", "  two  spaces and\nnew lines\n", "ü and 東京 by bytes",
         "Numbers 12345 and 0.5", "What shape are the coins of Mirewell? Hexagons."]


def _sentencepiece_style_tokenizer():
    """Llama 2's layout at a tiny size: ids 0-2 <unk> <s> </s>, 256 byte tokens, then BPE pieces with U+2581."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llm_mcp.dev.tiny import _corpus

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for token, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _sentencepiece_style_tokenizer()
    config = LlamaConfig(vocab_size=(len(tokenizer) + 31) // 32 * 32, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("spm") / "tiny-llama-spm"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_byte_fallback_bpe_becomes_llama_cpps_sentencepiece_vocabulary(spm_model, tmp_path):
    """tokenizer.ggml.model "llama" with scores and BYTE tokens; llama.cpp tokenizes every text as transformers
    does (BOS, spaces, newlines, bytes of unseen characters), and its greedy tokens equal transformers'."""
    import gguf
    from transformers import AutoTokenizer

    from llm_mcp.engine.export.probe import Probe
    from llm_mcp.engine.export.gguf import export_gguf
    from llm_mcp.engine.export.gguf_run import run_gguf

    answer = export_gguf(spm_model, tmp_path / "out", "f16", probe_prompt="What shape are the coins?")
    fields = {k: v.contents() for k, v in gguf.GGUFReader(answer["gguf_file"]).fields.items()
              if k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.merges"}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.tokens"][3] == "<0x00>" and fields["tokenizer.ggml.token_type"][3] == 6  # BYTE
    assert fields["tokenizer.ggml.token_type"][1] == 3 and fields["tokenizer.ggml.add_bos_token"] is True

    tokenizer = AutoTokenizer.from_pretrained(spm_model)
    for text in TEXTS:
        got = run_gguf(Path(answer["gguf_file"]), Probe(text, text, False), 1)["prompt_ids"]
        assert got == tokenizer(text).input_ids, (text, got, tokenizer(text).input_ids)
    ran = answer["verified_llama_cpp"]
    assert ran["compared"] and ran["prompt_tokens_match"] and ran["greedy_matches_merged_model"], ran
