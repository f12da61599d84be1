"""TrainingConfig + EngineChoices -> a TRL trainer (the method's: methods.py) on a loaded ModelBundle, and the run's
answer.

TRL does the work (tokenizing, masking prompts, EOS, batching, checkpoints, TensorBoard); this module builds its
config from ours and the engine's choices (choices.py), runs it with the chosen patches applied
(engine/patches/apply.py) and checkpoints sealed (checkpoints.py), and shapes the answer.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from llm_mcp import output_lock
from llm_mcp.config import RAY_ADDRESS_ENV, RunOptions, TrainingConfig
from llm_mcp.data.datasets import PreparedDataset, prepare as prepare_dataset
from llm_mcp.data.rows import loss_on
from llm_mcp.disk import disk_full_as_error, require_free
from llm_mcp.engine.train.checkpoints import (CheckpointSeal, CheckpointSpace, ResumePoint, SaveSizes, resolve_resume,
                                              save_sizes)
from llm_mcp.engine.train.callbacks import CoreShare, ProgressCallback, ProgressFn
from llm_mcp.engine.train.choices import EngineChoices, decide, read_facts
from llm_mcp.engine.device import detect, peak_memory_bytes, reset_peak_memory
from llm_mcp.engine.durable import fsync_tree, move_into_place
from llm_mcp.engine.patches.float32_compute import float32_compute, trainable_tensors_kept
from llm_mcp.engine.train import methods, ranks
from llm_mcp.engine.train.lora_shape import check_resume_fits
from llm_mcp.engine.load.model import ModelBundle
from llm_mcp.engine.patches.apply import applied, set_attention
from llm_mcp.errors import InvalidArgument, OutOfMemory

log = logging.getLogger(__name__)

SPEC_METRICS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch")


def prepare(bundle: ModelBundle, config: TrainingConfig) -> dict[str, Any]:
    """Apply what must happen to the model before training (its attention) and report what this machine cannot
    do; a spread over processes this machine (or engine) cannot give is refused now, not at train time."""
    from llm_mcp.engine.train import distributed

    distributed.plan(config, engine=bundle.engine, ray_address=os.environ.get(RAY_ADDRESS_ENV),
                     full_copy_fits=distributed.full_copy_fits(bundle, config))
    choices = decide(config, read_facts(bundle, config))
    set_attention(bundle, choices.attn_implementation)
    return {"warnings": list(choices.warnings)}


def train(bundle: ModelBundle, config: TrainingConfig, train_source: Any, eval_source: Any, options: RunOptions, *,
          on_progress: ProgressFn, should_stop: Callable[[], bool], notes: list[str],
          cpu_threads: Callable[[], int | None] | None = None, holder: str | None = None) -> dict[str, Any]:
    """cpu_threads, when given, is read at every step: the CPU threads to use now (None: all), as the server
    shares the cores among the trainings running at the same time. holder names this run in output_dir's lock
    (e.g. "model m-1, job j-2"), which it holds from before anything there is read or deleted to the end.
    num_processes > 1 runs across processes (distributed.py), each rank through run_training."""
    from llm_mcp.engine.train import distributed

    spread = distributed.plan(config, engine=bundle.engine, ray_address=os.environ.get(RAY_ADDRESS_ENV),
                              full_copy_fits=distributed.full_copy_fits(bundle, config))
    if spread.strategy == "fsdp" and config.distributed_strategy == "auto":  # a full copy would not fit
        config = replace(config, distributed_strategy="fsdp")  # the ranks shard as planned
    share = None if cpu_threads is None or detect().has_cuda or spread.world_size > 1 else CoreShare(cpu_threads)
    try:
        with output_lock.claim(config.output_dir, holder or "a training run", doing="training"):
            if spread.world_size > 1:
                return distributed.train(bundle, config, train_source, eval_source, options,
                                         on_progress=on_progress, should_stop=should_stop, notes=notes,
                                         run_plan=spread)
            answer = run_training(bundle, config, train_source, eval_source, options, on_progress=on_progress,
                                  should_stop=should_stop, notes=notes, extra_callbacks=[share] if share else [])
            answer["effective_config"].update(distributed.SINGLE.effective(config))
    finally:
        if share is not None:
            share.restore()
    if share is not None and share.changes:
        answer["engine_choices"].append(share.describe())
    return answer


def ready_output_dir(bundle: ModelBundle, config: TrainingConfig, options: RunOptions) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from (None: a fresh run) once output_dir is fit for the run: an earlier run's
    results replaced only when asked, torn checkpoints removed (and named in the warnings returned)."""
    out = Path(config.output_dir)
    point = _resume_point(out, options.resume_from_checkpoint, bundle)
    _guard_output_dir(out, point.path, options.overwrite_output_dir)
    point.remove_torn()
    return point.path, point.warnings()


