"""Try, evaluate, inspect and ship a trained model through the MCP client: generate (with and without the
adapter), evaluate, inspect_dataset, and export as adapter, merged 16-bit model and GGUF, each loaded back."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, merge_agrees

MODEL = "shipper"


@pytest.fixture(scope="module")
def trained(mcp, tiny_model, demo_rows):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": MODEL, **FAST_LOAD})
    before = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": demo_rows[:8]})
    mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": demo_rows, "wait_seconds": -1,
                                  "training_config": {**FAST_TRAIN, "max_steps": 60, "output_dir": "ship-run"}})
    return before


def test_generate_answers_what_was_trained_and_stops_at_eos(mcp, trained, demo_rows):
    """With the adapter the model answers a trained prompt exactly and stops at EOS; without it (the base model)
    it does not know the answer."""
    row = demo_rows[0]
    tuned = mcp.ok("qloraevolved_generate", {"model_id": MODEL, "prompt": row["prompt"], "max_new_tokens": 24})
    assert tuned["text"].strip() == row["completion"].strip()
    assert tuned["finish_reason"] == "eos" and tuned["completion_tokens"] < 24 and tuned["used_adapter"] is True
    base = mcp.ok("qloraevolved_generate", {"model_id": MODEL, "prompt": row["prompt"], "max_new_tokens": 24,
                                            "use_adapter": False})
    assert base["used_adapter"] is False and base["text"].strip() != row["completion"].strip()


def test_generate_chat_and_sampling(mcp, trained):
    """messages go through the chat template; sampling with a seed is reproducible; bad input is refused."""
    chat = {"model_id": MODEL, "messages": [{"role": "user", "content": "Tell me about Zorbland."}],
            "max_new_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first, second = mcp.ok("qloraevolved_generate", chat), mcp.ok("qloraevolved_generate", chat)
    assert first["text"] == second["text"] and first["sampling"] == {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    assert first["prompt_tokens"] > 5  # the template wrapped the message
    assert "prompt" in mcp.error("qloraevolved_generate", {"model_id": MODEL})
    assert "temperature" in mcp.error("qloraevolved_generate", {"model_id": MODEL, "prompt": "x",
                                                                "temperature": -1})
    assert "role" in mcp.error("qloraevolved_generate", {"model_id": MODEL,
                                                         "messages": [{"role": "wizard", "content": "x"}]})


def test_evaluate_reports_loss_and_perplexity(mcp, trained, demo_rows):
    """Eval loss on the trained rows fell far below the untrained model's; perplexity is exp(loss)."""
    after = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": demo_rows[:8]})
    assert after["rows"] == 8 and after["loss_on"] == "answers only"
    assert after["eval_loss"] < 0.2 * trained["eval_loss"], (trained["eval_loss"], after["eval_loss"])
    assert math.isclose(after["perplexity"], math.exp(after["eval_loss"]), rel_tol=1e-6)


def test_evaluate_computes_the_eval_loss_as_training_does(mcp, trained, demo_rows):
    """evaluate's eval_loss on the rows training evaluated equals the one the train answer reports (the same
    dataset preparation, and the same precision: float32 where this CPU emulates bf16)."""
    rows = demo_rows[:8]
    answer = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": rows, "eval_dataset": rows,
                                           "wait_seconds": -1, "training_config": {
                                               **FAST_TRAIN, "max_steps": 1, "learning_rate": 1e-7,
                                               "output_dir": "ship-eval-run"}})
    after = mcp.ok("qloraevolved_evaluate", {"model_id": MODEL, "eval_dataset": rows,
                                             "batch_size": FAST_TRAIN["batch_size"]})  # the same batches
    assert after["eval_loss"] == pytest.approx(answer["metrics"]["eval_loss"], rel=1e-4)
    assert answer["effective_config"]["float32_compute"] is any("float32" in w for w in after["warnings"])


