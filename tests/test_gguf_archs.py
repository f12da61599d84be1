"""GGUF for every architecture llama.cpp runs, proven by running it: a tiny model of each architecture is loaded in
NF4, its LoRA taught four chat facts, exported through engine/export/merge.py (adapter, merged, GGUF in a temporary
sibling renamed into place), and llama.cpp (llama-cpp-python) must give the merged model's greedy tokens on the
trained probe, for f16 and q8_0. OPT, which llama.cpp cannot run, is refused with the supported list. Also: exports
never leave a half-written folder, and every merged export's generation config stops at EOS and end-of-turn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import merge_agrees
from llm_mcp.config import ExportConfig, LoadConfig
from llm_mcp.errors import ExportError, InvalidArgument
from llm_mcp.dev.tiny import demo_records
from llm_mcp.dev.tiny_archs import make_tiny_arch

if os.environ.get("LLM_MCP_REQUIRE_LLAMA_CPP"):  # CI: a missing llama-cpp-python fails here, never skips
    import llama_cpp  # noqa: F401
else:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional [gguf] extra")

GGUF_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "mixtral",
              "qwen2_moe"]
FACTS = [(r["prompt"], r["completion"].strip()) for r in demo_records()[:4]]
LEARNING_RATE, STEPS = 1e-2, 40
QUANT = {"gpt2": "nf4"}  # GPT-2's Conv1D through bitsandbytes, merged back to Conv1D's layout; the rest plain LoRA


def _untied_gemma2(folder: Path) -> Path:
    """A Gemma 2 whose lm_head is not its embedding (released Gemma models tie them, as the tiny one does)."""
    from transformers import AutoModelForCausalLM

    make_tiny_arch("gemma2", folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() + 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine contending threads slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-archs")


def _model_dir(arch: str, root: Path) -> Path:
    folder = root / "models" / arch
    if not (folder / "config.json").is_file():
        make_tiny_arch(arch, folder)
    return folder


def _trained(arch: str, root: Path):
    """The tiny model with LoRA on every projection (experts included), taught FACTS as chat turns (loss on the
    answers)."""
    from llm_mcp.engine.load.model import load_model

    quant = QUANT.get(arch, "none")
    bundle = load_model(LoadConfig(model_name=str(_model_dir(arch, root)), quant_type=quant,
                                   load_in_4bit=quant != "none", compute_dtype="float32", lora_rank=8,
                                   lora_alpha=16, lora_dropout=0.0))
    tok = bundle.tokenizer
    texts, prompt_lengths = [], []
    for q, a in FACTS:
        texts.append(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                             tokenize=False))
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        prompt_lengths.append(len(tok(prompt, add_special_tokens=False).input_ids))
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for row, n in enumerate(prompt_lengths):  # loss on the answers only, as training on chat rows does
        labels[row, :n] = -100
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    bundle.model.train()
    torch.manual_seed(0)
    for _ in range(STEPS):
        loss = bundle.model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bundle.model.eval()
    return bundle


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_gguf_runs_in_llama_cpp_with_the_merged_models_greedy_tokens(arch, arch_root):
    """export(gguf, f16) through the engine, then q8_0 from the same merged folder: llama.cpp loads each file and
    its greedy tokens on the trained probe equal transformers' on the merged folder, the trained answer."""
    from llm_mcp.engine.export.merge import export
    from llm_mcp.engine.export.gguf import export_gguf

    bundle = _trained(arch, arch_root)
    out = arch_root / "exports" / arch
    question, fact = FACTS[0]
    answer = export(bundle, ExportConfig(format="gguf", output_dir=str(out), gguf_quantization="f16"),
                    probe_prompt=question)
    assert not list(out.parent.glob("*.tmp-*"))
    assert merge_agrees(answer["verified_merged"]), answer["verified_merged"]
    ran = answer["verified_llama_cpp"]
    assert ran["ran"] and ran["compared"] and ran["probe"] == {"prompt": question, "chat_template": True}
    assert ran["merged_model_answer"] == fact, ran  # the probe really is a trained fact
    assert ran["greedy_matches_merged_model"] is True and ran["answer"] == fact, ran
    assert ran["matching_tokens"] == ran["tokens_compared"] and ran["prompt_tokens_match"], ran
    assert Path(answer["gguf_file"]) == out / "model-f16.gguf" and (out / "model-f16.gguf").is_file()
    assert answer["verified"]["tensor_types"] == ["F16", "F32"]
    assert json.loads((out / "export.json").read_text())["verified_llama_cpp"]["answer"] == fact

    q8 = export_gguf(out / "merged", arch_root / "q8" / arch, "q8_0", probe_prompt=question)
    ran = q8["verified_llama_cpp"]
    assert ran["greedy_matches_merged_model"] is True and ran["answer"] == fact, (ran, q8["warnings"])
    assert "Q8_0" in q8["verified"]["tensor_types"]
    assert not [w for w in q8["warnings"] if "agrees" in w], q8["warnings"]


