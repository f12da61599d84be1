"""The library internals each engine patch relies on (engine/patches/guard.py): every one present in the installed
torch, transformers, peft, bitsandbytes and TRL, and where one moves, the engine trains with the library's own code
and says so in the answer's warnings instead of patching wrongly."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from conftest import FAST_LOAD, FAST_TRAIN
from llm_mcp.engine.patches import apply as patches
from llm_mcp.engine.train import run as engine
from llm_mcp.engine.patches.guard import PATCH_INTERNALS, may_apply, missing_internals


@pytest.mark.parametrize("patch", sorted(PATCH_INTERNALS))
def test_the_installed_libraries_have_what_the_patch_relies_on(patch):
    """Fails after an upgrade that moved something a patch uses, naming the library and its version."""
    missing = missing_internals(patch)
    assert not missing, f"{patch} relies on: " + "; ".join(missing)


def test_every_patch_the_engine_applies_has_a_declaration():
    assert set(PATCH_INTERNALS) == set(patches.PATCHES) | {"float_weights"}  # float_weights: while generating


def test_a_moved_internal_is_named_with_the_installed_version(monkeypatch):
    """A class attribute deleted, and a forward that no longer reads an attribute, are both reported."""
    torch_version, transformers_version = version("torch"), version("transformers")
    monkeypatch.delattr(torch.nn.Module, "compile")
    assert missing_internals("torch_compile") == [
        f"torch's Module.compile (not found in torch {torch_version})",
        f"torch's Module.compile using ._compiled_call_impl (not found in torch {torch_version})"]
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: self.weight * x)
    warnings: list[str] = []
    assert not may_apply("lean_rmsnorm", warnings, ran="evaluated")
    assert warnings == [f"lean_rmsnorm was not applied: it relies on transformers' LlamaRMSNorm.forward using "
                        f".variance_epsilon (not found in transformers {transformers_version}); evaluated with the "
                        "library's own code."]
    assert may_apply("lean_lora_dropout", warnings) and len(warnings) == 1  # the others stand


def _forward_after_a_rename(self, x):
    """LlamaMLP's forward as a transformers release that renamed act_fn to activation would have it."""
    return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def _must_not_run(model):
    raise AssertionError("lean_mlp was applied although transformers' LlamaMLP moved")


def test_the_engine_trains_unpatched_and_warns_when_an_internal_moved(monkeypatch, tiny_model, demo_rows, tmp_path):
    """LlamaMLP.forward no longer reads act_fn and nn.Module.compile is gone: training runs without lean_mlp and
    torch_compile, says why in warnings, and still trains; lean_rmsnorm, whose internals stand, is applied."""
    from llm_mcp.config import LoadConfig, RunOptions, TrainingConfig
    from llm_mcp.engine.load.model import load_model

    monkeypatch.setattr(LlamaMLP, "forward", _forward_after_a_rename)
    monkeypatch.setattr(LlamaMLP, "activation", property(lambda self: self.act_fn), raising=False)
    monkeypatch.delattr(torch.nn.Module, "compile")
    monkeypatch.setitem(patches.PATCHES, "lean_mlp", _must_not_run)
    bundle = load_model(LoadConfig(model_name=str(tiny_model), **FAST_LOAD))
    config = TrainingConfig(output_dir=str(tmp_path / "run"), **{**FAST_TRAIN, "optim": "adamw_torch"}, max_steps=2,
                            save_steps=10, torch_compile=True)
    answer = engine.train(bundle, config, demo_rows, None, RunOptions(), on_progress=lambda *a: None,
                          should_stop=lambda: False, notes=[])
    assert answer["status"] == "success" and answer["global_step"] == 2
    effective = answer["effective_config"]
    assert effective["lean_mlp"] is False and effective["torch_compile"] is False and effective["lean_rmsnorm"] is True
    assert (f"lean_mlp was not applied: it relies on transformers' LlamaMLP.forward using .act_fn (not found in "
            f"transformers {version('transformers')}); trained with the library's own code.") in answer["warnings"]
    assert any(w.startswith(f"torch_compile was not applied: it relies on torch's Module.compile (not found in torch "
                            f"{version('torch')})") for w in answer["warnings"])
    assert not any(c.startswith(("LoRA SwiGLU MLPs", "torch.compile:")) for c in answer["engine_choices"])
