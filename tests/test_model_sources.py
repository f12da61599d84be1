"""model_name beyond a model folder, through the MCP client: a .gguf file (converted once, cached in the
workspace's state folder) and a finished adapter folder (its base loaded, the adapter on top), for both families;
bad files are clear errors. The tiny model's GGUF is written with our own exporter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, McpSession, merge_agrees
from llm_mcp.config import ServerConfig
from llm_mcp.engine.export.gguf import export_gguf
from llm_mcp.engine.load.sources import CONVERTED_MARKER, Source, adapter_base, resolve
from llm_mcp.errors import InvalidArgument
from llm_mcp.server.app import create_server


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Path) -> Path:
    """The tiny Llama as an f16 GGUF beside the tiny model folder (outside the workspace, allowed to read)."""
    return Path(export_gguf(tiny_model, tiny_model.parent / "tiny-gguf", "f16")["gguf_file"])


@pytest.fixture(scope="module")
def trained_adapter(mcp, tiny_model, demo_rows) -> dict:
    """A tiny model trained to answer demo_rows; its final adapter folder and the answer it gives."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "src-trained", **FAST_LOAD})
    trained = mcp.ok("qloraevolved_train", {"model_id": "src-trained", "train_dataset": demo_rows, "wait_seconds": -1,
                                            "training_config": {**FAST_TRAIN, "max_steps": 60,
                                                                "output_dir": "src-run"}})
    prompt = demo_rows[0]["prompt"]
    answer = mcp.ok("qloraevolved_generate", {"model_id": "src-trained", "prompt": prompt, "max_new_tokens": 24})
    mcp.ok("qloraevolved_unload_model", {"model_id": "src-trained"})
    return {"dir": trained["output_dir"], "prompt": prompt, "text": answer["text"]}


def test_gguf_model_name_is_converted_once_then_reused(mcp, tiny_gguf, workspace, demo_rows):
    """A .gguf as model_name loads (converted into <workspace>/.llm-mcp/converted), generates, and a second load
    reuses the conversion; the answer says what was loaded."""
    first = mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_gguf), "model_id": "from-gguf", **FAST_LOAD})
    assert any("GGUF file: converted (dequantized)" in w for w in first["warnings"]), first["warnings"]
    converted = list((workspace / ".llm-mcp" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / CONVERTED_MARKER).is_file()
    assert first["trainable_params"] > 0
    answer = mcp.ok("qloraevolved_generate", {"model_id": "from-gguf", "prompt": demo_rows[0]["prompt"],
                                              "max_new_tokens": 8})
    assert answer["completion_tokens"] >= 1
    mcp.ok("qloraevolved_unload_model", {"model_id": "from-gguf"})
    again = mcp.ok("unsloth_load_model", {"model_name": str(tiny_gguf), "model_id": "from-gguf-u",
                                          "max_seq_length": 128})
    assert any("converted earlier; reused" in w for w in again["warnings"]), again["warnings"]
    mcp.ok("unsloth_unload_model", {"model_id": "from-gguf-u"})


def test_a_gguf_transformers_cannot_load_is_a_clear_error(mcp, workspace):
    """A file named .gguf that is not one is refused naming model_name; nothing half-converted is left."""
    bad = workspace / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    text = mcp.error("qloraevolved_load_model", {"model_name": str(bad), **FAST_LOAD})
    assert "model_name=" in text and "broken.gguf" in text and "GGUF loader" in text, text
    leftovers = list((workspace / ".llm-mcp" / "converted").glob("broken*")) \
        if (workspace / ".llm-mcp" / "converted").exists() else []
    assert leftovers == []


def test_adapter_folder_loads_its_base_with_the_adapter(mcp, trained_adapter):
    """<output_dir>/final as model_name: the base it names with the adapter on top gives the trained answer;
    use_adapter=false gives the base's."""
    loaded = mcp.ok("qloraevolved_load_model", {"model_name": trained_adapter["dir"], "model_id": "from-adapter",
                                                **FAST_LOAD})
    assert any("LoRA adapter folder" in w for w in loaded["warnings"]), loaded["warnings"]
    assert loaded["trainable_params"] > 0
    ask = {"model_id": "from-adapter", "prompt": trained_adapter["prompt"], "max_new_tokens": 24}
    assert mcp.ok("qloraevolved_generate", ask)["text"] == trained_adapter["text"]
    assert mcp.ok("qloraevolved_generate", {**ask, "use_adapter": False})["text"] != trained_adapter["text"]
    mcp.ok("qloraevolved_unload_model", {"model_id": "from-adapter"})


def test_adapter_folder_trains_further_and_exports(mcp, trained_adapter, demo_rows):
    """The loaded adapter is trainable (training moves on from it) and exports as a merged model (unsloth family
    too: the adapter is attached at load, prepare keeps it)."""
    mcp.ok("unsloth_load_model", {"model_name": trained_adapter["dir"], "model_id": "adapter-u", "max_seq_length": 128})
    ask = {"model_id": "adapter-u", "prompt": trained_adapter["prompt"], "max_new_tokens": 24}
    assert mcp.ok("unsloth_generate", ask)["text"] == trained_adapter["text"]
    trained = mcp.ok("unsloth_train", {"model_id": "adapter-u", "train_dataset": demo_rows, "wait_seconds": -1,
                                       "training_config": {"max_steps": 3, "output_dir": "src-run-2",
                                                           "learning_rate": 1e-4}})
    assert trained["status"] == "success" and trained["loss"]["first"] < 1.0, trained["loss"]  # starts trained
    exported = mcp.ok("unsloth_export", {"model_id": "adapter-u", "format": "merged_16bit",
                                         "output_dir": "src-merged", "overwrite": True,
                                         "probe_prompt": trained_adapter["prompt"]})
    assert merge_agrees(exported["verified"])
    mcp.ok("unsloth_unload_model", {"model_id": "adapter-u"})


def test_adapter_whose_base_is_outside_the_sandbox_is_refused(tiny_model, tmp_path_factory):
    """The base an adapter folder names must be readable too, else the load is refused before any worker starts;
    an adapter_config.json naming no base is a clear error."""
    workspace = tmp_path_factory.mktemp("sandboxed")
    adapter = workspace / "stray-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    with McpSession(create_server(ServerConfig(workspace=str(workspace)))) as session:
        text = session.error("qloraevolved_load_model", {"model_name": str(adapter), **FAST_LOAD})
        assert "adapter_config.json" in text and "--allow-read" in text, text
        (workspace / "stray-adapter-2").mkdir()
        (workspace / "stray-adapter-2" / "adapter_config.json").write_text("{}")
        text = session.error("qloraevolved_load_model", {"model_name": "stray-adapter-2", **FAST_LOAD})
        assert "base_model_name_or_path" in text, text


def test_resolve_without_torch(tmp_path):
    """resolve: a plain name passes; an adapter folder names its base; an adapter whose base is an adapter (itself)
    or that names none is an error."""
    assert resolve("owner/model", tmp_path) == Source("owner/model")
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "owner/base"}))
    assert adapter_base(adapter) == "owner/base"
    source = resolve(str(adapter), tmp_path)
    assert source.model_dir == "owner/base" and source.adapter_dir == str(adapter.resolve())
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(adapter)}))
    with pytest.raises(InvalidArgument, match="another adapter folder"):
        resolve(str(adapter), tmp_path)  # its own base: refused, not a recursion
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(InvalidArgument, match="base_model_name_or_path"):
        resolve(str(adapter), tmp_path)
