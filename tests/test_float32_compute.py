"""float32_compute (engine/patches/float32_compute.py): on a CPU without bf16 instructions the engine multiplies in float32
where QLoRA would in bf16 (4-bit layers' compute dtype, TRL's bf16 adapters). The same model and loss up to bf16
rounding, float32 gradients, the fused MLP still applying, and the layers' compute dtype restored afterwards."""

from __future__ import annotations

import pytest
import torch

from llm_mcp.config import LoadConfig
from llm_mcp.engine.device import cpu_bf16_slowdown
from llm_mcp.engine.infer.evaluate import evaluate
from llm_mcp.engine.patches.float32_compute import computes_in_half_precision, float32_compute
from llm_mcp.engine.patches.lean_mlp import lean_mlp
from llm_mcp.engine.load.model import load_model


def _four_bit_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "compute_dtype")]


@pytest.fixture()
def qlora_model(tiny_model):
    """NF4 computing in bf16 (the spec's default) with bf16 adapters, as TRL's SFTTrainer leaves a QLoRA model."""
    bundle = load_model(LoadConfig(model_name=str(tiny_model), max_length=128, lora_rank=8, lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in bundle.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # every gradient non-zero
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    bundle.model.train()
    return bundle.model


def test_multiplies_in_float32_with_the_same_loss(qlora_model, lora_step):
    model = qlora_model
    layers = _four_bit_layers(model)
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert computes_in_half_precision(model)
    bf16_loss, bf16_grads, _ = lora_step(model, [])
    fp32_loss, fp32_grads, _ = lora_step(model, [float32_compute])
    assert fp32_loss == pytest.approx(bf16_loss, rel=2e-2)  # bf16 rounding apart
    for name, grad in fp32_grads.items():
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name
        error = ((grad - bf16_grads[name].float()).norm() / grad.norm()).item()
        assert error < 0.1, (name, error)
    # the layers compute in their own dtype again; the adapters stay float32 (peft's own dtype)
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # nested inside it, the fused MLP sees float32 everywhere and gives the same loss as peft's forward
    fused_loss, _, _ = lora_step(model, [float32_compute, lean_mlp])
    assert fused_loss == pytest.approx(fp32_loss, rel=1e-5)


def test_evaluate_changes_no_weight(qlora_model, tiny_model, demo_rows):
    """Building TRL's SFTTrainer casts a quantized model's adapters to bf16 in place; evaluate puts the exact
    tensors back, so float32 adapters keep every bit (a later generate or export sees the trained weights)."""
    from types import SimpleNamespace

    torch.manual_seed(1)
    for param in qlora_model.parameters():
        if param.requires_grad:
            param.data = torch.randn_like(param, dtype=torch.float32) * 0.05  # values bf16 cannot hold
    before = {n: p.detach().clone() for n, p in qlora_model.named_parameters() if p.requires_grad}
    bundle = SimpleNamespace(model=qlora_model, tokenizer=_tokenizer(tiny_model), max_length=128,
                             compute_dtype="bfloat16", engine="transformers")
    answer = evaluate(bundle, demo_rows[:4], dataset_format="auto", batch_size=4)
    assert answer["eval_loss"] > 0
    for name, param in qlora_model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and torch.equal(param, before[name]), name


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_nothing_to_do_for_a_float32_model(tiny_model):
    bundle = load_model(LoadConfig(model_name=str(tiny_model), max_length=128, lora_rank=8, quant_type="none",
                                   compute_dtype="float32"))
    assert not computes_in_half_precision(bundle.model)


def test_the_probe_measures_a_ratio_once():
    """The timed ratio is a positive, finite number measured once per process (its size depends on the CPU and its
    load, which is why the decision below rests on the CPU's flags); where the flags list no bf16 instructions,
    emulation shows as a ratio over SLOW_BF16 (load only inflates it). A CPU with bf16 instructions (as CI's may
    be) runs the first part only; tests/test_engine_choices.py forces both branches of the decision through
    Facts."""
    import math

    from llm_mcp.engine.device import cpu_bf16_instructions
    from llm_mcp.engine.patches.float32_compute import SLOW_BF16

    cpu_bf16_slowdown.cache_clear()
    slowdown = cpu_bf16_slowdown()
    assert 0 < slowdown and math.isfinite(slowdown), slowdown
    assert cpu_bf16_slowdown() == slowdown and cpu_bf16_slowdown.cache_info().hits == 1  # measured once
    if cpu_bf16_instructions() is False:
        assert slowdown > SLOW_BF16, slowdown


@pytest.mark.parametrize("instructions, slowdown, emulated", [
    (True, 43.9, False),  # bf16 instructions: a timing inflated by load never flips the choice
    (True, 0.3, False),
    (False, 20.0, True),  # none: the timing confirms emulation
    (False, 0.9, False),  # none listed, yet bf16 measured fast: keep it
    (None, 20.0, True),  # flags unreadable: the timing decides
    (None, 0.4, False),
])
def test_bf16_emulation_is_decided_by_the_cpus_flags(monkeypatch, instructions, slowdown, emulated):
    from llm_mcp.engine.patches import float32_compute as module

    monkeypatch.setattr(module, "cpu_bf16_instructions", lambda: instructions)
    assert module.is_emulated(slowdown) is emulated
    assert module.is_emulated(None) is False  # not considered (CUDA, or a float32 model)
    if emulated:
        assert ("flags list no bf16" in module.emulation_basis()) is (instructions is False)


def test_the_flags_are_read_from_this_cpu():
    """Linux lists the CPU's flags; the answer agrees with them (True with avx512_bf16/amx_bf16/bf16)."""
    from llm_mcp.engine.device import _cpuinfo_flags, cpu_bf16_instructions

    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert cpu_bf16_instructions() is bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
