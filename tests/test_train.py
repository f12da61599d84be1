"""prepare_for_training and train through the MCP client on the tiny model: real NF4 + LoRA + TRL, no mocks.

One module-scoped run (60 steps) is shared by the assertions on loss, progress, checkpoints, TensorBoard and the
saved adapter; resume and the output-dir guard continue from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, HW
from llm_mcp.engine.device import cpu_bf16_instructions

STEPS = 60
SPEC_METRICS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"}


@pytest.fixture(scope="module")
def prepared(mcp, tiny_model):
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "tiny", **FAST_LOAD})
    return mcp.ok("qloraevolved_prepare_for_training", {
        "model_id": "tiny", **FAST_TRAIN, "output_dir": "run1", "max_steps": STEPS, "save_steps": 20,
        "save_total_limit": 2, "report_to": "tensorboard"})


@pytest.fixture(scope="module")
def trained(mcp, prepared, demo_rows):
    progress: list = []
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows,
                                           "eval_dataset": demo_rows[:8]}, progress=progress)
    return answer, progress


def test_prepare_returns_the_spec_config(prepared):
    """prepare_for_training answers status, message and the spec's config keys with the values given."""
    assert prepared["status"] == "success"
    assert prepared["message"] == "Model tiny prepared for training"
    config = prepared["config"]
    assert config["max_steps"] == STEPS and config["output_dir"] == "run1" and config["save_total_limit"] == 2
    for key in ("num_train_epochs", "warmup_ratio", "optim", "max_grad_norm", "use_flash_attention_2",
                "use_cpu_offload"):
        assert key in config
    # honest about this machine: flash-attention 2 runs only on CUDA with flash_attn installed, and in bf16/fp16
    # only, which this float32 tiny model (FAST_LOAD) never computes in: so it is said to be unavailable anywhere
    assert FAST_LOAD["compute_dtype"] == "float32"
    assert any("flash-attention" in w for w in prepared["warnings"])


def test_train_answers_with_spec_metrics(trained, workspace):
    """train returns status, the spec's metrics (plus eval_loss) and output_dir = <output_dir>/final."""
    answer, _ = trained
    assert answer["status"] == "success"
    assert SPEC_METRICS <= set(answer["metrics"]) and "eval_loss" in answer["metrics"]
    assert answer["output_dir"] == "run1/final"
    assert answer["global_step"] == STEPS
    # the default optimizer pages through CUDA: said where there is none
    assert any("paged_adamw_32bit" in w for w in answer["warnings"]) is not HW.has_cuda


def test_loss_falls_well_below_its_start(trained):
    """The logged loss ends far below where it began, and eval loss is low too: the model learned the data."""
    loss = trained[0]["loss"]
    assert loss["last"] < 0.35 * loss["first"], loss
    assert trained[0]["metrics"]["eval_loss"] < 1.5


def test_progress_notifications_carry_step_total_and_loss(trained):
    """The client received progress notifications: rising step, total = max_steps, a loss in the message."""
    progress = trained[1]
    assert len(progress) >= 3
    steps = [p for p, _, _ in progress]
    assert steps == sorted(steps) and steps[-1] == STEPS
    assert all(total == STEPS for _, total, _ in progress)
    assert any("loss" in (message or "") for _, _, message in progress)


def test_checkpoints_rotate_to_save_total_limit(trained, workspace):
    """save_steps=20 over 60 steps with save_total_limit=2 leaves exactly the last two checkpoints."""
    names = sorted(p.name for p in (workspace / "run1").glob("checkpoint-*"))
    assert names == ["checkpoint-40", "checkpoint-60"]


def test_tensorboard_event_files_are_written(trained, workspace):
    """report_to='tensorboard' writes event files under <output_dir>/runs."""
    assert list((workspace / "run1" / "runs").rglob("events.out.tfevents.*"))


def test_adapter_reloads_with_peft_and_reproduces_a_trained_answer(trained, workspace, tiny_model, demo_rows):
    """The saved adapter loads with PeftModel.from_pretrained and greedy generation gives a trained answer."""
    from llm_mcp.engine.infer.generate import count_reproduced

    final = workspace / trained[0]["output_dir"]
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    hits = count_reproduced(final, tiny_model, demo_rows[:6])
    assert hits >= 4, f"only {hits}/6 trained answers reproduced"


def test_existing_run_is_not_overwritten_without_asking(mcp, trained, workspace, demo_rows):
    """Training again into the same output_dir is refused (naming the fixes) and leaves the files as they were."""
    adapter = workspace / "run1" / "final" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    text = mcp.error("qloraevolved_train", {"model_id": "tiny", "train_dataset": demo_rows})
    assert "output_dir" in text and "resume_from_checkpoint" in text and "overwrite_output_dir" in text
    assert adapter.stat().st_mtime_ns == before


