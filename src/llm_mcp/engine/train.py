"""TrainingConfig -> TRL SFTConfig + SFTTrainer on a loaded ModelBundle; progress and stop callbacks.

TRL does the work (tokenizing, masking prompts, EOS, batching, checkpoints, TensorBoard); this module maps our
config onto it, replaces what this hardware cannot run with the nearest working choice (and says so), and
shapes the answer.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llm_mcp import output_lock
from llm_mcp.config import RunOptions, TrainingConfig
from llm_mcp.data.datasets import PreparedDataset, prepare as prepare_dataset
from llm_mcp.disk import disk_full_as_error, require_free
from llm_mcp.engine import CPU_KERNEL_CACHE_CAPACITY
from llm_mcp.engine.checkpoints import (CheckpointSeal, CheckpointSpace, ResumePoint, SaveSizes, resolve_resume,
                                        save_sizes)
from llm_mcp.engine.device import (can_reuse_freed_memory, cpu_bf16_instructions, detect, freed_memory_reused, peak_memory_bytes,
                                   release_freed_memory, reset_peak_memory)
from llm_mcp.engine.float32_compute import (bf16_slowdown, bitsandbytes_compute_layers, emulation_basis,
                                            float32_compute, is_emulated,
                                            trainable_tensors_kept)
from llm_mcp.engine.lean_lora import lean_lora_dropout
from llm_mcp.engine.lean_mlp import lean_mlp
from llm_mcp.engine.lean_norm import lean_rmsnorm
from llm_mcp.engine.lora_shape import check_resume_fits
from llm_mcp.engine.patch_guard import may_apply
from llm_mcp.engine.regional_compile import compiled_layers
from llm_mcp.engine.durable import fsync_tree, move_into_place
from llm_mcp.engine.model import ModelBundle, fallback_attention, supports_flash_attention
from llm_mcp.errors import InvalidArgument, OutOfMemory

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]
SPEC_METRICS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch")
_PROGRESS_EVERY_S = 0.5
# Without CUDA the paged optimizers cannot page; their unpaged twins compute the same update.
_UNPAGED = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_8bit"}


def prepare(bundle: ModelBundle, config: TrainingConfig) -> dict[str, Any]:
    """Apply what must happen to the model before training and report what this machine cannot do."""
    return {"warnings": _hardware_choices(bundle, config)[1]}


def _hardware_choices(bundle: ModelBundle, config: TrainingConfig) -> tuple[dict[str, Any], list[str]]:
    """The SFTConfig fields that depend on the hardware, plus a warning for each substitution."""
    hw = detect()
    warnings: list[str] = []
    choices: dict[str, Any] = {"optim": config.optim}
    if not hw.has_cuda and config.optim in _UNPAGED:
        choices["optim"] = _UNPAGED[config.optim]
        warnings.append(f"optim={config.optim!r} pages optimizer state through CUDA unified memory, which needs a "
                        f"GPU; using {choices['optim']!r} (same update, unpaged).")
    choices["report_to"] = [] if config.report_to == "none" else [config.report_to]
    if config.report_to == "tensorboard" and not any(
            importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        choices["report_to"] = []
        warnings.append("report_to='tensorboard' but tensorboard is not installed in the worker's environment; "
                        "no event files are written (pip install tensorboard).")
    attn = bundle.attention or "sdpa"  # what the model was loaded with (flash-attention 2, SDPA or eager)
    if attn == "flash_attention_2" and not config.use_flash_attention_2 and bundle.engine != "unsloth":
        attn = fallback_attention(bundle.model.get_base_model())
    elif config.use_flash_attention_2 and attn != "flash_attention_2":
        supported = bundle.engine == "unsloth" or supports_flash_attention(bundle.model.get_base_model())
        if hw.has_flash_attn and supported:
            attn = "flash_attention_2"
        else:
            why = ("no CUDA GPU" if not hw.has_cuda else "the flash_attn package is not installed"
                   if not hw.has_flash_attn else "this architecture has no flash-attention 2 implementation")
            kernel = "PyTorch SDPA" if attn == "sdpa" else "eager"
            warnings.append(f"use_flash_attention_2=true but flash-attention 2 cannot run here ({why}); "
                            f"using {kernel} attention.")
    _set_attention(bundle, attn)
    choices["attn_implementation"] = attn
    if config.use_cpu_offload and not hw.has_cuda:
        warnings.append("use_cpu_offload=true has no effect on a CPU-only machine: the model already lives in CPU "
                        "memory.")
    elif config.use_cpu_offload:
        warnings.append("use_cpu_offload=true: offloading is decided at load time: with device_map='auto' layers that "
                        "do not fit the GPU were placed in CPU memory; this model was loaded with "
                        f"device_map={bundle.device_map!r}.")
    choices["bf16"], choices["fp16"] = _mixed_precision(bundle, config, warnings)
    choices["use_cpu"] = not hw.has_cuda
    return choices, warnings


# Modules run as one autograd function while training without autocast: training_config flag -> (the context
# manager applying it, its engine-choice note).
_LEAN_FUNCTIONS = {
    "lean_mlp": (lean_mlp, "LoRA SwiGLU MLPs run as one autograd function that keeps the gate and up outputs and "
                           "one copy of its input in the adapter's dtype, and recomputes silu(gate) * up in the "
                           "backward pass (silu, the product and its copy, and a second input copy fewer per "
                           "token; the same gradients); set lean_mlp=false for op-by-op autograd."),
    "lean_rmsnorm": (lean_rmsnorm, "RMSNorm runs as one autograd function with its backward in closed form, "
                                   "keeping x and 1/rms (half the norm's time on CPU, the same outputs; float32 "
                                   "only); set lean_rmsnorm=false for op-by-op autograd."),
}


def _engine_choices(bundle: ModelBundle, config: TrainingConfig, choices: dict[str, Any],
                    warnings: list[str]) -> list[str]:
    """Speed/memory choices of the transformers engine (Unsloth makes its own); each reported, each can be off."""
    notes: list[str] = []
    choices["packing"] = config.packing
    choices["padding_free"] = bool(config.padding_free) and not config.packing
    choices["group_by_length"] = bool(config.group_by_length)
    choices["use_gradient_checkpointing"] = config.use_gradient_checkpointing
    choices["float32_compute"] = False
    choices["cpu_bf16_slowdown"] = None  # measured where float32_compute is considered
    choices["cpu_bf16_instructions"] = None  # the CPU's flags, read where float32_compute is considered
    choices["lean_lora_dropout"] = False
    choices.update(dict.fromkeys(_LEAN_FUNCTIONS, False))
    choices["use_liger_kernel"] = False
    choices["torch_compile"] = False
    choices["release_memory"] = False
    choices["reuse_freed_memory"] = config.reuse_freed_memory and choices["use_cpu"] and not config.release_memory \
        and can_reuse_freed_memory()
    if choices["reuse_freed_memory"]:
        notes.append("memory: what a step frees stays in the process's heap for the next step (glibc's mmap and "
                     "trim thresholds raised while training) instead of being unmapped and faulted in again page "
                     "by page (measured on llama-3.5M x 512: +6% tokens/s, within noise, and +13-19% peak RSS, "
                     "since blocks of each batch length then fragment the heap); opt-in.")
    elif config.reuse_freed_memory:
        why = ("release_memory=true asks for the opposite (freed pages back to the OS each step); it was applied"
               if config.release_memory else "it applies to CPU training with glibc's allocator, not here")
        warnings.append(f"reuse_freed_memory=true was not applied: {why}.")
    choices["cpu_kernel_cache_capacity"] = _cpu_kernel_cache(choices, notes)
    if bundle.engine != "transformers":
        if config.liger_kernel or config.torch_compile:
            warnings.append("liger_kernel and torch_compile apply to the transformers engine; Unsloth uses its own "
                            "kernels, so they were not applied.")
        return notes
    if config.padding_free is None and not config.packing and choices["attn_implementation"] == "flash_attention_2":
        # Only a varlen attention kernel makes this pay: SDPA attends over the whole flattened row with a
        # block-diagonal mask, (sum of lengths)^2 work, which measured slower than length-grouped padding on CPU.
        choices["padding_free"] = True
        notes.append("padding-free batches: each batch's examples run as one row without padding through "
                     "flash-attention's varlen kernel (position ids keep them apart), so no compute goes to padding "
                     "and every batch holds the same examples as with padding; set padding_free=false to pad.")
    if config.group_by_length is None and not (choices["padding_free"] or config.packing):
        choices["group_by_length"] = True
        notes.append("length-grouped batches: examples of similar length share a batch, so little compute goes to "
                     "padding; set group_by_length=false for fully random batches.")
    if config.use_gradient_checkpointing and config.auto_gradient_checkpointing and _memory_is_ample(bundle, config):
        choices["use_gradient_checkpointing"] = False
        notes.append("gradient checkpointing: off, since the memory estimate without it is under half of the free "
                     "memory (it would only cost time); set auto_gradient_checkpointing=false to force it on.")
    if config.auto_precision and config.bf16 is None and config.fp16 is None and choices["use_cpu"] \
            and choices["bf16"]:
        choices["bf16"] = False
        notes.append("precision: float32 compute instead of bf16 autocast, which is slower on CPUs; set "
                     "auto_precision=false (or bf16=true) to keep bf16.")
    if config.auto_precision and not (choices["bf16"] or choices["fp16"]):
        choices["cpu_bf16_slowdown"] = bf16_slowdown(bundle.model)
        choices["cpu_bf16_instructions"] = None if choices["cpu_bf16_slowdown"] is None else cpu_bf16_instructions()
    if is_emulated(choices["cpu_bf16_slowdown"]) and may_apply("float32_compute", warnings):
        choices["float32_compute"] = True
        layers = len(bitsandbytes_compute_layers(bundle.model))
        notes.append(f"precision: this CPU has no bf16 instructions ({emulation_basis()}), so "
                     + (f"the {layers} 4-bit layers multiply in float32 instead of {bundle.compute_dtype} (their "
                        "compute dtype comes back after training), and " if layers else "")
                     + "the trainable parameters (the LoRA adapters) stay float32 instead of the bf16 TRL casts a "
                     "quantized model's adapters to: the same weights, computed more precisely and faster on such "
                     "CPUs (docs/benchmarks.md). Set auto_precision=false to keep bf16.")
    dropout = _lora_dropout(bundle)
    choices["lean_lora_dropout"] = config.lean_lora_dropout and not (choices["bf16"] or choices["fp16"]) \
        and dropout > 0 and may_apply("lean_lora_dropout", warnings)
    if choices["lean_lora_dropout"]:
        notes.append(f"LoRA dropout ({dropout}): masks drawn 6x faster (PCG64 words compared 16 bits at a time, "
                     "seeded from torch's generator) and drawn again in the backward pass from their seed, so "
                     "nothing per element is kept instead of float copies of each adapted projection's input; set "
                     "lean_lora_dropout=false for peft's own dropout.")
    for key, (_, note) in _LEAN_FUNCTIONS.items():
        choices[key] = getattr(config, key) and not (choices["bf16"] or choices["fp16"]) and may_apply(key, warnings)
        if choices[key]:
            notes.append(note)
    _kernel_choices(config, choices, notes, warnings)
    if config.release_memory and choices["use_cpu"] and release_freed_memory():
        choices["release_memory"] = True
        notes.append("memory: the heap's freed pages go back to the OS after each step (malloc_trim), so the peak "
                     "resident memory is the step's own, not the step's plus what earlier steps freed (measured: "
                     "-11% peak RSS, -15% tokens/s on llama-3.5M x 512).")
    if choices["optim"] == "adamw_torch" and config.optim != "adamw_torch":  # our substitute for a paged AdamW
        choices["optim"] = "adamw_torch_fused"
        notes.append("optimizer: AdamW with its fused kernel (one kernel for all parameters; the same update); "
                     "optim='adamw_torch' asks for the unfused one.")
    return notes


def _cpu_kernel_cache(choices: dict[str, Any], notes: list[str]) -> int | None:
    """The capacity of oneDNN's primitive cache in this process (set at the engine's import; None on CUDA)."""
    if not choices["use_cpu"]:
        return None
    value = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")
    capacity = int(value) if value.isdigit() else 1024
    if value == CPU_KERNEL_CACHE_CAPACITY["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]:
        notes.append(f"memory: oneDNN's and ideep's caches of compiled CPU matmuls hold {capacity} shapes each "
                     "instead of 1,024, since each new batch length adds one and they grew the heap ~15 MiB a step "
                     "(the same speed, measured); start the server with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 and "
                     "LRU_CACHE_CAPACITY=1024 for the libraries' defaults.")
    return capacity


def _kernel_choices(config: TrainingConfig, choices: dict[str, Any], notes: list[str], warnings: list[str]) -> None:
    """Liger's Triton kernels (CUDA only; transformers' Trainer applies them) and opt-in torch.compile."""
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if config.liger_kernel is not False and not choices["use_cpu"] and has_liger:
        choices["use_liger_kernel"] = True
        notes.append("Liger kernels: fused RMSNorm, SwiGLU and RoPE (Triton); TRL computes the loss with its own "
                     "chunked LM head, so the logits are never materialized either; set liger_kernel=false to turn "
                     "them off.")
    elif config.liger_kernel:
        why = "they are Triton kernels and need a CUDA GPU" if choices["use_cpu"] else \
            "liger-kernel is not installed in the worker's environment (pip install liger-kernel)"
        warnings.append(f"liger_kernel=true but Liger's kernels cannot run here: {why}; trained with PyTorch's.")
    if config.torch_compile and may_apply("torch_compile", warnings):
        choices["torch_compile"] = True
        notes.append("torch.compile: each decoder layer is compiled (one graph shared by all layers, dynamic "
                     "shapes) at the first step, which takes longer (~30-40 s for the tiny model on 2 CPU cores); "
                     "later steps run the fused kernels. torch_compile=false skips it.")


def _lora_dropout(bundle: ModelBundle) -> float:
    return float(next(iter(bundle.model.peft_config.values())).lora_dropout)


def _memory_is_ample(bundle: ModelBundle, config: TrainingConfig) -> bool:
    from llm_mcp import memory

    shape = memory.shape_from_config(bundle.model.config.to_dict())
    device = "cuda" if detect().has_cuda else "cpu"
    free = _free_bytes(device)
    if shape is None or free is None:
        return False
    run = memory.estimate(shape, quant_type=bundle.quantization, compute_dtype=bundle.compute_dtype,
                          lora_rank=int(next(iter(bundle.model.peft_config.values())).r), batch_size=config.batch_size,
                          max_length=bundle.max_length, use_gradient_checkpointing=False, optim=config.optim,
                          device=device, free_bytes=free, with_advice=False)
    return run.total_bytes < 0.5 * free


def _free_bytes(device: str) -> int | None:
    import torch

    from llm_mcp import memory

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    return memory.free_memory("cpu")


def _mixed_precision(bundle: ModelBundle, config: TrainingConfig, warnings: list[str]) -> tuple[bool, bool]:
    """bf16/fp16 autocast: as asked where the hardware has it, else from the model's compute dtype."""
    hw = detect()
    if config.bf16 is None and config.fp16 is None:
        bf16, fp16 = bundle.compute_dtype == "bfloat16", hw.has_cuda and bundle.compute_dtype == "float16"
        if hw.has_cuda and not hw.bf16_supported and bf16:
            bf16, fp16 = False, True
    else:  # one flag given: the other defaults to off
        bf16, fp16 = bool(config.bf16), bool(config.fp16)
    if bf16 and not hw.bf16_supported:
        warnings.append("bf16=true is not supported by this GPU; training in fp16 instead.")
        bf16, fp16 = False, True
    if fp16 and not hw.has_cuda:
        warnings.append("fp16 mixed precision needs a CUDA GPU; training in bf16 on CPU instead.")
        bf16, fp16 = True, False
    return bf16, fp16