def test_inspect_dataset_shows_examples_as_trained_and_finds_problems(mcp, trained, demo_rows, workspace):
    """With a model: examples rendered with the trained part marked and ending in EOS, token statistics, rows
    max_length would cut; problems found: empty fields, mixed formats, duplicates."""
    long_row = {"prompt": "word " * 300, "completion": "long answer"}
    rows = demo_rows[:6] + [demo_rows[0], long_row, {"prompt": "empty answer", "completion": ""}]
    answer = mcp.ok("inspect_dataset", {"dataset": rows, "model_id": MODEL})
    assert answer["format"] == "prompt_completion" and answer["rows"] == 9 and answer["usable_rows"] == 8
    example = answer["examples"][0]
    assert example.startswith(demo_rows[0]["prompt"]) and example.endswith("</s>[[/TRAIN]]")
    assert answer["length_tokens"]["max"] > 128 and answer["truncated_rows"] == 1 and answer["max_length"] == 128
    problems = " ".join(answer["problems"])
    assert "empty" in problems and "duplicate" in problems and "max_length=128" in problems

    mixed = demo_rows[:3] + [{"text": "plain text row"}]
    problems = " ".join(mcp.ok("inspect_dataset", {"dataset": mixed})["problems"])
    assert "mixed row formats" in problems
    chat_file = workspace / "chat.jsonl"
    chat_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                          {"role": "assistant", "content": r["completion"]}]}) + "\n"
                                 for r in demo_rows[:4]))
    chat = mcp.ok("inspect_dataset", {"dataset": "chat.jsonl", "model_id": MODEL})
    assert chat["format"] == "messages" and chat["problems"] == []
    assert "[[TRAIN]]" in chat["examples"][0] and chat["examples"][0].rstrip().endswith("[[/TRAIN]]")
    plain = mcp.ok("inspect_dataset", {"dataset": "chat.jsonl"})  # no model: generic layout, character counts
    assert "length_chars" in plain and "length_tokens" not in plain


def test_export_adapter_reloads_with_peft(mcp, trained, tiny_model, demo_rows, workspace):
    answer = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "adapter", "output_dir": "exp/adapter"})
    assert answer["status"] == "success" and (workspace / "exp/adapter/adapter_config.json").is_file()
    from llm_mcp.engine.infer.generate import count_reproduced

    assert count_reproduced(workspace / "exp/adapter", tiny_model, demo_rows[:4]) >= 3


def test_export_merged_loads_with_plain_transformers(mcp, trained, demo_rows, workspace):
    """The merged folder has no quantization config, keeps EOS and the chat template, and plain transformers
    generates the trained answer from it, as the adapter model does."""
    row = demo_rows[1]
    answer = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "merged_16bit", "output_dir": "exp/merged",
                                            "probe_prompt": row["prompt"]})
    assert merge_agrees(answer["verified"])
    merged = workspace / "exp/merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] is not None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template and tokenizer.eos_token == "</s>"
    ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert out[0, -1].item() == tokenizer.eos_token_id  # it stops by itself
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["completion"].strip()


def test_export_never_overwrites_unasked(mcp, trained, workspace):
    text = mcp.error("qloraevolved_export", {"model_id": MODEL, "format": "adapter", "output_dir": "exp/adapter"})
    assert "output_dir" in text and "overwrite" in text
    (workspace / "mine").mkdir()
    (workspace / "mine" / "notes.md").write_text("keep me")
    text = mcp.error("qloraevolved_export", {"model_id": MODEL, "format": "adapter", "output_dir": "mine",
                                             "overwrite": True})
    assert "notes.md" in text and "overwrite only replaces an earlier export" in text
    assert (workspace / "mine" / "notes.md").read_text() == "keep me"
    again = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "adapter", "output_dir": "exp/adapter",
                                           "overwrite": True})
    assert again["status"] == "success"


def test_export_gguf_with_modelfile_reads_back(mcp, trained, workspace, demo_rows):
    """gguf: adapter/ and merged/ beside a q8_0 GGUF that the gguf reader (and transformers) loads back, and an
    Ollama Modelfile with the chat template and the EOS stop token."""
    answer = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "gguf", "output_dir": "exp/gguf",
                                            "gguf_quantization": "q8_0", "probe_prompt": demo_rows[2]["prompt"]})
    out = workspace / "exp/gguf"
    assert (out / "adapter/adapter_config.json").is_file() and (out / "merged/config.json").is_file()
    assert merge_agrees(answer["verified_merged"])
    verified = answer["verified"]
    assert verified["architecture"] == "llama" and verified["has_tokenizer"] and verified["has_chat_template"]
    assert verified["tensor_count"] == 2 * 9 + 3 and "Q8_0" in verified["tensor_types"]
    if "verified_llama_cpp" in answer and answer["verified_llama_cpp"]["ran"]:  # with the [gguf] extra
        assert isinstance(answer["verified_llama_cpp"]["answer"], str)
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and "{{ .Prompt }}" in modelfile and 'stop "</s>"' in modelfile

    import torch
    from transformers import AutoModelForCausalLM

    reread = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    # Every weight read back is the merged weight after q8_0 rounding and nothing else: checked against gguf's own
    # q8_0 round trip of that weight, so the bound does not hang on how training went on this machine.
    import gguf.quants
    from gguf import GGMLQuantizationType

    merged_weights = merged.state_dict()
    compared, rounded_weights = 0, {}
    for name, value in reread.state_dict().items():
        expected = merged_weights[name].numpy()
        if value.ndim == 2 and value.shape[-1] % 32 == 0 and not name.endswith("norm.weight"):
            rounded = gguf.quants.dequantize(gguf.quants.quantize(expected, GGMLQuantizationType.Q8_0),
                                             GGMLQuantizationType.Q8_0)
            if abs(value.numpy() - rounded).max() <= 1e-6:
                compared += 1
                rounded_weights[name] = torch.from_numpy(rounded.copy())
                continue
        assert abs(value.numpy() - expected).max() <= 1e-6, f"{name} differs beyond q8_0 rounding"
    assert compared >= 2 * 7  # the attention and MLP projections of both layers really went through q8_0
    # The GGUF runs as the merged model with those q8_0-rounded weights does: the same logits up to float noise
    # (how far q8_0 itself moves the logits depends on how training went, so it is not the measure).
    merged.load_state_dict(rounded_weights, strict=False)
    ids = torch.tensor([[1, 5, 9, 14, 30]])
    with torch.no_grad():
        reread_logits, rounded_logits = reread(ids).logits, merged(ids).logits
    assert (reread_logits - rounded_logits).abs().max() <= 1e-4 * max(1.0, rounded_logits.abs().max().item())


