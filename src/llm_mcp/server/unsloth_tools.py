"""The unsloth_* tools (spec: unsloth_integration.md): same pool, jobs and training engine as the qloraevolved
family; the worker loads with Unsloth's FastLanguageModel and attaches LoRA at prepare time. Every answer says
which engine ran ("unsloth", or "transformers" where Unsloth cannot be imported)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field, WithJsonSchema

from llm_mcp.config import (
    MAX_ID_CHARS, MAX_TOKEN_CHARS, ChatTemplate, DeviceMap, MaxLength, UnslothLoadConfig, UnslothTrainingConfig,
    validated,
)
from llm_mcp.errors import InvalidArgument
from llm_mcp.server.annotations import add_tool
from llm_mcp.server.results import TrainAnswer, UnslothLoadAnswer, UnslothPrepareAnswer
from llm_mcp.server.common import DatasetArg, MethodArg, WaitSeconds, agent_tool, service_of, shared_tools, train_description
from llm_mcp.server.service import UNSLOTH

log = logging.getLogger(__name__)

ModelId = Annotated[str, Field(max_length=MAX_ID_CHARS, description="Id returned by unsloth_load_model.")]


@agent_tool
async def unsloth_load_model(
    model_name: Annotated[str, Field(description="Local Hugging Face model folder, a .gguf file (converted once), "
                                                 "a finished adapter folder (<output_dir>/final: its base is loaded "
                                                 "with the adapter on top), or a hub id such as "
                                                 "'unsloth/Llama-3.2-1B' (needs the hub or its cache).")],
    max_seq_length: MaxLength = UnslothLoadConfig.max_seq_length,
    load_in_4bit: Annotated[bool, Field(description="Load weights in 4-bit (bitsandbytes NF4).")]
    = UnslothLoadConfig.load_in_4bit,
    # Typed Any so that a mistyped token is refused by us, never echoed back in a schema validation error.
    token: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string", "maxLength": MAX_TOKEN_CHARS}, {"type": "null"}],
                                          "default": None, "description": "Hugging Face token for gated models; "
                                                                          "never echoed, logged or stored."})] = None,
    device_map: DeviceMap = UnslothLoadConfig.device_map,
    model_id: Annotated[str | None, Field(max_length=MAX_ID_CHARS, description=(
        "Id to give the model; default '<name>-unsloth' (numbered when taken)."))] = None,
    chat_template: ChatTemplate = UnslothLoadConfig.chat_template,
    force: Annotated[bool, Field(description="Load even when the memory estimate says the weights cannot fit.")]
    = False,
    ctx: Context = None,
) -> UnslothLoadAnswer:
    """Load a model with Unsloth's FastLanguageModel in its own worker process (LoRA is attached by
    unsloth_prepare_for_training). Returns model_id, max_seq_length, dtype, device, engine and warnings.
    Next: unsloth_prepare_for_training, then unsloth_train."""
    if token is not None and not (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS):
        raise InvalidArgument("token", "(hidden)", f"a string of 1-{MAX_TOKEN_CHARS} characters, or null")
    config = validated(UnslothLoadConfig, dict(model_name=model_name, max_seq_length=max_seq_length,
                                               load_in_4bit=load_in_4bit, token=token, device_map=device_map,
                                               chat_template=chat_template),
                       where="load_model")
    loaded = await service_of(ctx).load(UNSLOTH, config, model_id, force=force)
    return {
        "status": "success",
        "model_id": loaded.model_id,
        "model_name": model_name,
        "max_seq_length": max_seq_length,
        "dtype": loaded.info["dtype"],
        "device": loaded.device,
        "engine": loaded.info["engine"],
        "attention": loaded.info.get("attention"),
        "chat_template": loaded.info.get("chat_template"),
        "warnings": loaded.info["warnings"],
    }


@agent_tool
async def unsloth_prepare_for_training(
    model_id: ModelId,
    training_config: Annotated[UnslothTrainingConfig | None, Field(
        description="Training settings and LoRA (r, lora_alpha, lora_dropout, target_modules); omitted keys take "
                    "the defaults shown. use_gradient_checkpointing also accepts 'unsloth'.")] = None,
    ctx: Context = None,
) -> UnslothPrepareAnswer:
    """Attach the LoRA adapter (Unsloth's get_peft_model) and set the training configuration.

    Returns trainable_params (LoRA) and total_params. Next: unsloth_train with a dataset."""
    settings = training_config or UnslothTrainingConfig()
    result = await service_of(ctx).prepare(UNSLOTH, model_id, settings)
    return {
        "status": "success",
        "message": f"Model {model_id} prepared for training",
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "config": _asdict(settings),
        "engine": result["engine"],
        "warnings": result["warnings"],
    }


@agent_tool
async def unsloth_train(
    model_id: ModelId,
    train_dataset: DatasetArg,
    eval_dataset: Annotated[DatasetArg | None, Field(description="Optional evaluation data, same forms; eval_loss "
                                                                 "is reported at the end.")] = None,
    training_config: Annotated[dict[str, Any] | None, Field(
        description="Overrides of the prepared settings by name (learning_rate, max_steps, output_dir, ...), plus "
                    "dataset_format, resume_from_checkpoint, overwrite_output_dir, eval_steps, skip_invalid_rows (true: skip "
                    "malformed rows and count them instead of refusing the run).")] = None,
    wait_seconds: WaitSeconds = 45,
    method: MethodArg = None,
    ctx: Context = None,
) -> TrainAnswer:
    """Fine-tune the model's LoRA adapter (TRL's SFTTrainer, or the method's trainer, under Unsloth) and save it to
    <output_dir>/final."""

    async def progress(step: int, total: int, message: str) -> None:
        await ctx.report_progress(step, total, message)

    overrides = {**(training_config or {}), **({"method": method} if method is not None else {})}
    return await service_of(ctx).train(UNSLOTH, model_id, train_dataset, eval_dataset, overrides, wait_seconds,
                                       progress)


unsloth_train.__doc__ += "\n\n" + train_description(UNSLOTH)


@agent_tool
async def unsloth_list_models(ctx: Context = None) -> dict[str, Any]:
    """The loaded unsloth models as {model_id: {config, device}} (plus engine and state)."""
    service = service_of(ctx)
    return {m.model_id: {"config": m.load_config.spec_dict(m.info["dtype"]), "device": m.device,
                         "engine": m.info["engine"], "state": service.model_state(m)}
            for m in service.models(UNSLOTH)}


def _asdict(settings: UnslothTrainingConfig) -> dict[str, Any]:
    from dataclasses import asdict

    values = asdict(settings)
    values["target_modules"] = list(values["target_modules"]) if values["target_modules"] else None
    return values


def register(server: Any) -> None:
    for tool in (unsloth_load_model, unsloth_prepare_for_training, unsloth_train, unsloth_list_models):
        add_tool(server, tool)
    for fn, name, description in shared_tools(UNSLOTH):
        add_tool(server, fn, name=name, description=description)
