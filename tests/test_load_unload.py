"""load_model / list_models / unload_model through the MCP client, with the real NF4 + LoRA stack."""

from __future__ import annotations

import os
import re

from conftest import FAST_LOAD, HW, lora_param_count, wait_for, worker_pids

SPEC_CONFIG_KEYS = ["model_name", "max_length", "load_in_4bit", "quant_type", "use_double_quant",
                    "bnb_4bit_compute_dtype", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
                    "device_map", "trust_remote_code"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_load_nf4_answers_with_the_spec_keys(mcp, tiny_model):
    """A default (NF4, double quant) load returns the spec's keys, LoRA-only trainable params and config."""
    answer = mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "tiny-nf4"})
    assert {"status", "model_id", "model_name", "trainable_params", "total_params", "config"} <= set(answer)
    assert answer["status"] == "success" and answer["model_id"] == "tiny-nf4"
    assert list(answer["config"]) == SPEC_CONFIG_KEYS
    assert answer["config"]["quant_type"] == "nf4" and answer["config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert answer["config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]
    # rank 64 LoRA on 7 modules x 2 layers: exactly the A and B matrices, r x (in + out) each
    assert answer["trainable_params"] == lora_param_count(tiny_model, 64) < answer["total_params"]
    assert answer["device"] == HW.device


def test_auto_id_and_duplicate_id(mcp, tiny_model):
    """A generated id follows '<name>-qlora-evolved-<time>'; an id already loaded is refused, not replaced."""
    answer = mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), **FAST_LOAD})
    assert re.fullmatch(r"tiny-llama-qlora-evolved-\d{10}(-\d+)?", answer["model_id"])
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": answer["model_id"]})
    assert answer["model_id"] in text and "already loaded" in text
    mcp.ok("qloraevolved_unload_model", {"model_id": answer["model_id"]})


def test_list_models_shows_config_and_device(mcp):
    """list_models returns {status, models: {id: {config, device}}} for the loaded model."""
    answer = mcp.ok("qloraevolved_list_models")
    assert answer["status"] == "success"
    entry = answer["models"]["tiny-nf4"]
    assert list(entry["config"]) == SPEC_CONFIG_KEYS and entry["device"] == HW.device


def test_unplain_lora_and_load_in_4bit_false(mcp, tiny_model):
    """quant_type='none' is plain LoRA; load_in_4bit=false with nf4 loads unquantized and says so."""
    plain = mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "plain",
                                               "quant_type": "none", **FAST_LOAD})
    assert plain["warnings"] == []
    off = mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "off",
                                             "load_in_4bit": False, **FAST_LOAD})
    assert any("unquantized" in w for w in off["warnings"])
    # unquantized weights count at full size, so totals agree; NF4 packs two weights per byte but counts both
    assert plain["total_params"] == off["total_params"]
    for model_id in ("plain", "off"):
        mcp.ok("qloraevolved_unload_model", {"model_id": model_id})


def test_load_errors_name_the_parameter(mcp, tiny_model, tmp_path):
    """Bad inputs get tool errors that name the parameter and what is allowed; the server keeps serving."""
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model.parent / "nope")})
    assert "model_name" in text and "no such folder" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "quant_type": "nf4_optimized",
                                                 "nf4_optimized_budget": -1})
    assert "nf4_optimized_budget" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "quant_type": "q3"})
    assert "quant_type" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "lora_rank": 0})
    assert "lora_rank" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "bad/id"})
    assert "model_id" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "target_modules": ["w_nope"],
                                                 **FAST_LOAD})
    assert "target_modules" in text and "q_proj" in text
    text = mcp.error("qloraevolved_load_model", {"model_name": str(tiny_model), "lora_rnk": 8})
    assert "lora_rnk" in text and "lora_rank" in text  # a misspelt argument is refused, not silently dropped
    text = mcp.error("qloraevolved_unload_model", {"model_id": "ghost"})
    assert "ghost" in text and "tiny-nf4" in text
    text = mcp.error("qloraevolved_prepare_for_training", {"model_id": "ghost"})
    assert "qloraevolved_load_model" in text
    assert "tiny-nf4" in mcp.ok("qloraevolved_list_models")["models"]


def test_unload_ends_the_worker_process(mcp, tiny_model):
    """Unloading ends the model's worker process, so its memory returns to the system."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "to-unload", **FAST_LOAD})
    [pid] = worker_pids("to-unload")
    assert _alive(pid)
    answer = mcp.ok("qloraevolved_unload_model", {"model_id": "to-unload"})
    assert answer == {"status": "success", "message": "Model to-unload unloaded"}
    wait_for(lambda: not _alive(pid), f"the worker (pid {pid}) to exit")
    assert "to-unload" not in mcp.ok("qloraevolved_list_models")["models"]