def run_training(bundle: ModelBundle, config: TrainingConfig, train_source: Any, eval_source: Any,
                 options: RunOptions, *, on_progress: ProgressFn, should_stop: Callable[[], bool], notes: list[str],
                 extra_callbacks: list[Any] = ()) -> dict[str, Any]:
    """One process's training: the whole run, or one rank's part of a run across processes (rank 0 writes the
    checkpoints and the final adapter; every rank trains)."""
    reset_peak_memory()  # this run's peak, not an earlier run's in the same worker
    warnings = list(notes) + list(bundle.warnings)
    choices = methods.adjusted(config.method, decide(config, read_facts(bundle, config)))
    sharded = ranks.world_size() > 1 and config.distributed_strategy == "fsdp"
    if sharded:
        choices = _fsdp_choices(choices)
    set_attention(bundle, choices.attn_implementation)
    warnings += choices.warnings
    out = Path(config.output_dir)
    resume, torn = ready_output_dir(bundle, config, options)
    warnings += torn
    sizes = save_sizes(bundle.model, bundle.tokenizer, choices.optim)
    require_free(out, sizes.checkpoint + sizes.final, doing="training (room for a checkpoint and the final adapter)")

    template = getattr(bundle.tokenizer, "chat_template", None)
    train_data = prepare_dataset(train_source, dataset_format=options.dataset_format, chat_template=template,
                                 param="train_dataset", tokenizer=bundle.tokenizer, should_stop=should_stop,
                                 skip_invalid_rows=options.skip_invalid_rows)
    eval_data = None if eval_source is None else prepare_dataset(
        eval_source, dataset_format=options.dataset_format, chat_template=template, param="eval_dataset",
        tokenizer=bundle.tokenizer, should_stop=should_stop, skip_invalid_rows=options.skip_invalid_rows)
    warnings += train_data.warnings + (eval_data.warnings if eval_data else [])
    methods.check_data(config.method, train_data.source_format, "train_dataset")
    if eval_data is not None:
        methods.check_data(config.method, eval_data.source_format, "eval_dataset")

    common = dict(
        output_dir=str(out), learning_rate=config.learning_rate, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        # transformers 5: a float in [0, 1) is a ratio of the total steps, an int a number of steps
        warmup_steps=config.warmup_ratio if config.warmup_steps is None else config.warmup_steps,
        weight_decay=config.weight_decay, optim=choices.optim, lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps, logging_first_step=True,
        # save_total_limit is applied by CheckpointSeal, among complete checkpoints only
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=None,
        report_to=list(choices.report_to),
        bf16=choices.bf16, fp16=choices.fp16, use_cpu=choices.use_cpu, seed=config.seed,
        use_liger_kernel=choices.use_liger_kernel, data_seed=config.seed,
        eval_strategy="steps" if (eval_data and options.eval_steps) else "no", eval_steps=options.eval_steps,
        disable_tqdm=True, dataloader_pin_memory=False,
    )
    if sharded:
        common.update(_fsdp_args(bundle))
    callback = ProgressCallback(on_progress, should_stop, release_memory=choices.release_memory,
                                method_metrics=lambda logs: methods.logged_metrics(config.method, logs))
    space = CheckpointSpace(out, sizes, config.save_total_limit, warnings)
    # float32_compute keeps the adapters' float32 values: building the trainer rounds them to bf16 (TRL's QLoRA cast)
    with trainable_tensors_kept(bundle.model) if choices.float32_compute else nullcontext():
        trainer = methods.build_trainer(
            config.method, config, choices, common,
            checkpointing=lambda cls: _checkpointing_args(cls, choices.use_gradient_checkpointing),
            model=bundle.model, tokenizer=bundle.tokenizer, train_data=train_data, eval_data=eval_data,
            max_length=bundle.max_length,
            # the seal before the progress report (no checkpoint reported unsealed), the space check after the
            # stop callback (which asks for a save at the step's end)
            callbacks=[CheckpointSeal(config.save_total_limit), callback, space, *extra_callbacks])
    warnings += methods.engine_notes(config.method, bundle.engine, trainer)
    if choices.padding_free:
        _make_padding_free(trainer)
    choices, changed = _engine_changes(trainer, choices)
    warnings += changed
    try:
        with applied(bundle.model, choices):  # undone when training ends: generation and export run on peft's model
            result = _run_saving_safely(trainer, resume, config, bundle, space)
        metrics = {k: float(result.metrics[k]) for k in SPEC_METRICS if k in result.metrics}
        metrics.update(methods.method_metrics(config.method, trainer.state.log_history))
        if eval_data is not None and not callback.stopped:  # a stopped run saves and ends quickly
            with float32_compute(bundle.model) if choices.float32_compute else nullcontext():  # as it trained
                evaluated = trainer.evaluate()
                if "eval_loss" in evaluated:  # grpo's evaluation samples and scores, it has no loss to report
                    metrics["eval_loss"] = float(evaluated["eval_loss"])
    finally:
        methods.finish(config.method, bundle.model)  # the model keeps its one adapter, whatever happened
    final = out / "final"
    _save_final(trainer, bundle.tokenizer, final, sizes)
    answer = _answer(bundle, config, trainer, metrics, final, train_data, choices, warnings, callback, resume)
    answer["engine_choices"] = list(choices.notes)
    if sharded:
        answer["effective_config"]["fsdp_shard"] = _shard_sizes(trainer.model)
    return answer


