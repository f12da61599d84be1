"""The unsloth_* family through the MCP client: real Unsloth (its CPU mode) in its own interpreter, and the
transformers fallback where Unsloth cannot be imported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import HW, McpSession, lora_param_count, merge_agrees, server_config, unsloth_python
from llm_mcp.server.app import create_server

SPEC_TRAINING_DEFAULTS = {"learning_rate": 2e-4, "batch_size": 2, "gradient_accumulation_steps": 4, "warmup_steps": 10,
                          "max_steps": 100, "output_dir": "unsloth_finetuned_model", "logging_steps": 1,
                          "save_steps": 100, "optim": "adamw_8bit", "weight_decay": 0.01,
                          "lr_scheduler_type": "cosine", "seed": 42, "use_gradient_checkpointing": True}
MEMORISE = {"learning_rate": 3e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 0,
            "max_steps": 80, "lr_scheduler_type": "constant", "logging_steps": 5, "output_dir": "u-run",
            "report_to": "none"}


@pytest.fixture(scope="module")
def umcp(workspace, tiny_model):
    config = server_config(workspace, tiny_model, unsloth_python=unsloth_python())
    with McpSession(create_server(config)) as session:
        yield session


def test_unsloth_tool_schemas_carry_the_spec_defaults(mcp):
    """unsloth_load_model and the training_config of unsloth_prepare_for_training have the spec's defaults."""
    tools = mcp.tools()
    load = tools["unsloth_load_model"].input_schema["properties"]
    assert {k: load[k].get("default") for k in ("max_seq_length", "load_in_4bit", "token", "device_map")} == {
        "max_seq_length": 2048, "load_in_4bit": True, "token": None, "device_map": "auto"}
    prepare = tools["unsloth_prepare_for_training"].input_schema
    fields = prepare["$defs"]["UnslothTrainingConfig"]["properties"]
    assert {k: fields[k]["default"] for k in SPEC_TRAINING_DEFAULTS} == SPEC_TRAINING_DEFAULTS
    assert sorted(tools["unsloth_train"].input_schema["required"]) == ["model_id", "train_dataset"]


def test_real_unsloth_flow(umcp, tiny_model, demo_rows, workspace):
    """load -> prepare -> train -> generate -> export -> list -> unload with Unsloth itself: the spec's keys,
    engine 'unsloth', the loss falls, the model answers what it learned, the merged export matches it, and the
    adapter reloads with plain peft and reproduces trained answers."""
    loaded = umcp.ok("unsloth_load_model", {"model_name": str(tiny_model), "max_seq_length": 128})
    assert {"status", "model_id", "model_name", "max_seq_length", "dtype", "device"} <= set(loaded)
    assert loaded["model_id"] == "tiny-llama-unsloth" and loaded["engine"] == "unsloth"
    assert loaded["max_seq_length"] == 128 and loaded["device"] == HW.device
    second = umcp.ok("unsloth_load_model", {"model_name": str(tiny_model), "max_seq_length": 128})
    assert second["model_id"] == "tiny-llama-unsloth-2"  # a taken id gets a number, never an overwrite
    umcp.ok("unsloth_unload_model", {"model_id": second["model_id"]})

    prepared = umcp.ok("unsloth_prepare_for_training", {"model_id": loaded["model_id"], "training_config": MEMORISE})
    assert prepared["message"] == "Model tiny-llama-unsloth prepared for training"
    # Unsloth's default LoRA: r=16 on every projection, exactly r x (in + out) per adapted layer
    assert prepared["trainable_params"] == lora_param_count(tiny_model, 16) < prepared["total_params"]
    assert prepared["engine"] == "unsloth"

    trained = umcp.ok("unsloth_train", {"model_id": loaded["model_id"], "train_dataset": demo_rows,
                                        "wait_seconds": -1})
    assert trained["status"] == "success" and trained["engine"] == "unsloth"
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"} <= set(
        trained["metrics"])
    assert trained["output_dir"] == "u-run/final"
    assert trained["loss"]["last"] < 0.3 * trained["loss"]["first"]

    row = demo_rows[0]
    answer = umcp.ok("unsloth_generate", {"model_id": loaded["model_id"], "prompt": row["prompt"],
                                          "max_new_tokens": 16})
    assert answer["text"].strip() == row["completion"].strip() and answer["finish_reason"] == "eos"
    exported = umcp.ok("unsloth_export", {"model_id": loaded["model_id"], "format": "merged_16bit",
                                          "output_dir": "u-merged", "probe_prompt": row["prompt"]})
    assert merge_agrees(exported["verified"])  # Unsloth's LoRA layers merge too

    listed = umcp.ok("unsloth_list_models")
    assert set(listed) == {"tiny-llama-unsloth"}
    assert set(listed["tiny-llama-unsloth"]["config"]) == {"model_name", "max_seq_length", "dtype", "load_in_4bit",
                                                           "device_map"}
    assert umcp.ok("unsloth_unload_model", {"model_id": "tiny-llama-unsloth"}) == {
        "status": "success", "message": "Model tiny-llama-unsloth unloaded"}
    assert umcp.ok("unsloth_list_models") == {}
    _assert_adapter_reproduces(workspace / trained["output_dir"], tiny_model, demo_rows)


