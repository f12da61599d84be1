"""Every engine choice from one pure function (engine/train/choices.py): both branches of each hardware choice, forced
through the facts instead of this machine's, and the flag table that config, docs and bench read."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from llm_mcp.config import ENGINE_FLAGS, TrainingConfig, engine_flags_markdown
from llm_mcp.engine.train.choices import EngineChoices, Facts, decide

CPU = Facts(has_cuda=False, compute_dtype="bfloat16", lora_dropout=0.1)
GPU = Facts(has_cuda=True, bf16_supported=True, has_flash_attn=True, has_liger=True, compute_dtype="bfloat16",
            lora_dropout=0.1)
EMULATED_BF16 = replace(CPU, cpu_bf16_slowdown=20.0, cpu_bf16_instructions=False, cpu_bf16_emulated=True,
                        cpu_bf16_emulation_basis="its flags list no bf16 instructions", compute_layers=14)


def test_the_same_inputs_give_the_same_choices_and_the_config_is_not_touched():
    config = TrainingConfig()
    first, second = decide(config, CPU), decide(config, CPU)
    assert first == second and isinstance(first, EngineChoices)
    with pytest.raises(AttributeError):
        first.optim = "sgd"  # frozen
    assert config == TrainingConfig()


def test_paged_optimizers_page_only_on_a_gpu():
    on_cpu, on_gpu = decide(TrainingConfig(), CPU), decide(TrainingConfig(), GPU)
    assert on_cpu.optim == "adamw_torch_fused" and any("paged_adamw_32bit" in w for w in on_cpu.warnings)
    assert on_gpu.optim == "paged_adamw_32bit" and not on_gpu.warnings
    assert decide(TrainingConfig(optim="adamw_torch"), CPU).optim == "adamw_torch"  # asked unfused: kept


def test_precision_float32_on_cpu_autocast_on_gpu():
    cpu = decide(TrainingConfig(), CPU)
    assert (cpu.bf16, cpu.fp16, cpu.use_cpu) == (False, False, True)
    assert any(n.startswith("precision: float32 compute") for n in cpu.notes)
    gpu = decide(TrainingConfig(), GPU)
    assert (gpu.bf16, gpu.fp16, gpu.use_cpu) == (True, False, False)
    old_gpu = decide(TrainingConfig(), replace(GPU, bf16_supported=False))  # e.g. a T4: fp16 instead
    assert (old_gpu.bf16, old_gpu.fp16) == (False, True)
    kept = decide(TrainingConfig(auto_precision=False), CPU)
    assert kept.bf16 is True and not any(n.startswith("precision:") for n in kept.notes)
    fp16_on_cpu = decide(TrainingConfig(fp16=True), CPU)
    assert fp16_on_cpu.bf16 is True and any("fp16 mixed precision needs a CUDA GPU" in w
                                            for w in fp16_on_cpu.warnings)


def test_float32_compute_where_bf16_is_emulated_and_not_where_it_is_native():
    emulated = decide(TrainingConfig(), EMULATED_BF16)
    assert emulated.float32_compute is True and emulated.cpu_bf16_slowdown == 20.0
    assert any(n.startswith("precision: this CPU has no bf16 instructions") and "14 4-bit layers" in n
               for n in emulated.notes)
    native = decide(TrainingConfig(), replace(CPU, cpu_bf16_slowdown=0.4, cpu_bf16_instructions=True))
    assert native.float32_compute is False and native.cpu_bf16_instructions is True
    asked_bf16 = decide(TrainingConfig(bf16=True), EMULATED_BF16)  # autocast asked: not considered
    assert asked_bf16.float32_compute is False and asked_bf16.cpu_bf16_slowdown is None


def test_attention_flash_where_it_runs_and_the_reason_where_not():
    assert decide(TrainingConfig(), replace(GPU, attention="sdpa")).attn_implementation == "flash_attention_2"
    for facts, why in ((CPU, "no CUDA GPU"), (replace(GPU, has_flash_attn=False), "flash_attn package"),
                       (replace(GPU, supports_flash_attention=False), "no flash-attention 2 implementation")):
        choices = decide(TrainingConfig(), facts)
        assert choices.attn_implementation == "sdpa"
        assert any(w.startswith("use_flash_attention_2=true") and why in w for w in choices.warnings), why
    float32 = decide(TrainingConfig(), replace(GPU, compute_dtype="float32"))  # no half precision: no flash kernel
    assert float32.attn_implementation == "sdpa" and (float32.bf16, float32.fp16) == (False, False)
    assert any("bf16/fp16 only" in w for w in float32.warnings)
    off = decide(TrainingConfig(use_flash_attention_2=False),
                 replace(GPU, attention="flash_attention_2", attention_without_flash="eager"))
    assert off.attn_implementation == "eager"


def test_batch_layout_padding_free_with_flash_attention_else_length_grouped():
    gpu = decide(TrainingConfig(), GPU)
    assert gpu.padding_free is True and gpu.group_by_length is False
    cpu = decide(TrainingConfig(), CPU)
    assert cpu.padding_free is False and cpu.group_by_length is True
    packed = decide(TrainingConfig(packing=True, padding_free=True), GPU)
    assert packed.packing is True and packed.padding_free is False and packed.group_by_length is False


def test_gradient_checkpointing_off_only_where_memory_is_ample():
    assert decide(TrainingConfig(), replace(CPU, memory_is_ample=True)).use_gradient_checkpointing is False
    assert decide(TrainingConfig(), CPU).use_gradient_checkpointing is True
    forced = decide(TrainingConfig(auto_gradient_checkpointing=False), replace(CPU, memory_is_ample=True))
    assert forced.use_gradient_checkpointing is True


def test_lean_functions_without_autocast_only_and_not_where_their_internals_moved():
    cpu = decide(TrainingConfig(), CPU)
    assert cpu.lean_lora_dropout and cpu.lean_mlp and cpu.lean_rmsnorm
    gpu = decide(TrainingConfig(), GPU)  # bf16 autocast: the lean functions are float32 ones
    assert not (gpu.lean_lora_dropout or gpu.lean_mlp or gpu.lean_rmsnorm)
    assert decide(TrainingConfig(), replace(CPU, lora_dropout=0.0)).lean_lora_dropout is False
    moved = decide(TrainingConfig(), replace(CPU, missing_internals={"lean_mlp": ("transformers' LlamaMLP.forward "
                                                                                 "using .act_fn (not found)",)}))
    assert moved.lean_mlp is False and moved.lean_rmsnorm is True
    assert any(w.startswith("lean_mlp was not applied: it relies on transformers' LlamaMLP.forward")
               for w in moved.warnings)


def test_liger_on_cuda_where_installed_and_said_where_not():
    assert decide(TrainingConfig(), GPU).use_liger_kernel is True
    assert decide(TrainingConfig(liger_kernel=False), GPU).use_liger_kernel is False
    for facts, why in ((CPU, "need a CUDA GPU"), (replace(GPU, has_liger=False), "not installed")):
        choices = decide(TrainingConfig(liger_kernel=True), facts)
        assert choices.use_liger_kernel is False and any(why in w for w in choices.warnings)


def test_cpu_heap_choices_follow_glibc_and_each_other():
    reuse = decide(TrainingConfig(reuse_freed_memory=True), CPU)
    assert reuse.reuse_freed_memory is True
    both = decide(TrainingConfig(reuse_freed_memory=True, release_memory=True), CPU)
    assert both.release_memory is True and both.reuse_freed_memory is False
    assert any(w.startswith("reuse_freed_memory=true was not applied: release_memory=true") for w in both.warnings)
    no_glibc = decide(TrainingConfig(reuse_freed_memory=True, release_memory=True),
                      replace(CPU, can_reuse_freed_memory=False, can_release_freed_memory=False))
    assert no_glibc.release_memory is False and no_glibc.reuse_freed_memory is False
    on_gpu = decide(TrainingConfig(release_memory=True), GPU)
    assert on_gpu.release_memory is False and on_gpu.cpu_kernel_cache_capacity is None
    assert decide(TrainingConfig(), replace(CPU, cpu_kernel_cache="64")).cpu_kernel_cache_capacity == 64
    assert decide(TrainingConfig(), CPU).cpu_kernel_cache_capacity == 1024  # the libraries' own


def test_unsloth_makes_its_own_speed_choices():
    choices = decide(TrainingConfig(torch_compile=True), replace(CPU, engine="unsloth"))
    assert not (choices.lean_mlp or choices.torch_compile or choices.group_by_length or choices.float32_compute)
    assert any("Unsloth uses its own kernels" in w for w in choices.warnings)


def test_no_note_carries_a_measured_number():
    """Notes go to agents and outlive measurements: numbers belong in docs/benchmarks.md."""
    notes = {n for facts in (CPU, GPU, EMULATED_BF16, replace(CPU, cpu_kernel_cache="64"))
             for config in (TrainingConfig(), TrainingConfig(torch_compile=True, release_memory=True),
                            TrainingConfig(reuse_freed_memory=True))
             for n in decide(config, facts).notes}
    assert len(notes) >= 10
    for note in notes:
        assert "measured" not in note and "~" not in note, note
        assert not re.search(r"\d\s*(%|x\b|MiB|GiB|s\b|ms\b|tokens/s)", note), note


def test_the_flag_table_is_the_configs_and_the_docs():
    """One table: every engine flag is a TrainingConfig field with its default and doc, left out of the spec's
    prepare answer, and docs/engine-flags.md is generated from it."""
    assert list(ENGINE_FLAGS) == [f.name for f in fields(TrainingConfig) if "engine_flag" in f.metadata]
    for name, (default, doc) in ENGINE_FLAGS.items():
        assert getattr(TrainingConfig(), name) == default and doc.endswith(".")
        assert name not in TrainingConfig().spec_dict()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "engine-flags.md").read_text()
    assert engine_flags_markdown() in docs, "regenerate docs/engine-flags.md from config.engine_flags_markdown()"
    # every flag that is itself a choice comes back decided in effective_config
    decided = {f.name for f in fields(EngineChoices)}
    assert {"padding_free", "group_by_length", "lean_mlp", "torch_compile"} <= decided
