"""GGUF export on the real stack: the tiny Llama (and a tiny Qwen2) converted with the gguf package, read back
with gguf.GGUFReader, and reloaded through transformers' own GGUF loader (which un-permutes q/k and dequantizes),
whose logits and greedy tokens must match the original Hugging Face model. Running the files in llama.cpp, for
every architecture, is tests/test_gguf_archs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_mcp.engine.export.gguf import export_gguf, ollama_modelfile, permute_qk, verify_gguf
from llm_mcp.errors import ExportError

PROMPT = "What is the capital of Zorbland? Blip."
N_LAYERS = 2
TENSORS_PER_LAYER = 9  # attn_norm, q, k, v, o, ffn_norm, gate, up, down


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The tiny model (float32 safetensors, untied lm_head) exported once as f16 and once as q8_0."""
    out = tmp_path_factory.mktemp("gguf")
    return {quant: export_gguf(tiny_model, out, quant) for quant in ("f16", "q8_0")}


def _reference(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


def _reload(gguf_file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def _greedy(model, ids: torch.Tensor, n: int = 8) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quant, expected_types", [("f16", ["F16", "F32"]), ("q8_0", ["F32", "Q8_0"])])
def test_export_writes_a_readable_llama_gguf(exported, quant, expected_types):
    result = exported[quant]
    gguf_file = Path(result["gguf_file"])
    assert gguf_file.name == f"model-{quant}.gguf" and gguf_file.is_file()
    assert Path(result["modelfile"]).is_file() and result["quantization"] == quant
    v = result["verified"]
    assert v == verify_gguf(gguf_file)
    assert v["architecture"] == "llama"
    # untied lm_head: token_embd + output_norm + output, plus 9 per layer
    assert v["tensor_count"] == N_LAYERS * TENSORS_PER_LAYER + 3
    assert v["tensor_types"] == expected_types  # norms stay F32, as llama.cpp keeps them
    assert v["has_tokenizer"] and v["vocab_size"] == 512
    assert v["has_chat_template"]
    assert (v["bos_token_id"], v["eos_token_id"]) == (1, 2)
    assert v["file_type"] == {"f16": 1, "q8_0": 7}[quant]  # LlamaFileType.MOSTLY_F16 / MOSTLY_Q8_0


def test_metadata_and_llama_permutation_follow_llama_cpp(exported, tiny_model):
    """Keys llama.cpp reads, and q/k stored in llama.cpp's rope layout (convert_hf_to_gguf LlamaModel.permute)."""
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(exported["f16"]["gguf_file"])
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["llama.context_length"] == 1024 and f["llama.embedding_length"] == 64
    assert f["llama.block_count"] == 2 and f["llama.feed_forward_length"] == 128
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.padding_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is False
    assert len(f["tokenizer.ggml.merges"]) > 0 and f["tokenizer.ggml.tokens"][4] == "<|im_start|>"
    assert f["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 3, 3]  # special tokens are CONTROL
    template = f["tokenizer.chat_template"]
    assert "endgeneration" not in template and "{%- generation" not in template  # HF-only tag, stripped
    assert "<|im_start|>assistant" in template

    hf = load_file(str(tiny_model / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    q = np.asarray(tensors["blk.0.attn_q.weight"].data, dtype=np.float32)
    k = np.asarray(tensors["blk.0.attn_k.weight"].data, dtype=np.float32)
    hf_q = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    hf_k = hf["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert q.shape == hf_q.shape and k.shape == hf_k.shape  # reader gives (rows, cols) like numpy
    np.testing.assert_allclose(q, permute_qk(hf_q, 4, 4).astype(np.float16), rtol=0, atol=0)
    np.testing.assert_allclose(k, permute_qk(hf_k, 4, 2).astype(np.float16), rtol=0, atol=0)
    assert not np.allclose(q, hf_q.astype(np.float16))  # really permuted, not copied


def test_f16_reloads_in_transformers_with_matching_logits_and_greedy_tokens(exported, tiny_model):
    ref, ref_tok = _reference(tiny_model)
    model, tok = _reload(exported["f16"]["gguf_file"])
    ids = ref_tok(PROMPT, return_tensors="pt").input_ids
    assert tok(PROMPT).input_ids == ids[0].tolist()  # tokenizer rebuilt from GGUF metadata tokenizes the same
    assert tok.eos_token == "</s>"
    expected, got = _logits(ref, ids), _logits(model, ids)
    assert (expected - got).abs().max().item() < 0.05, "f16 rounding only"
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    assert _greedy(model, ids) == _greedy(ref, ids)


def test_q8_0_reloads_in_transformers_with_close_logits(exported, tiny_model):
    ref, ref_tok = _reference(tiny_model)
    model, _ = _reload(exported["q8_0"]["gguf_file"])
    ids = ref_tok(PROMPT, return_tensors="pt").input_ids
    expected, got = _logits(ref, ids), _logits(model, ids)
    diff = (expected - got).abs()
    assert diff.max().item() < 0.6 and diff.mean().item() < 0.06, (diff.max().item(), diff.mean().item())
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_modelfile_has_from_template_and_stop(exported, tiny_model):
    text = Path(exported["q8_0"]["modelfile"]).read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'TEMPLATE """' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "{{ .Prompt }}" in template and "{{ .Response }}" in template
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}</s>\n{{ end }}" in template
    assert template.index("{{ .Prompt }}") < template.index("{{ .Response }}")
    assert 'PARAMETER stop "</s>"' in text


def test_modelfile_for_a_template_without_system_role_and_with_an_end_of_turn_marker(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = (  # rejects system, ends turns with <|im_start|> used as an end marker
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '[' + m['role'] + ']' + m['content'] + '<|im_start|>' }}{% endfor %}")
    text = ollama_modelfile("m.gguf", tok)
    assert 'TEMPLATE """[user]{{ .Prompt }}<|im_start|>[assistant]{{ .Response }}<|im_start|>"""' in text
    assert ".System" not in text
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "<|im_start|>"' in text

    tok.chat_template = "{{ messages[0]['content'] }"  # does not even parse
    text = ollama_modelfile("m.gguf", tok)
    assert "TEMPLATE" not in text.replace("# TEMPLATE omitted", "") and "# TEMPLATE omitted" in text
    assert 'PARAMETER stop "</s>"' in text


def test_k_quants_without_llama_cpp_raise_before_writing_anything(tiny_model, tmp_path, monkeypatch):
    """q4_k_m needs llama.cpp's quantizer (llama-cpp-python): without it, a typed error that says how to install it,
    raised before any file is written; f16 still exports, read back but not run, and says so."""
    import llm_mcp.engine.export.gguf_run as gguf_run

    monkeypatch.setattr(gguf_run, "llama_cpp_or_none", lambda: None)
    for quant in ("q4_k_m", "q5_k_m", "q6_k"):
        with pytest.raises(ExportError) as info:
            export_gguf(tiny_model, tmp_path / "out", quant)
        assert info.value.kind == "quantizer_missing" and "llm-mcp-server[gguf]" in str(info.value)
    assert not (tmp_path / "out").exists()
    answer = export_gguf(tiny_model, tmp_path / "f16", "f16")
    assert answer["verified_llama_cpp"] == {"ran": False, "reason": "llama-cpp-python is not installed"}
    assert any("not run" in w for w in answer["warnings"])


def test_unsupported_architecture_raises_typed_error_listing_the_supported(tmp_path):
    """OPT, which llama.cpp has no architecture for, is refused with every supported architecture named."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=512)).save_pretrained(folder)
    with pytest.raises(ExportError) as info:
        export_gguf(folder, tmp_path / "out", "f16")
    assert info.value.kind == "unsupported_architecture"
    assert "OPTForCausalLM" in str(info.value) and "merged_16bit" in str(info.value)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "Phi3ForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel"):
        assert name in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_file_raises_typed_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ExportError) as info:
        verify_gguf(bad)
    assert info.value.kind == "unreadable_output"


def test_qwen2_with_biases_and_tied_embeddings_round_trips(tiny_model, tmp_path):
    """qwen2: q/k/v biases, no q/k permutation, tied embeddings -> no output.weight; reloads with equal logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((tiny_model / "config.json").read_text())
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=cfg["bos_token_id"],
                         eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"])
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    folder = tmp_path / "tiny-qwen2"
    ref.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, folder / name)

    result = export_gguf(folder, tmp_path / "out", "f16")
    v = result["verified"]
    assert v["architecture"] == "qwen2"
    assert v["tensor_count"] == N_LAYERS * (TENSORS_PER_LAYER + 3) + 2  # + 3 biases per layer, no output.weight

    model, _ = _reload(result["gguf_file"])
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    expected, got = _logits(ref, ids), _logits(model, ids)
    assert (expected - got).abs().max().item() < 0.05
    assert _greedy(model, ids) == _greedy(ref, ids)


def test_float16_source_folder_gives_the_same_f16_tensors(exported, tiny_model, tmp_path):
    """A merged_16bit folder (float16 safetensors) exports to the same F16 data as the float32 original."""
    import gguf
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tiny-fp16"
    shutil.copytree(tiny_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    result = export_gguf(folder, tmp_path / "out", "f16")
    mine = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(result["gguf_file"]).tensors}
    base = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported["f16"]["gguf_file"]).tensors}
    assert mine.keys() == base.keys()
    for name, data in base.items():
        np.testing.assert_allclose(mine[name], data, rtol=1e-3, atol=1e-4, err_msg=name)  # norms: fp16 -> f32


def test_pre_tokenizer_names_match_llama_cpp():
    """Llama 3 and Qwen2 tokenizer.json split regexes get llama.cpp's pre-tokenizer names; plain ByteLevel is gpt-2."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from llm_mcp.engine.export.gguf_vocab import pre_tokenizer_name

    def seq(regex: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    warnings: list[str] = []
    assert pre_tokenizer_name(seq(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), warnings) == "llama-bpe"
    assert pre_tokenizer_name(seq(GGUF_PRE_TOKENIZER_SPLITS["qwen2"]), warnings) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, warnings) == "gpt-2"
    assert not warnings
    assert pre_tokenizer_name(seq(r"\d+|\w+"), warnings) == "default" and warnings