def test_resume_continues_from_the_latest_checkpoint(mcp, trained, demo_rows):
    """resume_from_checkpoint=true picks checkpoint-60 and continues to the new max_steps, loss still low."""
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows, "max_steps": STEPS + 10,
                                           "resume_from_checkpoint": True})
    assert answer["resumed_from"].endswith("checkpoint-60")
    assert answer["global_step"] == STEPS + 10
    assert answer["loss"]["first"] < 0.5 * trained[0]["loss"]["first"]  # started from trained weights


def test_resume_without_checkpoints_is_a_clear_error(mcp, trained, demo_rows):
    """Asking to resume where no checkpoint exists names the parameter and the folder."""
    text = mcp.error("qloraevolved_train", {"model_id": "tiny", "train_dataset": demo_rows,
                                            "output_dir": "empty-run", "resume_from_checkpoint": True})
    assert "resume_from_checkpoint" in text and "empty-run" in text


def test_training_config_dict_overrides_and_typos(mcp, trained, demo_rows):
    """training_config overrides by name; an unknown key or out-of-range value is an error naming it."""
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows,
                                           "training_config": {"max_steps": 2, "output_dir": "run-dict",
                                                               "save_steps": 1000}})
    assert answer["global_step"] == 2 and answer["output_dir"] == "run-dict/final"
    text = mcp.error("qloraevolved_train", {"model_id": "tiny", "train_dataset": demo_rows,
                                            "training_config": {"learing_rate": 1e-3}})
    assert "learing_rate" in text and "not a known parameter" in text
    text = mcp.error("qloraevolved_train", {"model_id": "tiny", "train_dataset": demo_rows,
                                            "training_config": {"batch_size": 0}})
    assert "batch_size" in text


def test_unprepared_model_trains_with_defaults_and_says_so(mcp, tiny_model, demo_rows, workspace):
    """Training a model that was never prepared uses the prepare defaults (spec dtype, optimizer, grad
    checkpointing) and reports that in warnings, with the paged optimizer's CPU fallback and the engine's
    choices (precision) where this machine has no CUDA; on CUDA bf16 autocast and the paged optimizer run as
    asked."""
    cpu = not HW.has_cuda
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "fresh"})
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": "fresh", "train_dataset": demo_rows, "max_steps": 2,
                                           "output_dir": "run-fresh"})
    assert answer["status"] == "success" and answer["global_step"] == 2
    assert any("not prepared" in w for w in answer["warnings"])
    assert any("paged_adamw_32bit" in w for w in answer["warnings"]) is cpu
    # float32 beats bf16 autocast on CPU (an engine choice, noted); a CUDA GPU autocasts in bf16 where it has it
    assert answer["effective_config"]["bf16"] is (HW.has_cuda and HW.bf16_supported)
    assert any(c.startswith("precision:") for c in answer["engine_choices"]) is cpu
    assert answer["effective_config"]["lean_lora_dropout"] is cpu  # without autocast (float32), lora_dropout 0.1
    assert any(c.startswith("LoRA dropout (0.1)") for c in answer["engine_choices"]) is cpu
    assert answer["effective_config"]["release_memory"] is False  # opt-in: it costs speed
    assert answer["effective_config"]["reuse_freed_memory"] is False  # opt-in: it costs peak memory
    # the worker bounds oneDNN's per-shape kernel caches (set at the engine's import, before torch uses them);
    # CPU training only
    assert answer["effective_config"]["cpu_kernel_cache_capacity"] == (64 if cpu else None)
    assert any(c.startswith("memory: oneDNN's and ideep's caches") for c in answer["engine_choices"]) is cpu
    answer = mcp.ok("qloraevolved_train", {"wait_seconds": -1, "model_id": "fresh", "train_dataset": demo_rows,
                                           "max_steps": 1, "output_dir": "run-fresh-peft-dropout",
                                           "training_config": {"lean_lora_dropout": False, "release_memory": True,
                                                               "reuse_freed_memory": True}})
    assert answer["effective_config"]["lean_lora_dropout"] is False  # peft's own dropout, when asked
    assert answer["effective_config"]["release_memory"] is cpu  # CPU, glibc: freed pages back after each step
    assert answer["effective_config"]["reuse_freed_memory"] is False  # asked, but release_memory asks the opposite
    assert any(w.startswith("reuse_freed_memory=true was not applied: release_memory=true") for w in answer["warnings"])
    assert any(c.startswith("memory: ") for c in answer["engine_choices"]) is cpu  # CPU heap choices only
    assert (Path(workspace) / "run-fresh" / "final" / "adapter_model.safetensors").is_file()
    mcp.ok("qloraevolved_unload_model", {"model_id": "fresh"})


