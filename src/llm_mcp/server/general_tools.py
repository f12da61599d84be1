"""Family-neutral tools: estimate_memory (from the model's config alone, before anything is loaded)."""

# No `from __future__ import annotations`, as in common.py.
from typing import Annotated, Any

from pydantic import Field

from llm_mcp import memory
from mcp.server.mcpserver import Context

from llm_mcp.config import (
    MAX_ID_CHARS, BatchSize, ComputeDtype, DatasetFormat, DistributedStrategy, GradAccum, LoadConfig, LoraRank,
    MaxCompletionLength, MaxLength, NumProcesses, Optimizer, QuantType, TrainingConfig, TrainingMethod,
)
from llm_mcp.server.annotations import add_tool
from llm_mcp.server.results import EstimateAnswer, InspectAnswer
from llm_mcp.server.common import DatasetArg, agent_tool, service_of


@agent_tool
async def estimate_memory(
    model_name: Annotated[str, Field(description="Local model folder or hub id; only its config.json is read.")],
    quant_type: Annotated[QuantType, Field(description="How the linear layers' weights are stored, as at load.")] \
    = LoadConfig.quant_type,
    lora_rank: LoraRank = LoadConfig.lora_rank,
    batch_size: BatchSize = TrainingConfig.batch_size,
    max_length: MaxLength = LoadConfig.max_length,
    use_gradient_checkpointing: Annotated[bool, Field(description="Recompute activations in the backward pass: "
                                                                  "far less activation memory, slower steps.")] \
    = TrainingConfig.use_gradient_checkpointing,
    compute_dtype: Annotated[ComputeDtype, Field(description="Dtype of compute and of unquantized weights.")] \
    = LoadConfig.compute_dtype,
    optim: Annotated[Optimizer, Field(description="Optimizer: its state is 8 bytes per trainable value (32-bit "
                                                  "Adam) or 2 (8-bit).")] = TrainingConfig.optim,
    target_modules: Annotated[list[str] | None, Field(description="LoRA targets; default the 7 projections.")]
    = None,
    num_processes: NumProcesses = TrainingConfig.num_processes,
    distributed_strategy: Annotated[DistributedStrategy, Field(description=(
        "How num_processes > 1 holds the model: ddp (auto) keeps a full copy on each device; fsdp shards weights, "
        "adapters, gradients and optimizer state across the devices."))] = TrainingConfig.distributed_strategy,
    method: Annotated[TrainingMethod, Field(description=(
        "The training method: dpo/orpo/kto run two sequences per example (dpo and kto also a frozen reference "
        "adapter); grpo's batch_size counts completions and sampling holds a KV cache."))] = TrainingConfig.method,
    max_completion_length: MaxCompletionLength = TrainingConfig.max_completion_length,
    gradient_accumulation_steps: Annotated[GradAccum, Field(description=(
        "grpo: completions sampled at once are batch_size x this."))] = TrainingConfig.gradient_accumulation_steps,
    ctx: Context = None,
) -> EstimateAnswer:
    """Estimate the memory a LoRA fine-tuning run needs before loading anything: bytes for weights, LoRA
    parameters, gradients, optimizer state, activations and the runtime, the device's free memory, whether it
    fits, and if not the cheapest change that would make it fit. Reads only config.json (no weights). With
    num_processes > 1 the bytes are one device's (one process's); needed_here_bytes adds up the processes that
    share this machine's memory on CPU."""
    shape = memory.read_shape(service_of(ctx).sandbox.model_source("model_name", model_name))
    result = memory.estimate(shape, quant_type=quant_type, compute_dtype=compute_dtype, lora_rank=lora_rank,
                             batch_size=batch_size, max_length=max_length,
                             use_gradient_checkpointing=use_gradient_checkpointing, optim=optim,
                             target_modules=tuple(target_modules) if target_modules else None,
                             num_processes=num_processes,
                             distributed_strategy="fsdp" if distributed_strategy == "fsdp" else "ddp",
                             method=method, max_completion_length=max_completion_length,
                             gradient_accumulation_steps=gradient_accumulation_steps)
    return {"status": "success", **result.to_dict(), "model_shape": shape.__dict__}


@agent_tool
async def inspect_dataset(
    dataset: DatasetArg,
    dataset_format: Annotated[DatasetFormat, Field(description="Row format; 'auto' detects it.")] = "auto",
    model_id: Annotated[str | None, Field(max_length=MAX_ID_CHARS, description=(
        "A loaded model (either family): examples are rendered with its chat template, lengths counted with its "
        "tokenizer and checked against its max_length. Without it, a generic layout and character counts."))]
    = None,
    ctx: Context = None,
) -> InspectAnswer:
    """Check a dataset before training on it: detected format, row and usable-row counts, columns, two examples
    exactly as training sees them (trained part between [[TRAIN]] and [[/TRAIN]]), token length statistics, rows
    max_length would cut, and problems found (empty fields, mixed formats, missing EOS, duplicates; malformed rows
    and chat rows with unknown roles, turns out of order or no assistant turn, each with its line or row number,
    which training refuses unless skip_invalid_rows=true). Without model_id only the start of a large file is read
    (the answer's 'sampled' says how much). Needs no GPU."""
    return await service_of(ctx).inspect_dataset(dataset, dataset_format, model_id)


def register(server: Any) -> None:
    add_tool(server, estimate_memory)
    add_tool(server, inspect_dataset)
