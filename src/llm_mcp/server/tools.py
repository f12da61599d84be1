"""The qloraevolved_* tools: typed signatures whose hints and docstrings are the schema the agent reads.

Bodies stay thin: build a config, hand it to ModelService, return its answer. `agent_tool` is the one place
where our errors become MCP tool errors.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from llm_mcp.config import (
    BatchSize, ComputeDtype, DatasetFormat, Epochs, GradAccum, LearningRate, LoadConfig, LoraAlpha, LoraDropout,
    LoraRank, LrScheduler, MaxGradNorm, MaxLength, MaxSteps, Optimizer, QuantType, ReportTo, SaveLimit, Seed, Steps,
    TrainingConfig, WarmupRatio, WeightDecay, validated,
)
from llm_mcp.errors import LlmMcpError
from llm_mcp.server.service import QLORA, ModelService

log = logging.getLogger(__name__)

WaitSeconds = Annotated[float, Field(ge=-1, le=86400, description=(
    "Seconds to wait for the run to finish before answering 'running' with a job_id (training goes on); "
    "-1 waits until the end. Most clients drop calls after ~60 s, so keep it below that."))]
ModelId = Annotated[str, Field(description="Id returned by qloraevolved_load_model.")]
DatasetArg = Annotated[
    str | list[dict[str, Any]],
    Field(description=(
        "A .jsonl/.json/.csv/.parquet/.txt file path, a datasets.save_to_disk folder (relative paths start at the "
        "server's workspace), a hub id ('name' or 'name:split'), or inline rows. Row formats: {text}; "
        "{instruction, input, output}; {prompt, completion}; {messages: [{role, content}]}."
    )),
]


def agent_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into tool errors whose text reaches the agent; report unexpected ones with their message."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except LlmMcpError as exc:
            raise ToolError(str(exc)) from exc
        except ToolError:
            raise
        except Exception as exc:
            log.exception("tool %s failed unexpectedly", fn.__name__)
            raise ToolError(f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}") from exc

    return wrapper


def _service(ctx: Context) -> ModelService:
    return ctx.request_context.lifespan_context


@agent_tool
async def qloraevolved_load_model(
    model_name: Annotated[str, Field(description="Local Hugging Face model folder, or a hub id such as "
                                                 "'Qwen/Qwen2.5-0.5B' (needs the hub or its cache).")],
    model_id: Annotated[str | None, Field(description="Id to give the model; generated from the name when null. "
                                                      "An id already loaded is refused.")] = None,
    max_length: MaxLength = LoadConfig.max_length,
    load_in_4bit: Annotated[bool, Field(description="Load weights in 4-bit. false with a 4-bit quant_type loads "
                                                    "the model unquantized (plain LoRA).")] = LoadConfig.load_in_4bit,
    quant_type: Annotated[QuantType, Field(description="nf4 = bitsandbytes 4-bit NormalFloat; none = no "
                                                       "quantization (standard LoRA). nf4_optimized, int4, fp8 are "
                                                       "not supported yet.")] = LoadConfig.quant_type,
    use_double_quant: Annotated[bool, Field(description="Quantize the 4-bit scales too (saves ~0.4 bit/param).")]
    = LoadConfig.use_double_quant,
    compute_dtype: Annotated[ComputeDtype, Field(description="Dtype of compute and of unquantized weights.")]
    = LoadConfig.compute_dtype,
    lora_rank: LoraRank = LoadConfig.lora_rank,
    lora_alpha: LoraAlpha = LoadConfig.lora_alpha,
    lora_dropout: LoraDropout = LoadConfig.lora_dropout,
    target_modules: Annotated[list[str] | None, Field(description="Linear layer names to adapt; default: q/k/v/o "
                                                                  "and gate/up/down projections that exist.")] = None,
    device_map: Annotated[str, Field(description="'auto' places the model on the GPU when there is one.")]
    = LoadConfig.device_map,
    trust_remote_code: Annotated[bool, Field(description="Run code shipped with the model. Off unless you trust "
                                                         "its source.")] = LoadConfig.trust_remote_code,
    ctx: Context = None,
) -> dict[str, Any]:
    """Load a causal LM (4-bit NF4 by default) and attach a LoRA adapter, in its own worker process.

    Returns model_id, parameter counts (trainable = LoRA), the config, the device, and warnings for anything
    this machine could not do as asked. Next: qloraevolved_prepare_for_training, then qloraevolved_train.
    """
    config = validated(LoadConfig, dict(
        model_name=model_name, max_length=max_length, load_in_4bit=load_in_4bit, quant_type=quant_type,
        use_double_quant=use_double_quant, compute_dtype=compute_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=None if target_modules is None else tuple(target_modules),
        device_map=device_map, trust_remote_code=trust_remote_code), where="load_model")
    return await _service(ctx).load(QLORA, config, model_id)


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
    lr_scheduler_type: LrScheduler = TrainingConfig.lr_scheduler_type,
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
) -> dict[str, Any]:
    """Set the training hyper-parameters of a loaded model and enable gradient checkpointing / attention choice.

    Returns the config that qloraevolved_train will use (train may still override any of it). Next:
    qloraevolved_train with a dataset.
    """
    values = {k: v for k, v in locals().items() if k not in ("model_id", "ctx")}
    config = validated(TrainingConfig, values, where="prepare_for_training")
    return await _service(ctx).prepare(QLORA, model_id, config)


@agent_tool
async def qloraevolved_train(
    model_id: ModelId,
    train_dataset: DatasetArg,
    eval_dataset: Annotated[DatasetArg | None, Field(description="Optional evaluation data, same forms; eval_loss "
                                                                 "is reported at the end.")] = None,
    training_config: Annotated[dict[str, Any] | None, Field(
        description="Overrides of the prepared config by name (learning_rate, batch_size, max_steps, ...), plus "
                    "dataset_format, resume_from_checkpoint, overwrite_output_dir, eval_steps.")] = None,
    dataset_format: Annotated[DatasetFormat, Field(description="Row format; 'auto' detects it from the columns.")]
    = "auto",
    resume_from_checkpoint: Annotated[bool | str, Field(description="true: continue from the latest checkpoint in "
                                                                    "output_dir; or a checkpoint folder path.")]
    = False,
    overwrite_output_dir: Annotated[bool, Field(description="Allow writing into an output_dir that holds an "
                                                            "earlier run's results.")] = False,
    learning_rate: LearningRate | None = None,
    batch_size: BatchSize | None = None,
    gradient_accumulation_steps: GradAccum | None = None,
    num_train_epochs: Epochs | None = None,
    max_steps: MaxSteps | None = None,
    warmup_ratio: WarmupRatio | None = None,
    weight_decay: WeightDecay | None = None,
    optim: Optimizer | None = None,
    lr_scheduler_type: LrScheduler | None = None,
    max_grad_norm: MaxGradNorm | None = None,
    logging_steps: Steps | None = None,
    save_steps: Steps | None = None,
    save_total_limit: SaveLimit | None = None,
    output_dir: str | None = None,
    report_to: ReportTo | None = None,
    use_gradient_checkpointing: bool | None = None,
    seed: Seed | None = None,
    wait_seconds: WaitSeconds = 45,
    ctx: Context = None,
) -> dict[str, Any]:
    """Fine-tune a loaded model's LoRA adapter with TRL's SFTTrainer and save it to <output_dir>/final.

    Runs as a background job. If it ends within wait_seconds the answer is final: status 'success', metrics
    (train_loss, train_runtime, ... and eval_loss with eval_dataset) and output_dir, a PEFT adapter folder
    loadable with PeftModel.from_pretrained. Otherwise it answers status 'running' with a job_id: poll
    qloraevolved_training_status(job_id=...) every 30-60 s. Progress notifications (step/total, loss) flow while
    the call waits. Cancelling this call (MCP cancellation or a client timeout) does NOT stop training; only
    qloraevolved_cancel_training does, saving a checkpoint. Trains on the answer part only for prompt/completion,
    Alpaca and chat rows; every example ends with EOS. Unprepared models use the prepare defaults (see warnings).
    """
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

    return await _service(ctx).train(QLORA, model_id, train_dataset, eval_dataset, overrides, wait_seconds, progress)


@agent_tool
async def qloraevolved_training_status(
    model_id: Annotated[str | None, Field(description="Model whose latest training job to show.")] = None,
    job_id: Annotated[str | None, Field(description="Job id returned by qloraevolved_train.")] = None,
    include_plot: Annotated[bool, Field(description="Also return the loss curve (train/eval loss, learning "
                                                    "rate) as a PNG image.")] = False,
    ctx: Context = None,
) -> Annotated[CallToolResult, dict[str, Any]]:
    """State of a training job (queued, running, succeeded, failed, cancelled): step/total, latest and recent
    losses, eval loss, learning rate, samples/s, ETA, last checkpoint, output_dir, error, worker log tail.

    Give model_id (its latest job) or job_id. Cheap: poll every 30-60 s while 'running'.
    """
    service = _service(ctx)
    answer = service.training_status(QLORA, model_id, job_id)
    return _with_plot(answer, service.loss_plot(QLORA, model_id, job_id) if include_plot else None)


@agent_tool
async def qloraevolved_cancel_training(
    model_id: Annotated[str | None, Field(description="Model whose running job to stop.")] = None,
    job_id: Annotated[str | None, Field(description="Job id returned by qloraevolved_train.")] = None,
    ctx: Context = None,
) -> dict[str, Any]:
    """Stop a running training job at the next step boundary; a checkpoint is saved and the job ends
    'cancelled'. Continue it later with qloraevolved_train(resume_from_checkpoint=true)."""
    return _service(ctx).cancel_training(QLORA, model_id, job_id)


@agent_tool
async def qloraevolved_list_jobs(ctx: Context = None) -> dict[str, Any]:
    """Every training job of this family, including those from before a server restart: state, step, loss,
    output_dir and final adapter folder, last checkpoint, error."""
    return _service(ctx).list_jobs(QLORA)


def _with_plot(answer: dict[str, Any], png: bytes | None) -> CallToolResult:
    content: list[Any] = [TextContent(type="text", text=json.dumps(answer, indent=2))]
    if png is not None:
        content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
    return CallToolResult(content=content, structured_content=answer)


@agent_tool
async def qloraevolved_unload_model(model_id: ModelId, ctx: Context = None) -> dict[str, Any]:
    """Unload a model: its worker process ends, so all its CPU and GPU memory is released."""
    return await _service(ctx).unload(QLORA, model_id)


@agent_tool
async def qloraevolved_list_models(ctx: Context = None) -> dict[str, Any]:
    """List the loaded models with their load config, device and state (ready, prepared, busy, lost)."""
    return _service(ctx).list(QLORA)


QLORA_TOOLS = [qloraevolved_load_model, qloraevolved_prepare_for_training, qloraevolved_train,
               qloraevolved_unload_model, qloraevolved_list_models, qloraevolved_training_status,
               qloraevolved_cancel_training, qloraevolved_list_jobs]
