"""The tool list and each tool's JSON schema: the spec's names, parameters, defaults and enums."""

from __future__ import annotations

import subprocess
import sys

import pytest

QLORA_TOOLS = {"qloraevolved_load_model", "qloraevolved_prepare_for_training", "qloraevolved_train",
               "qloraevolved_unload_model", "qloraevolved_list_models"}

LOAD_DEFAULTS = {"model_id": None, "max_length": 2048, "load_in_4bit": True, "quant_type": "nf4",
                 "use_double_quant": True, "compute_dtype": "bfloat16", "lora_rank": 64, "lora_alpha": 16,
                 "lora_dropout": 0.1, "target_modules": None, "device_map": "auto", "trust_remote_code": False}
PREPARE_DEFAULTS = {"output_dir": "./qlora_evolved_output", "learning_rate": 2e-4, "batch_size": 4,
                    "gradient_accumulation_steps": 4, "num_train_epochs": 3, "max_steps": -1, "warmup_ratio": 0.03,
                    "weight_decay": 0.01, "optim": "paged_adamw_32bit", "lr_scheduler_type": "cosine",
                    "max_grad_norm": 0.3, "logging_steps": 10, "save_steps": 200, "save_total_limit": 3,
                    "report_to": "tensorboard", "use_gradient_checkpointing": True, "use_flash_attention_2": True,
                    "use_cpu_offload": False}


def _enum(schema: dict, name: str) -> list:
    prop = schema["properties"][name]
    for option in prop.get("anyOf", [prop]):
        if "enum" in option:
            return option["enum"]
    raise AssertionError(f"{name} has no enum: {prop}")


def test_tool_list_has_the_spec_tools(mcp):
    """Every qloraevolved_* tool of the spec is listed, each with a description."""
    tools = mcp.tools()
    assert QLORA_TOOLS <= set(tools)
    assert all(tools[name].description for name in QLORA_TOOLS)


def test_every_tool_has_a_title_and_behaviour_hints(mcp):
    """Clients auto-approve read-only tools and warn before destructive ones from the annotations: every tool has a
    title and all four hints; the status, listing, generation, evaluation and inspection tools are read-only;
    unload, cancel and export (overwrite) are marked destructive."""
    tools = mcp.tools()
    for name, tool in tools.items():
        hints = tool.annotations
        assert tool.title and hints is not None and hints.title == tool.title, name
        assert None not in (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint,
                            hints.open_world_hint), name
    read_only = {"list_models", "training_status", "list_jobs", "generate", "evaluate"}
    for family in ("qloraevolved", "unsloth"):
        for base in read_only:
            assert tools[f"{family}_{base}"].annotations.read_only_hint is True, base
        for base in ("unload_model", "cancel_training", "export"):
            hints = tools[f"{family}_{base}"].annotations
            assert hints.destructive_hint is True and hints.read_only_hint is False, base
        assert tools[f"{family}_train"].annotations.read_only_hint is False
    assert tools["estimate_memory"].annotations.read_only_hint is True
    assert tools["inspect_dataset"].annotations.read_only_hint is True


@pytest.mark.parametrize(("tool", "defaults", "required"), [
    ("qloraevolved_load_model", LOAD_DEFAULTS, ["model_name"]),
    ("qloraevolved_prepare_for_training", PREPARE_DEFAULTS, ["model_id"]),
])
def test_parameters_and_defaults_match_the_spec(mcp, tool, defaults, required):
    """Each spec parameter exists with the spec's default; only the spec's required ones are required."""
    schema = mcp.tools()[tool].input_schema
    assert sorted(schema.get("required", [])) == sorted(required)
    for name, default in defaults.items():
        assert name in schema["properties"], f"{tool} lacks {name}"
        assert schema["properties"][name].get("default") == default, name


def test_enums_and_bounds_are_in_the_schema(mcp):
    """Literal enums and numeric bounds reach the agent through the JSON schema."""
    load = mcp.tools()["qloraevolved_load_model"].input_schema
    assert _enum(load, "quant_type") == ["nf4", "nf4_optimized", "int4", "fp8", "int8", "none"]
    assert _enum(load, "compute_dtype") == ["float16", "bfloat16", "float32"]
    assert load["properties"]["lora_rank"]["minimum"] == 1
    prepare = mcp.tools()["qloraevolved_prepare_for_training"].input_schema
    assert "paged_adamw_32bit" in _enum(prepare, "optim")
    assert "cosine" in _enum(prepare, "lr_scheduler_type")
    assert _enum(prepare, "report_to") == ["tensorboard", "none"]
    train = mcp.tools()["qloraevolved_train"].input_schema
    assert sorted(train["required"]) == ["model_id", "train_dataset"]
    for name in ("eval_dataset", "training_config", "learning_rate", "batch_size", "max_steps",
                 "resume_from_checkpoint"):
        assert name in train["properties"]


def test_server_process_never_imports_torch(tmp_path):
    """Building the server, listing its tools and inspecting a dataset without a model leave torch unimported
    (fast start; the workers hold torch)."""
    code = ("import asyncio, sys\nfrom mcp import Client\nfrom llm_mcp.server.app import create_server\n"
            "async def main():\n    async with Client(create_server()) as c:\n        await c.list_tools()\n"
            "        r = await c.call_tool('inspect_dataset', {'dataset': [{'text': 'hello'}]})\n"
            "        assert not r.is_error, r\n"
            "asyncio.run(main())\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_families_option_lists_only_the_named_family(workspace, tiny_model):
    """--families qloraevolved: no unsloth_* tool is listed (a smaller tool list in every agent's context); the
    family-neutral tools stay."""
    from conftest import McpSession, server_config
    from llm_mcp.server.app import create_server

    with McpSession(create_server(server_config(workspace, tiny_model, families=("qloraevolved",)))) as session:
        names = set(session.tools())
    assert QLORA_TOOLS <= names and {"estimate_memory", "inspect_dataset"} <= names
    assert not [n for n in names if n.startswith("unsloth_")]


def test_output_schemas_name_the_spec_keys(mcp):
    """Each answer is typed: its outputSchema requires the spec's keys with their types and lists our additions
    as optional, open to more keys (an added key never breaks a client)."""
    tools = mcp.tools()
    spec = {"qloraevolved_load_model": {"status", "model_id", "model_name", "trainable_params", "total_params",
                                        "config"},
            "qloraevolved_prepare_for_training": {"status", "message", "config"},
            "qloraevolved_train": {"status", "output_dir"},
            "qloraevolved_list_models": {"status", "models"},
            "unsloth_load_model": {"status", "model_id", "model_name", "max_seq_length", "dtype", "device"},
            "unsloth_prepare_for_training": {"status", "message", "trainable_params", "total_params"},
            "unsloth_train": {"status", "output_dir"},
            "estimate_memory": {"status", "total_bytes", "fits"},
            "inspect_dataset": {"status", "format"}}
    for name, required in spec.items():
        schema = tools[name].output_schema
        assert schema["type"] == "object" and schema.get("additionalProperties") is True, name
        assert set(schema["required"]) == required, (name, schema["required"])
    train = tools["qloraevolved_train"].output_schema["properties"]
    assert train["status"]["enum"] == ["success", "cancelled", "running"] and "metrics" in train
    assert tools["qloraevolved_load_model"].output_schema["properties"]["trainable_params"]["type"] == "integer"
