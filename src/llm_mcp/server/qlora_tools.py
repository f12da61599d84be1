"""The qloraevolved_* tools: typed signatures whose hints and docstrings are the schema the agent reads.

Bodies stay thin: build a config, hand it to ModelService, shape the spec's answer. Unload, status, cancel and
list_jobs come from server/common.py, shared with the unsloth family.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from llm_mcp.config import (
    MAX_ID_CHARS, BatchSize, ChatTemplate, ComputeDtype, DatasetFormat, DeviceMap, Epochs, GradAccum, LearningRate,
    LoadConfig, LoraAlpha, LoraDropout, LoraRank, LrScheduler, MaxGradNorm, MaxLength, MaxSteps, Nf4OptimizedBudget,
    Optimizer, QuantType, ReportTo, SaveLimit, Seed, Steps,
    TrainingConfig, WarmupRatio, WeightDecay, validated,
)
from llm_mcp.server.annotations import add_tool
from llm_mcp.server.results import ListModelsAnswer, LoadAnswer, PrepareAnswer, TrainAnswer
from llm_mcp.server.common import (DatasetArg, MethodArg, WaitSeconds, agent_tool, service_of, shared_tools,
                                   train_description)
from llm_mcp.server.service import QLORA

log = logging.getLogger(__name__)

ModelId = Annotated[str, Field(max_length=MAX_ID_CHARS, description="Id returned by qloraevolved_load_model.")]


@agent_tool
async def qloraevolved_load_model(
    model_name: Annotated[str, Field(description="Local Hugging Face model folder, a .gguf file (converted once), "
                                                 "a finished adapter folder (<output_dir>/final: its base is loaded "
                                                 "with the adapter on top), or a hub id such as "
                                                 "'Qwen/Qwen2.5-0.5B' (needs the hub or its cache).")],
    model_id: Annotated[str | None, Field(max_length=MAX_ID_CHARS, description=(
        "Id to give the model; generated from the name when null. An id already loaded is refused."))] = None,
    max_length: MaxLength = LoadConfig.max_length,
    load_in_4bit: Annotated[bool, Field(description="Load weights in 4-bit. false with a 4-bit quant_type loads "
                                                    "the model unquantized (plain LoRA).")] = LoadConfig.load_in_4bit,
    quant_type: Annotated[QuantType, Field(description=(
        "nf4 = bitsandbytes 4-bit NormalFloat (+ use_double_quant); int4 = group-wise affine 4-bit integers "
        "(torchao); fp8 = float8 e4m3 weights (torchao); int8 = bitsandbytes LLM.int8; none = no quantization "
        "(standard LoRA); nf4_optimized = NF4 with double quantization, keeping the linear layers NF4 distorts "
        "most in 16-bit within nf4_optimized_budget. load_in_4bit only matters for the 4-bit types: false "
        "turns them into none."))] = LoadConfig.quant_type,
    use_double_quant: Annotated[bool, Field(description="Quantize the 4-bit scales too (saves ~0.4 bit/param).")]
    = LoadConfig.use_double_quant,
    compute_dtype: Annotated[ComputeDtype, Field(description="Dtype of compute and of unquantized weights.")]
    = LoadConfig.compute_dtype,
    lora_rank: LoraRank = LoadConfig.lora_rank,
    lora_alpha: LoraAlpha = LoadConfig.lora_alpha,
    lora_dropout: LoraDropout = LoadConfig.lora_dropout,
    target_modules: Annotated[list[str] | None, Field(description="Linear layer names to adapt; default: q/k/v/o "
                                                                  "and gate/up/down projections that exist.")] = None,
    device_map: DeviceMap = LoadConfig.device_map,
    trust_remote_code: Annotated[bool, Field(description="Run code shipped with the model. Off unless you trust "
                                                         "its source.")] = LoadConfig.trust_remote_code,
    nf4_optimized_budget: Nf4OptimizedBudget = LoadConfig.nf4_optimized_budget,
    chat_template: ChatTemplate = LoadConfig.chat_template,
    force: Annotated[bool, Field(description="Load even when the memory estimate says the weights cannot fit.")]
    = False,
    ctx: Context = None,
) -> LoadAnswer:
    """Load a causal LM (4-bit NF4 by default) and attach a LoRA adapter, in its own worker process.

    Returns model_id, parameter counts (trainable = LoRA), the config, the device, and warnings for anything
    this machine could not do as asked. Next: qloraevolved_prepare_for_training, then qloraevolved_train.
    """
    config = validated(LoadConfig, dict(
        model_name=model_name, max_length=max_length, load_in_4bit=load_in_4bit, quant_type=quant_type,
        use_double_quant=use_double_quant, compute_dtype=compute_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=None if target_modules is None else tuple(target_modules),
        device_map=device_map, trust_remote_code=trust_remote_code, nf4_optimized_budget=nf4_optimized_budget,
        chat_template=chat_template),
        where="load_model")
    loaded = await service_of(ctx).load(QLORA, config, model_id, force=force)
    return {
        "status": "success",
        "model_id": loaded.model_id,
        "model_name": config.model_name,
        "trainable_params": loaded.info["trainable_params"],
        "total_params": loaded.info["total_params"],
        "config": _spec_config(config, loaded.info),
        "device": loaded.device,
        "quantization": loaded.info["quantization"],
        "memory": loaded.info["memory"],
        "attention": loaded.info.get("attention"),
        **({"target_parameters": loaded.info["target_parameters"]} if loaded.info.get("target_parameters") else {}),
        **({"nf4_optimized": loaded.info["nf4_optimized"]} if loaded.info.get("nf4_optimized") else {}),
        "chat_template": loaded.info.get("chat_template"),
        "warnings": loaded.info["warnings"],
    }


def _spec_config(config: LoadConfig, info: dict[str, Any]) -> dict[str, Any]:
    return {**config.spec_dict(), "target_modules": info["target_modules"]}


@agent_tool
async def qloraevolved_prepare_for_training(
    model_id: ModelId,
    output_dir: Annotated[str, Field(description="Folder for checkpoints, TensorBoard logs and the final adapter "
                                                 "(relative to the workspace).")] = TrainingConfig.output_dir,
    learning_rate: LearningRate = TrainingConfig.learning_rate,
    batch_size: BatchSize = TrainingConfig.batch_size,
    gradient_accumulation_steps: GradAccum = TrainingConfig.gradient_accumulation_steps,
    num_train_epochs: Epochs = TrainingConfig.num_train_epochs,
    max_steps: MaxSteps = TrainingConfig.max_steps,
    warmup_ratio: WarmupRatio = TrainingConfig.warmup_ratio,
    weight_decay: WeightDecay = TrainingConfig.weight_decay,
    optim: Annotated[Optimizer, Field(description="Optimizer; paged/8-bit ones need bitsandbytes (paged falls back "
                                                  "to non-paged without CUDA).")] = TrainingConfig.optim,
    lr_scheduler_type: Annotated[LrScheduler, Field(description="How the learning rate changes over the run after "
                                                                "warm-up.")] = TrainingConfig.lr_scheduler_type,
    max_grad_norm: MaxGradNorm = TrainingConfig.max_grad_norm,
    logging_steps: Annotated[int, Field(ge=1, le=10_000_000, description="Log loss every N optimizer steps.")]
    = TrainingConfig.logging_steps,
    save_steps: Annotated[int, Field(ge=1, le=10_000_000, description="Save a checkpoint every N optimizer steps.")]
    = TrainingConfig.save_steps,
    save_total_limit: SaveLimit = TrainingConfig.save_total_limit,
    report_to: Annotated[ReportTo, Field(description="'tensorboard' writes event files under <output_dir>/runs.")]
    = TrainingConfig.report_to,
    use_gradient_checkpointing: Annotated[bool, Field(description="Recompute activations in backward: less memory, "
                                                                  "~30% slower.")]
    = TrainingConfig.use_gradient_checkpointing,
    use_flash_attention_2: Annotated[bool, Field(description="Use flash-attention 2 where installed on a CUDA GPU; "
                                                             "PyTorch SDPA otherwise.")]
    = TrainingConfig.use_flash_attention_2,
    use_cpu_offload: Annotated[bool, Field(description="Offload to CPU memory when the GPU is too small.")]
    = TrainingConfig.use_cpu_offload,
    seed: Seed = TrainingConfig.seed,
    ctx: Context = None,
) -> PrepareAnswer:
    """Set the training hyper-parameters of a loaded model and enable gradient checkpointing / attention choice.

    Returns the config that qloraevolved_train will use (train may still override any of it). Next:
    qloraevolved_train with a dataset.
    """
    values = {k: v for k, v in locals().items() if k not in ("model_id", "ctx")}
    config = validated(TrainingConfig, values, where="prepare_for_training")
    result = await service_of(ctx).prepare(QLORA, model_id, config)
    return {"status": "success", "message": f"Model {model_id} prepared for training", "config": config.spec_dict(),
            "warnings": result["warnings"]}


# a train argument that overrides one setting of prepare_for_training for this run
OVERRIDE = Field(description="For this run only (null: the prepared value).")


@agent_tool
async def qloraevolved_train(
    model_id: ModelId,
    train_dataset: DatasetArg,
    eval_dataset: Annotated[DatasetArg | None, Field(description="Optional evaluation data, same forms; eval_loss "
                                                                 "is reported at the end.")] = None,
    training_config: Annotated[dict[str, Any] | None, Field(
        description="Overrides of the prepared config by name (learning_rate, batch_size, max_steps, ...), plus "
                    "dataset_format, resume_from_checkpoint, overwrite_output_dir, eval_steps, skip_invalid_rows (true: skip "
                    "malformed rows and count them instead of refusing the run).")] = None,
    dataset_format: Annotated[DatasetFormat, Field(description="Row format; 'auto' detects it from the columns.")]
    = "auto",
    resume_from_checkpoint: Annotated[bool | str, Field(description="true: continue from the latest checkpoint in "
                                                                    "output_dir; or a checkpoint folder path.")]
    = False,
    overwrite_output_dir: Annotated[bool, Field(description="Allow writing into an output_dir that holds an "
                                                            "earlier run's results.")] = False,
    learning_rate: Annotated[LearningRate | None, OVERRIDE] = None,
    batch_size: Annotated[BatchSize | None, OVERRIDE] = None,
    gradient_accumulation_steps: Annotated[GradAccum | None, OVERRIDE] = None,
    num_train_epochs: Annotated[Epochs | None, OVERRIDE] = None,
    max_steps: Annotated[MaxSteps | None, OVERRIDE] = None,
    warmup_ratio: Annotated[WarmupRatio | None, OVERRIDE] = None,
    weight_decay: Annotated[WeightDecay | None, OVERRIDE] = None,
    optim: Annotated[Optimizer | None, OVERRIDE] = None,
    lr_scheduler_type: Annotated[LrScheduler | None, OVERRIDE] = None,
    max_grad_norm: Annotated[MaxGradNorm | None, OVERRIDE] = None,
    logging_steps: Annotated[Steps | None, OVERRIDE] = None,
    save_steps: Annotated[Steps | None, OVERRIDE] = None,
    save_total_limit: Annotated[SaveLimit | None, OVERRIDE] = None,
    output_dir: Annotated[str | None, OVERRIDE] = None,
    report_to: Annotated[ReportTo | None, OVERRIDE] = None,
    use_gradient_checkpointing: Annotated[bool | None, OVERRIDE] = None,
    use_flash_attention_2: Annotated[bool | None, OVERRIDE] = None,
    use_cpu_offload: Annotated[bool | None, OVERRIDE] = None,
    seed: Annotated[Seed | None, OVERRIDE] = None,
    method: MethodArg = None,
    wait_seconds: WaitSeconds = 45,
    ctx: Context = None,
) -> TrainAnswer:
    """Fine-tune a loaded model's LoRA adapter with TRL (SFTTrainer; or the method's trainer) and save it to
    <output_dir>/final."""
    given = {k: v for k, v in locals().items()
             if k not in ("model_id", "train_dataset", "eval_dataset", "training_config", "ctx", "wait_seconds")
             and v is not None}
    for flag, default in (("dataset_format", "auto"), ("resume_from_checkpoint", False),
                          ("overwrite_output_dir", False)):
        if given.get(flag) == default:
            given.pop(flag)  # defaults must not mask the same key inside training_config
    overrides = {**(training_config or {}), **given}

    async def progress(step: int, total: int, message: str) -> None:
        await ctx.report_progress(step, total, message)

    return await service_of(ctx).train(QLORA, model_id, train_dataset, eval_dataset, overrides, wait_seconds, progress)


qloraevolved_train.__doc__ += "\n\n" + train_description(QLORA)


@agent_tool
async def qloraevolved_list_models(ctx: Context = None) -> ListModelsAnswer:
    """List the loaded models with their load config, device and state (ready, prepared, busy, lost)."""
    service = service_of(ctx)
    return {"status": "success", "models": {
        m.model_id: {"config": _spec_config(m.load_config, m.info), "device": m.device,
                     "state": service.model_state(m)} for m in service.models(QLORA)}}


def register(server: Any) -> None:
    for tool in (qloraevolved_load_model, qloraevolved_prepare_for_training, qloraevolved_train,
                 qloraevolved_list_models):
        add_tool(server, tool)
    for fn, name, description in shared_tools(QLORA):
        add_tool(server, fn, name=name, description=description)
