"""Resources (the jobs, each job's status, log tail and loss curve, the loaded models) and the workflow prompts,
read through the MCP client."""

from __future__ import annotations

import json

from conftest import FAST_LOAD, FAST_TRAIN

MODEL = "seen"


def _text(result) -> str:
    return result.contents[0].text


def test_resources_show_the_jobs_and_models(mcp, tiny_model, demo_rows):
    listed = mcp.run(mcp.client.list_resources())
    assert {"llm-mcp://jobs", "llm-mcp://models"} <= {str(r.uri) for r in listed.resources}
    templates = {t.uri_template for t in mcp.run(mcp.client.list_resource_templates()).resource_templates}
    assert {"llm-mcp://jobs/{job_id}", "llm-mcp://jobs/{job_id}/log", "llm-mcp://jobs/{job_id}/loss.png"} <= templates

    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": MODEL, **FAST_LOAD})
    models = json.loads(_text(mcp.run(mcp.client.read_resource("llm-mcp://models"))))["models"]
    assert models[MODEL]["family"] == "qloraevolved" and models[MODEL]["model_name"] == str(tiny_model)

    trained = mcp.ok("qloraevolved_train", {"model_id": MODEL, "train_dataset": demo_rows, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, "max_steps": 6, "logging_steps": 1,
                                                                "output_dir": "seen-run"}})
    job_id = trained["job_id"]
    jobs = json.loads(_text(mcp.run(mcp.client.read_resource("llm-mcp://jobs"))))["jobs"]
    mine = next(j for j in jobs if j["job_id"] == job_id)
    assert mine["state"] == "succeeded" and mine["step"] == 6 and mine["uri"] == f"llm-mcp://jobs/{job_id}"

    status = json.loads(_text(mcp.run(mcp.client.read_resource(mine["uri"]))))
    tool_status = mcp.ok("qloraevolved_training_status", {"job_id": job_id})
    assert status["state"] == tool_status["state"] == "succeeded"
    assert status["recent_losses"] == tool_status["recent_losses"] and len(status["recent_losses"]) >= 6

    log = _text(mcp.run(mcp.client.read_resource(mine["log_uri"])))
    assert log == "\n".join(tool_status["log_tail"]) and "train_loss" in log  # the run's own last lines

    png = mcp.run(mcp.client.read_resource(mine["loss_curve_uri"])).contents[0]
    assert png.mime_type == "image/png" and png.blob  # base64 of a PNG
    import base64

    assert base64.b64decode(png.blob).startswith(b"\x89PNG")


def test_an_unknown_job_resource_is_an_error_naming_it(mcp):
    import pytest

    with pytest.raises(Exception, match="job_id"):
        mcp.run(mcp.client.read_resource("llm-mcp://jobs/no-such-job"))


def test_prompts_walk_through_the_tools_with_the_arguments(mcp):
    names = {p.name for p in mcp.run(mcp.client.list_prompts()).prompts}
    assert {"finetune-on-my-data", "compare-before-after", "export-for-ollama"} <= names
    got = mcp.run(mcp.client.get_prompt("finetune-on-my-data", {"model_name": "my/model", "dataset": "tickets.jsonl"}))
    text = got.messages[0].content.text
    tools = set(mcp.tools())
    for step in ("inspect_dataset", "estimate_memory", "qloraevolved_load_model", "qloraevolved_train",
                 "qloraevolved_training_status", "qloraevolved_generate"):
        assert step in text and step in tools, step  # every tool it names exists
    assert "'tickets.jsonl'" in text and "'my/model'" in text
    ollama = mcp.run(mcp.client.get_prompt("export-for-ollama", {"model_id": "m1", "quantization": "q4_k_m"}))
    assert "gguf_quantization='q4_k_m'" in ollama.messages[0].content.text


def test_a_prompt_asked_wrongly_is_an_invalid_params_error(mcp):
    """An unknown prompt, or one without its required arguments: JSON-RPC -32602 naming what is wrong."""
    from mcp.shared.exceptions import MCPError

    for name, args, words in (("no-such-prompt", {}, ["finetune-on-my-data"]),
                              ("finetune-on-my-data", {"model_name": "m"}, ["dataset"])):
        try:
            mcp.run(mcp.client.get_prompt(name, args))
        except MCPError as exc:
            assert exc.error.code == -32602 and all(w in exc.error.message for w in words), exc.error
        else:
            raise AssertionError(f"get_prompt({name!r}, {args}) did not fail")