def _set_attention(bundle: ModelBundle, attn: str) -> None:
    if bundle.engine == "unsloth":  # Unsloth patches attention itself
        return
    base = bundle.model.get_base_model()
    if getattr(base.config, "_attn_implementation", None) != attn:
        base.set_attn_implementation(attn)


class _ProgressCallback(TrainerCallback):
    """Forward step/total/loss to the server (throttled) and stop cleanly, with a checkpoint, when asked."""

    def __init__(self, on_progress: ProgressFn, should_stop: Callable[[], bool], *, release_memory: bool) -> None:
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.release_memory = release_memory
        self.latest: dict[str, float] = {}
        self.last_sent = 0.0
        self.stopped = False
        self.start_step = 0  # > 0 when resuming: log_history then also holds the earlier run's entries

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.latest = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            self._send(state, force=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.on_progress(state.global_step, state.max_steps, {"eval_loss": float(metrics["eval_loss"])})

    def on_save(self, args, state, control, **kwargs):
        checkpoint = str(Path(args.output_dir).resolve() / f"checkpoint-{state.global_step}")
        self.on_progress(state.global_step, state.max_steps, {**self.latest, "checkpoint": checkpoint})

    def on_step_end(self, args, state, control, **kwargs):
        if self.release_memory:
            release_freed_memory()
        if not control.should_log:  # a logging step reports from on_log, with its loss
            self._send(state, force=state.global_step >= state.max_steps)
        if self.should_stop():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def _send(self, state, *, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.last_sent >= _PROGRESS_EVERY_S:
            self.last_sent = now
            self.on_progress(state.global_step, state.max_steps, self.latest)


def train(bundle: ModelBundle, config: TrainingConfig, train_source: Any, eval_source: Any, options: RunOptions, *,
          on_progress: ProgressFn, should_stop: Callable[[], bool], notes: list[str],
          cpu_threads: Callable[[], int | None] | None = None, holder: str | None = None) -> dict[str, Any]:
    """cpu_threads, when given, is read at every step: the CPU threads to use now (None: all), as the server
    shares the cores among the trainings running at the same time. holder names this run in output_dir's lock
    (e.g. "model m-1, job j-2"), which it holds from before anything there is read or deleted to the end."""
    share = None if cpu_threads is None or detect().has_cuda else _CoreShare(cpu_threads)
    try:
        with output_lock.claim(config.output_dir, holder or "a training run", doing="training"):
            answer = _train(bundle, config, train_source, eval_source, options, on_progress=on_progress,
                            should_stop=should_stop, notes=notes, extra_callbacks=[share] if share else [])
    finally:
        if share is not None:
            share.restore()
    if share is not None and share.changes:
        answer["engine_choices"].append(share.describe())
    return answer


class _CoreShare(TrainerCallback):
    """Follow the thread count asked for at each step: runs that each use every core contend for them (measured
    ~16x slower for two runs on 2 cores), so the server splits the cores whenever a training starts or ends."""

    def __init__(self, wanted: Callable[[], int | None]) -> None:
        import torch

        self.wanted = wanted
        self.all = self.current = torch.get_num_threads()
        self.changes: list[tuple[int, int]] = []  # (step, threads from then on)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def _apply(self, step: int) -> None:
        import torch

        threads = min(self.wanted() or self.all, self.all)
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
            self.changes.append((step, threads))

    def restore(self) -> None:
        import torch

        torch.set_num_threads(self.all)

    def describe(self) -> str:
        steps = ", ".join(f"{threads} from step {step}" for step, threads in self.changes)
        return (f"cpu threads: {steps} (of {self.all}), as other trainings started or ended on this machine's "
                "cores.")


def _train(bundle: ModelBundle, config: TrainingConfig, train_source: Any, eval_source: Any, options: RunOptions, *,
           on_progress: ProgressFn, should_stop: Callable[[], bool], notes: list[str],
           extra_callbacks: list[Any]) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    reset_peak_memory()  # this run's peak, not an earlier run's in the same worker
    warnings = list(notes) + list(bundle.warnings)
    choices, hw_warnings = _hardware_choices(bundle, config)
    warnings += hw_warnings
    out = Path(config.output_dir)
    point = _resume_point(out, options.resume_from_checkpoint, bundle)
    resume = point.path
    _guard_output_dir(out, resume, options.overwrite_output_dir)
    warnings += point.warnings()
    point.remove_torn()
    sizes = save_sizes(bundle.model, bundle.tokenizer, choices["optim"])
    require_free(out, sizes.checkpoint + sizes.final, doing="training (room for a checkpoint and the final adapter)")

    template = getattr(bundle.tokenizer, "chat_template", None)
    train_data = prepare_dataset(train_source, dataset_format=options.dataset_format, chat_template=template,
                                 param="train_dataset", tokenizer=bundle.tokenizer, should_stop=should_stop,
                                 skip_invalid_rows=options.skip_invalid_rows)
    eval_data = None if eval_source is None else prepare_dataset(
        eval_source, dataset_format=options.dataset_format, chat_template=template, param="eval_dataset",
        tokenizer=bundle.tokenizer, should_stop=should_stop, skip_invalid_rows=options.skip_invalid_rows)
    warnings += train_data.warnings + (eval_data.warnings if eval_data else [])
    engine_notes = _engine_choices(bundle, config, choices, warnings)

    args = SFTConfig(
        output_dir=str(out), learning_rate=config.learning_rate, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        # transformers 5: a float in [0, 1) is a ratio of the total steps, an int a number of steps
        warmup_steps=config.warmup_ratio if config.warmup_steps is None else config.warmup_steps,
        weight_decay=config.weight_decay, optim=choices["optim"], lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps, logging_first_step=True,
        # save_total_limit is applied by CheckpointSeal, among complete checkpoints only
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=None,
        report_to=choices["report_to"],
        **_checkpointing_args(SFTConfig, choices["use_gradient_checkpointing"]),
        packing=choices["packing"],
        train_sampling_strategy="group_by_length" if choices["group_by_length"] else "random",
        bf16=choices["bf16"], fp16=choices["fp16"], use_cpu=choices["use_cpu"], seed=config.seed,
        use_liger_kernel=choices["use_liger_kernel"],
        data_seed=config.seed, max_length=bundle.max_length,
        assistant_only_loss=train_data.assistant_only_loss,
        eval_strategy="steps" if (eval_data and options.eval_steps) else "no", eval_steps=options.eval_steps,
        disable_tqdm=True, dataloader_pin_memory=False,
    )
    callback = _ProgressCallback(on_progress, should_stop, release_memory=choices["release_memory"])
    space = CheckpointSpace(out, sizes, config.save_total_limit, warnings)
    # float32_compute keeps the adapters' float32 values: building the trainer rounds them to bf16 (TRL's QLoRA cast)
    with trainable_tensors_kept(bundle.model) if choices["float32_compute"] else nullcontext():
        trainer = SFTTrainer(
            model=bundle.model, args=args, train_dataset=train_data.dataset,
            eval_dataset=eval_data.dataset if eval_data else None, processing_class=bundle.tokenizer,
            # the seal before the progress report (no checkpoint reported unsealed), the space check after the
            # stop callback (which asks for a save at the step's end)
            callbacks=[CheckpointSeal(config.save_total_limit), callback, space, *extra_callbacks],
        )
    if choices["padding_free"]:
        _make_padding_free(trainer)
    warnings += _engine_changes(trainer, choices)
    with ExitStack() as engine_patches:  # undone when training ends: generation and export run on peft's model
        if choices["float32_compute"]:  # first: the lean functions read the dtypes it sets
            engine_patches.enter_context(float32_compute(bundle.model))
        for key, (patch, _) in _LEAN_FUNCTIONS.items():
            if choices[key]:
                engine_patches.enter_context(patch(bundle.model))
        if choices["lean_lora_dropout"]:
            engine_patches.enter_context(lean_lora_dropout(bundle.model))
        if choices["torch_compile"]:
            engine_patches.enter_context(compiled_layers(bundle.model))
        if choices["reuse_freed_memory"]:
            engine_patches.enter_context(freed_memory_reused())
        result = _run_saving_safely(trainer, resume, config, bundle, space)
    metrics = {k: float(result.metrics[k]) for k in SPEC_METRICS if k in result.metrics}
    if eval_data is not None and not callback.stopped:  # a stopped run saves and ends quickly
        with float32_compute(bundle.model) if choices["float32_compute"] else nullcontext():  # as it trained
            metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    final = out / "final"
    _save_final(trainer, bundle.tokenizer, final, sizes)
    answer = _answer(bundle, config, trainer, metrics, final, train_data, choices, warnings, callback, resume)
    answer["engine_choices"] = engine_notes
    return answer


def _make_padding_free(trainer: Any) -> None:
    """Flatten each batch into one row without padding. TRL refuses padding_free with max_length unless packing
    (it would not truncate), so the trainer is built padded, which truncates the dataset to max_length, and its
    collator is then switched to padding-free."""
    trainer.data_collator.padding_free = True
    trainer.padding_free = True


def _engine_changes(trainer: Any, choices: dict[str, Any]) -> list[str]:
    """What the training engine itself changed (Unsloth's CPU mode maps 8-bit optimizers to AdamW)."""
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    asked = choices["optim"]
    if optim == asked:
        return []
    choices["optim"] = optim
    return [f"the training engine replaced optim={asked!r} by {optim!r} on this hardware."]


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
    an earlier run's final folder as it was, or none."""
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
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


def _answer(bundle: ModelBundle, config: TrainingConfig, trainer: Any, metrics: dict[str, float], final: Path, data: PreparedDataset,
            choices: dict[str, Any], warnings: list[str], callback: _ProgressCallback,
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
                    "loss_on": "answers only" if data.source_format != "text" else "all tokens"},
        "effective_config": {**asdict(config), **choices},
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