def test_k_quants_report_their_measured_agreement(arch_root):
    """q4_k_m / q5_k_m / q6_k through llama-cpp-python's llama_model_quantize: each file runs, and the answer says
    low-bit types can lose what was learned, with the agreement measured on the probe."""
    from llm_mcp.engine.export.gguf import export_gguf
    from llm_mcp.engine.export.gguf_run import COMPARED_TOKENS

    merged = arch_root / "exports" / "llama" / "merged"
    if not merged.is_dir():
        pytest.skip("needs the llama export of the parametrized test")
    for quant, file_type in (("q4_k_m", 15), ("q5_k_m", 17), ("q6_k", 18)):
        out = arch_root / "kquant" / quant
        answer = export_gguf(merged, out, quant, probe_prompt=FACTS[0][0])
        assert answer["verified"]["file_type"] == file_type
        assert sorted(p.name for p in out.iterdir()) == ["Modelfile", f"model-{quant}.gguf"]  # no intermediate
        ran = answer["verified_llama_cpp"]
        matching, compared = ran["matching_tokens"], ran["tokens_compared"]
        assert ran["ran"] and ran["compared"] and 0 < compared <= COMPARED_TOKENS and 0 <= matching <= compared, ran
        # the agreement is the leading tokens that match, out of the merged model's answer
        assert ran["agreement"] == round(matching / compared, 4), ran
        note = " ".join(answer["warnings"])
        assert "can lose what fine-tuning taught" in note, note
        assert f"{matching}/{compared} greedy tokens (agreement {ran['agreement']})" in note, note


def test_opt_is_refused_before_any_work_listing_the_supported_architectures(arch_root):
    """llama.cpp has no OPT: export(gguf) raises at once, naming what is supported, and leaves no folder."""
    from llm_mcp.engine.export.merge import export
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(_model_dir("opt", arch_root)), quant_type="none",
                                   compute_dtype="float32", lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    out = arch_root / "exports" / "opt"
    with pytest.raises(ExportError, match=r"OPTForCausalLM.*llama.cpp cannot run") as info:
        export(bundle, ExportConfig(format="gguf", output_dir=str(out)))
    assert info.value.kind == "unsupported_architecture"
    for name in ("LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen2MoeForCausalLM", "GPT2LMHeadModel"):
        assert name in str(info.value)
    assert not out.exists() and not list(out.parent.glob("opt.tmp-*"))
    merged = export(bundle, ExportConfig(format="merged_16bit", output_dir=str(out)))  # merged works for OPT
    assert merged["verified"]["loads_with_transformers"]


def test_untied_gemma2_is_refused_as_llama_cpp_would_answer_differently(arch_root, tmp_path):
    """llama.cpp's gemma2 always uses the embedding as the output head: an untied lm_head is refused, clearly."""
    from llm_mcp.engine.export.gguf import export_gguf

    folder = _untied_gemma2(tmp_path / "gemma2-untied")
    with pytest.raises(ExportError, match="lm_head differs from its embed_tokens") as info:
        export_gguf(folder, tmp_path / "out", "f16")
    assert info.value.kind == "unsupported_architecture" and not (tmp_path / "out" / "model-f16.gguf").exists()


def test_a_failed_export_leaves_nothing_and_a_retry_replaces_an_earlier_export(arch_root, monkeypatch):
    """A failure in the GGUF step removes the temporary folder: no half-written export, no leftover, and the same
    call succeeds afterwards; overwrite=true replaces the earlier export in one rename."""
    import llm_mcp.engine.export.gguf as gguf_export
    from llm_mcp.engine.export.merge import export
    from llm_mcp.engine.load.model import load_model

    bundle = load_model(LoadConfig(model_name=str(_model_dir("llama", arch_root)), quant_type="nf4",
                                   compute_dtype="float32", lora_rank=4, lora_alpha=8, lora_dropout=0.0))
    out = arch_root / "atomic" / "ship"

    def broken(*args, **kwargs):
        raise ExportError("simulated GGUF failure", kind="export_failed")

    monkeypatch.setattr(gguf_export, "export_gguf", broken)
    with pytest.raises(ExportError, match="simulated"):
        export(bundle, ExportConfig(format="gguf", output_dir=str(out), verify=False))
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()

    first = export(bundle, ExportConfig(format="gguf", output_dir=str(out), gguf_quantization="q8_0", verify=False))
    assert (out / "model-q8_0.gguf").is_file() and first["gguf_file"] == str(out / "model-q8_0.gguf")
    with pytest.raises(InvalidArgument, match="overwrite"):
        export(bundle, ExportConfig(format="adapter", output_dir=str(out)))
    again = export(bundle, ExportConfig(format="adapter", output_dir=str(out), overwrite=True))
    assert again["adapter_dir"] == str(out) and (out / "adapter_config.json").is_file()
    assert not (out / "model-q8_0.gguf").exists()  # the earlier export was replaced, not merged into
    assert sorted(p.name for p in out.parent.iterdir()) == ["ship"]  # no .tmp-* or .old-* left


def test_merged_generation_config_stops_at_eos_and_the_end_of_turn_token(arch_root, tmp_path):
    """A ChatML template ending turns with <|im_end|> (not EOS): the merged folder's generation_config carries both,
    so every export (and the GGUF, whose template ends turns the same way) stops."""
    from llm_mcp.engine.export.merge import stop_token_ids
    from llm_mcp.dev.tiny import make_tokenizer

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok, tok.eos_token_id) == [tok.eos_token_id, im_end]
    assert stop_token_ids(tok, [tok.eos_token_id, im_end]) == [tok.eos_token_id, im_end]
    plain = make_tokenizer()  # its template ends turns with EOS itself
    assert stop_token_ids(plain, None) == plain.eos_token_id