def _need_llama_cpp() -> None:
    if not os.environ.get("LLM_MCP_REQUIRE_LLAMA_CPP"):
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional [gguf] extra")


def test_export_gguf_k_quant_runs_in_llama_cpp_and_replaces_cleanly(mcp, trained, workspace, demo_rows):
    """q4_k_m through llama.cpp's own quantizer (llama-cpp-python): the answer says what llama.cpp answered and how
    many greedy tokens agree with the merged model, and warns that low-bit types can lose what was learned; the
    export is renamed into place (no temporary folder left), and overwrite=true replaces it whole."""
    _need_llama_cpp()
    from llm_mcp.engine.export.gguf_run import COMPARED_TOKENS

    answer = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "gguf", "output_dir": "exp/q4",
                                            "gguf_quantization": "q4_k_m", "probe_prompt": demo_rows[2]["prompt"]})
    out = workspace / "exp/q4"
    assert answer["quantization"] == "q4_k_m" and answer["verified"]["file_type"] == 15
    assert (out / "model-q4_k_m.gguf").is_file() and not list(out.parent.glob("q4.tmp-*"))
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter", "export.json", "merged",
                                                     "model-q4_k_m.gguf"]  # no intermediate f16 file
    ran = answer["verified_llama_cpp"]
    assert ran["ran"] and isinstance(ran["answer"], str)
    # the probe is a trained prompt: the merged model answers it, so llama.cpp's answer is compared with that
    assert ran["compared"] is True, (ran, answer["warnings"])
    matching, compared = ran["matching_tokens"], ran["tokens_compared"]
    assert 0 < compared <= COMPARED_TOKENS and 0 <= matching <= compared, ran
    assert any("can lose what fine-tuning taught" in w and f"{matching}/{compared} greedy tokens" in w
               for w in answer["warnings"]), answer["warnings"]
    again = mcp.ok("qloraevolved_export", {"model_id": MODEL, "format": "gguf", "output_dir": "exp/q4",
                                           "gguf_quantization": "f16", "verify": False, "overwrite": True})
    assert again["quantization"] == "f16" and "verified_llama_cpp" not in again
    assert (out / "model-f16.gguf").is_file() and not (out / "model-q4_k_m.gguf").exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_first_disagreement_tells_a_near_tie_from_a_real_difference(tiny_model):
    """The check behind near_tie: a model agrees with its own greedy answer, and parts from an answer it ranks last
    by far more than NEAR_TIE logits (a damaged merge would look like that, a 16-bit rounding flip would not)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_mcp.engine.export.probe import NEAR_TIE, first_disagreement, greedy_tokens, probes

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    probe = probes(tokenizer, None)[-1]  # the raw probe: no chat template needed
    own = greedy_tokens(model, tokenizer, probe, 8)
    assert own["tokens"] and first_disagreement(model, own["prompt_ids"], own["tokens"]) is None
    with torch.no_grad():
        last = model(torch.tensor([own["prompt_ids"]])).logits[0, -1].argmin().item()
    split = first_disagreement(model, own["prompt_ids"], [last] + own["tokens"][1:])
    assert split["position"] == 0 and split["margin"] > NEAR_TIE