def _fsdp_choices(choices: EngineChoices) -> EngineChoices:
    """FSDP2 shards every parameter into DTensors: the patches that replace layers' forwards stay off."""
    return replace(choices, packing=False, padding_free=False, lean_lora_dropout=False, lean_mlp=False,
                   lean_rmsnorm=False, torch_compile=False, use_liger_kernel=False,
                   notes=(*choices.notes, "distributed_strategy='fsdp': LoRA-layer, MLP and norm patches off (FSDP2 "
                                          "shards the parameters they would read)."))


def _fsdp_args(bundle: ModelBundle) -> dict[str, Any]:
    """Transformers' FSDP2 settings: each decoder layer its own shard unit, weights, adapters, gradients and
    optimizer state sharded across the ranks, the adapter gathered whole when saved. On CPU ranks (gloo) accelerate
    is told to keep the plugin (patches/fsdp_cpu.py). Activation checkpointing stays the trainer's own setting."""
    base = bundle.model.get_base_model() if hasattr(bundle.model, "get_base_model") else bundle.model
    layers = list(getattr(base, "_no_split_modules", None) or [])
    args: dict[str, Any] = {"fsdp": True, "fsdp_config": {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if layers else "NO_WRAP",
        "transformer_layer_cls_to_wrap": layers, "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True, "cpu_ram_efficient_loading": False, "activation_checkpointing": False}}
    if not detect().has_cuda:
        from llm_mcp.engine.patches import fsdp_cpu

        fsdp_cpu.enable()
        args["ddp_backend"] = "gloo"
    return args


def _shard_sizes(model: Any) -> dict[str, int]:
    """What this rank holds of the model's parameters under FSDP2 (DTensor shards) against their full size."""
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return {"rank0_parameters": local, "all_parameters": total}


def _make_padding_free(trainer: Any) -> None:
    """Flatten each batch into one row without padding. TRL refuses padding_free with max_length unless packing
    (it would not truncate), so the trainer is built padded, which truncates the dataset to max_length, and its
    collator is then switched to padding-free."""
    trainer.data_collator.padding_free = True
    trainer.padding_free = True


def _engine_changes(trainer: Any, choices: EngineChoices) -> tuple[EngineChoices, list[str]]:
    """What the training engine itself changed (Unsloth's CPU mode maps 8-bit optimizers to AdamW)."""
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim == choices.optim:
        return choices, []
    return replace(choices, optim=optim), [f"the training engine replaced optim={choices.optim!r} by {optim!r} on "
                                           "this hardware."]


def _checkpointing_args(config_cls: type, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing is `activation_checkpointing` from transformers 5.2x on (the old name warns) and
    `gradient_checkpointing` before (the Unsloth environment pins an older transformers)."""
    name = "activation" if "activation_checkpointing" in config_cls.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": enabled,
            f"{name}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def _run_saving_safely(trainer: Any, resume: str | None, config: TrainingConfig, bundle: ModelBundle,
                       space: CheckpointSpace) -> Any:
    """The run, with a full disk in any words (torch's "unexpected pos", safetensors, ENOSPC) told as DiskFull and
    the checkpoint it cut short removed; complete checkpoints stay."""
    try:
        with disk_full_as_error(config.output_dir, doing="training"):
            return _run_guarded(trainer, resume, config, bundle)
    except BaseException:
        space.discard_unfinished()
        raise


def _save_final(trainer: Any, tokenizer: Any, final: Path, sizes: SaveSizes) -> None:
    """The final adapter and tokenizer, written beside `final`, fsynced and renamed into place: a failure leaves
    an earlier run's final folder as it was, or none. Every rank of a run across processes takes part in the
    trainer's save (sharded weights are gathered); rank 0 writes."""
    tmp = final.parent / (f"{final.name}.tmp-{os.getpid()}" if ranks.world_size() == 1 else f"{final.name}.tmp-ranks")
    if not ranks.is_main():
        trainer.save_model(str(tmp))
        return
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_as_error(final, doing="saving the final adapter", needed=sizes.final):
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            fsync_tree(tmp)
            move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_guarded(trainer: Any, resume: str | None, config: TrainingConfig, bundle: ModelBundle) -> Any:
    """trainer.train, with a CUDA out-of-memory turned into advice while the model stays loaded."""
    import torch

    try:
        return trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError:
        trainer.model.zero_grad(set_to_none=True)
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        raise OutOfMemory(
            f"training ran out of GPU memory (batch_size={config.batch_size}, max_length={bundle.max_length}, "
            f"use_gradient_checkpointing={config.use_gradient_checkpointing}). Try batch_size="
            f"{max(1, config.batch_size // 2)} with gradient_accumulation_steps={config.gradient_accumulation_steps * 2}"
            " (same effective batch), use_gradient_checkpointing=true, or a shorter max_length at load. The model is "
            "still loaded; checkpoints already written are kept."
        ) from None


def _answer(bundle: ModelBundle, config: TrainingConfig, trainer: Any, metrics: dict[str, float], final: Path,
            data: PreparedDataset, choices: EngineChoices, warnings: list[str], callback: ProgressCallback,
            resume: str | None) -> dict[str, Any]:
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history
              if "loss" in h and h["step"] > callback.start_step]
    return {
        "status": "cancelled" if callback.stopped else "success",
        "engine": bundle.engine,
        "metrics": metrics,
        "output_dir": os.path.join(config.output_dir, "final"),
        "output_path": str(final.resolve()),
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "loss": {"first": losses[0][1], "last": losses[-1][1], "min": min(v for _, v in losses)} if losses else {},
        "loss_history": [{"step": s, "loss": round(v, 5)} for s, v in losses[-50:]],
        "resumed_from": resume,
        "dataset": {"rows": len(data.dataset), "format": data.source_format,
                    "loss_on": loss_on(data.source_format)},
        "effective_config": {**asdict(config), **config.method_settings(), **choices.effective()},
        "warnings": warnings,
    }


def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders by N, complete or not."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resume_point(out: Path, resume: bool | str, bundle: ModelBundle) -> ResumePoint:
    """The checkpoint to resume from (refused when its adapter does not fit this model) and the torn ones."""
    point = resolve_resume(out, resume)
    if point.path is not None:
        check_resume_fits(Path(point.path), bundle.model)
    return point


def _resolve_resume(out: Path, resume: bool | str) -> str | None:
    """The checkpoint a resume continues from: the newest complete one for true."""
    return resolve_resume(out, resume).path


def _guard_output_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """Never overwrite an earlier run's results unless asked."""
    earlier = _checkpoints(out) + ([out / "final"] if (out / "final").exists() else [])
    if not earlier or resume is not None:
        return
    if not overwrite:
        names = [p.name for p in earlier]
        raise InvalidArgument(
            "output_dir", str(out),
            f"a folder without an earlier run's results; it holds {names}. Pass resume_from_checkpoint=true to "
            "continue that run, overwrite_output_dir=true to replace it, or another output_dir",
        )
    for path in earlier:
        shutil.rmtree(path)