def _assert_adapter_reproduces(adapter: Path, tiny_model: Path, rows: list[dict]) -> None:
    from llm_mcp.engine.infer.generate import count_reproduced

    hits = count_reproduced(adapter, tiny_model, rows[:6], compute_dtype="bfloat16")
    assert hits >= 4, f"only {hits}/6 trained answers reproduced by the reloaded adapter"


def test_fallback_engine_says_so(mcp, tiny_model, demo_rows):
    """Where Unsloth cannot be imported (this environment), the unsloth tools still work through the transformers
    engine, say engine='transformers' in every answer, and warn why."""
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("Unsloth is importable in this environment: the fallback does not run here")
    loaded = mcp.ok("unsloth_load_model", {"model_name": str(tiny_model), "max_seq_length": 128})
    assert loaded["engine"] == "transformers"
    assert any("Unsloth could not be imported" in w for w in loaded["warnings"])
    prepared = mcp.ok("unsloth_prepare_for_training", {"model_id": loaded["model_id"]})
    assert prepared["engine"] == "transformers" and prepared["config"]["r"] == 16
    trained = mcp.ok("unsloth_train", {"model_id": loaded["model_id"], "train_dataset": demo_rows,
                                       "wait_seconds": -1,
                                       "training_config": {"max_steps": 3, "output_dir": "fallback"}})
    assert trained["status"] == "success" and trained["engine"] == "transformers"
    text = mcp.error("unsloth_train", {"model_id": loaded["model_id"], "train_dataset": demo_rows,
                                       "training_config": {"r": 8, "output_dir": "fallback2"}})
    assert "LoRA" in text and "load the model again" in text
    text = mcp.error("unsloth_prepare_for_training", {"model_id": loaded["model_id"], "training_config": {"r": 8}})
    assert "r" in text and "load the model again" in text  # a second prepare cannot silently keep the old adapter
    text = mcp.error("unsloth_prepare_for_training", {"model_id": loaded["model_id"],
                                                      "training_config": {"bf16": True, "fp16": True}})
    assert "fp16" in text
    text = mcp.error("unsloth_prepare_for_training", {"model_id": loaded["model_id"],
                                                      "training_config": {"learing_rate": 1e-3}})
    assert "learing_rate" in text
    mcp.ok("unsloth_unload_model", {"model_id": loaded["model_id"]})


def test_real_unsloth_trains_every_method(umcp, tiny_model):
    """dpo, orpo, kto and grpo through unsloth_train under Unsloth (its patched TRL trainers): each ends with its
    own metrics, and the model keeps one adapter to generate with."""
    from test_methods import TRAIN
    from test_methods_more import CAPITAL, GRPO_ROWS, KTO_ROWS

    model = umcp.ok("unsloth_load_model", {"model_name": str(tiny_model), "max_seq_length": 128})["model_id"]
    base = {**MEMORISE, "batch_size": 4, "max_steps": 3, "logging_steps": 1, "learning_rate": 1e-3}
    runs = {"dpo": (TRAIN, {}, "rewards/margins"), "orpo": (TRAIN, {}, "log_odds_ratio"),
            "kto": (KTO_ROWS, {}, "kl"),
            "grpo": (GRPO_ROWS, {"num_generations": 4, "max_completion_length": 3, "rewards": CAPITAL},
                     "rewards/regex/mean")}
    for method, (rows, settings, metric) in runs.items():
        trained = umcp.ok("unsloth_train", {"model_id": model, "train_dataset": rows, "method": method,
                                            "wait_seconds": -1,
                                            "training_config": {**base, **settings, "output_dir": f"u-{method}"}})
        assert trained["status"] == "success" and trained["engine"] == "unsloth", (method, trained)
        assert trained["effective_config"]["method"] == method and metric in trained["metrics"], method
        if not HW.has_cuda:  # Unsloth's CPU mode patches SFTTrainer only, and the answer says so
            assert any(f"method={method!r} ran TRL's" in w for w in trained["warnings"]), trained["warnings"]
    assert umcp.ok("unsloth_generate", {"model_id": model, "prompt": "Is a cat real?",
                                        "max_new_tokens": 4})["completion_tokens"] >= 1
    umcp.ok("unsloth_unload_model", {"model_id": model})