def test_padding_free_and_packing_keep_examples_apart(mcp, trained, demo_rows):
    """Padding-free batches and packing compute the same loss as padded batches (the default without
    flash-attention 2, length-grouped; with it the default is padding-free): evaluated on the same weights, their
    eval losses agree within 0.5%, so they change speed, not what is learned."""
    losses = {}
    for name, choice in {"padding_free": {"padding_free": True}, "packing": {"packing": True}, "padded": {}}.items():
        answer = mcp.ok("qloraevolved_train", {
            "wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows[:1], "eval_dataset": demo_rows,
            "training_config": {"max_steps": 1, "learning_rate": 1e-9, "batch_size": 32, **choice,
                                "output_dir": f"layout-{name}", "save_steps": 1000}})
        losses[name] = answer["metrics"]["eval_loss"]
        config = answer["effective_config"]
        flash = config["attn_implementation"] == "flash_attention_2"  # its varlen kernel makes padding-free pay
        assert (config["padding_free"], config["packing"]) == {"padding_free": (True, False), "packing": (
            False, True), "padded": (flash, False)}[name]
        assert config["group_by_length"] is (name == "padded" and not flash)  # grouping only where padding remains
        assert config["lean_lora_dropout"] is False  # lora_dropout=0 here: no dropout to make lean
    for name in ("padding_free", "packing"):
        assert abs(losses[name] - losses["padded"]) / losses["padded"] < 0.005, losses


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    """A worker killed while saving leaves a checkpoint folder without trainer_state.json; resume=true picks the
    latest complete checkpoint instead of failing on it."""
    from llm_mcp.engine.train.run import _resolve_resume

    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # half-written: no trainer_state.json
    assert _resolve_resume(tmp_path, True) == str(tmp_path / "checkpoint-10")


def test_liger_kernel_says_what_ran(mcp, trained, demo_rows):
    """liger_kernel=true: Liger's Triton kernels run on CUDA where liger-kernel is installed; elsewhere the run
    trains with PyTorch's kernels, and a warning names the option and why (no CUDA, or not installed)."""
    answer = mcp.ok("qloraevolved_train", {
        "wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows[:8],
        "training_config": {"max_steps": 1, "liger_kernel": True, "output_dir": "liger-run", "save_steps": 1000}})
    assert answer["status"] == "success"
    runs = HW.has_cuda and importlib.util.find_spec("liger_kernel") is not None  # the worker runs this Python
    assert answer["effective_config"]["use_liger_kernel"] is runs
    assert any("liger_kernel=true" in w for w in answer["warnings"]) is not runs, answer["warnings"]
    assert any("liger_kernel=true" in w and "CUDA" in w for w in answer["warnings"]) is not HW.has_cuda


def test_torch_compile_trains_through_the_engine(mcp, trained, demo_rows):
    """torch_compile=true compiles the decoder layers for the run (the first step pays the compile) and trains;
    the compiled-vs-eager numbers are checked in tests/test_regional_compile.py."""
    answer = mcp.ok("qloraevolved_train", {
        "wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows[:16],
        "training_config": {"max_steps": 2, "torch_compile": True, "output_dir": "compiled-run", "save_steps": 1000}})
    assert answer["status"] == "success" and answer["effective_config"]["torch_compile"] is True
    assert any(c.startswith("torch.compile:") for c in answer["engine_choices"])
    generated = mcp.ok("qloraevolved_generate", {"model_id": "tiny", "prompt": "hello", "max_new_tokens": 4})
    assert isinstance(generated["text"], str) and generated["used_adapter"] is True  # eager again afterwards


def test_float32_compute_follows_this_cpus_bf16_speed(mcp, trained, demo_rows):
    """On a CPU without bf16 instructions (bf16 matmuls emulated, ~20x float32's time) the 4-bit layers and the
    adapters train in float32 and the answer says why, with the ratio the worker measured; where bf16 is native
    (~1x) nothing changes. auto_precision=false keeps bf16 either way; on CUDA nothing is measured.

    This machine runs one branch only (which one its CPU's flags decide); tests/test_engine_choices.py forces both
    through Facts."""
    for auto, output_dir in ((True, "fp32-run"), (False, "bf16-run")):
        answer = mcp.ok("qloraevolved_train", {
            "wait_seconds": -1, "model_id": "tiny", "train_dataset": demo_rows[:8],
            "training_config": {"max_steps": 1, "auto_precision": auto, "output_dir": output_dir,
                                "save_steps": 1000}})
        assert answer["status"] == "success"
        slowdown = answer["effective_config"]["cpu_bf16_slowdown"]
        measured = auto and not HW.has_cuda  # an NF4 model on CPU: measured when auto_precision is on
        assert (slowdown > 0) if measured else (slowdown is None), slowdown
        instructions = cpu_bf16_instructions()  # this machine's flags decide; the timing only confirms
        assert answer["effective_config"]["cpu_bf16_instructions"] == (instructions if measured else None)
        emulated = measured and instructions is not True and slowdown > 2.0
        assert answer["effective_config"]["float32_compute"] is emulated
        noted = any(c.startswith("precision: this CPU has no bf16 instructions") for c in answer["engine_choices"])
        assert noted is emulated
