"""What both tool families share at the MCP layer: error translation, typed arguments, and the tools whose
shape is the same in both (unload, training status, cancel, list jobs), built once per family."""

# No `from __future__ import annotations`: the per-family tools below annotate with closure values, which the
# SDK must see evaluated.
import base64
import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from llm_mcp.config import (
    MAX_ID_CHARS, BatchSize, ChatMessage, DatasetFormat, ExportConfig, ExportFormat, GenerationConfig,
    GgufQuantization,
    MaxNewTokens, Seed, Temperature, TopP, TrainingMethod, validated,
)
from llm_mcp.errors import InvalidArgument, LlmMcpError
from llm_mcp.server import tool_errors
from llm_mcp.server.results import (CancelAnswer, EvaluateAnswer, ExportAnswer, GenerateAnswer, ListJobsAnswer,
                                    MessageAnswer, StatusAnswer)
from llm_mcp.server.service import Family, ModelService

log = logging.getLogger(__name__)

DatasetArg = Annotated[
    str | list[dict[str, Any]],
    Field(description=(
        "A .jsonl/.json/.csv/.parquet/.txt file path, a datasets.save_to_disk folder (relative paths start at the "
        "server's workspace), a hub id ('name' or 'name:split'), or inline rows. Row formats: {text}; "
        "{instruction, input, output}; {prompt, completion}; {messages: [{role, content}]}; for the other methods "
        "{prompt, chosen, rejected} (dpo, orpo), {prompt, completion, label} (kto), {prompt or messages, answer} "
        "(grpo)."
    )),
]
MethodArg = Annotated[TrainingMethod | None, Field(description=(
    "What is trained (also accepted in training_config): 'sft' (supervised, on answers; the default); 'dpo' or "
    "'orpo' (preference pairs {prompt, chosen, rejected}); 'kto' ({prompt, completion, label: true|false}); "
    "'grpo' (prompts with an answer; the model samples num_generations completions, scored by the rewards "
    "declared in training_config). Method settings by TRL's names in training_config."))]
WaitSeconds = Annotated[float, Field(ge=-1, le=86400, description=(
    "Seconds to wait for the run to finish before answering 'running' with a job_id (training goes on); "
    "-1 waits until the end. Most clients drop calls after ~60 s, so keep it below that."))]


def agent_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into tool errors whose text reaches the agent; report unexpected ones with their message."""

    known = set(inspect.signature(fn).parameters) - {"ctx"}

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _refuse_unknown_arguments(kwargs.get("ctx"), known)
            return await fn(*args, **kwargs)
        except LlmMcpError as exc:
            return tool_errors.from_error(exc)
        except Exception as exc:
            log.exception("tool %s failed unexpectedly", fn.__name__)
            return tool_errors.error_result("InternalError", f"internal error in {fn.__name__}: "
                                                             f"{type(exc).__name__}: {exc}")

    return wrapper


def _refuse_unknown_arguments(ctx: Any, known: set[str]) -> None:
    """The SDK drops arguments a tool does not declare; a misspelt one must not pass silently."""
    params = getattr(ctx, "_input_params", None)
    unknown = sorted(set(getattr(params, "arguments", None) or {}) - known)
    if unknown:
        raise InvalidArgument(unknown[0], "an unknown argument", f"one of the tool's arguments: {sorted(known)}")


def service_of(ctx: Context) -> ModelService:
    return ctx.request_context.lifespan_context


def train_description(family: Family) -> str:
    return (
        f"Runs as a background job. If it ends within wait_seconds the answer is final: status 'success', metrics "
        f"(train_loss, train_runtime, ... and eval_loss with eval_dataset) and output_dir (<output_dir>/final), a "
        f"PEFT adapter folder loadable with PeftModel.from_pretrained. Otherwise it answers status 'running' with a "
        f"job_id: poll {family.tool('training_status')}(job_id=...) every 30-60 s. Progress notifications "
        f"(step/total, loss) flow while the call waits. Cancelling this call (MCP cancellation or a client "
        f"timeout) does NOT stop training; only {family.tool('cancel_training')} does, saving a checkpoint. "
        f"Trains on the answer part only for prompt/completion, Alpaca and chat rows; every example ends with EOS. "
        f"An unprepared model is prepared with the defaults first (see warnings)."
    )


def shared_tools(family: Family) -> list[tuple[Callable[..., Any], str, str]]:
    """(function, tool name, description) for the tools whose shape both families share."""
    load_tool = family.tool("load_model")
    JobId = Annotated[str | None, Field(max_length=MAX_ID_CHARS,
                                        description=f"Job id returned by {family.tool('train')}.")]

    @agent_tool
    async def unload_model(
        model_id: Annotated[str, Field(max_length=MAX_ID_CHARS, description=f"Id returned by {load_tool}.")],
        ctx: Context = None,
    ) -> MessageAnswer:
        return await service_of(ctx).unload(family, model_id)

    @agent_tool
    async def training_status(
        model_id: Annotated[str | None, Field(max_length=MAX_ID_CHARS,
                                              description="Model whose latest training job to show.")] = None,
        job_id: JobId = None,
        include_plot: Annotated[bool, Field(description="Also return the loss curve (train/eval loss, learning "
                                                        "rate) as a PNG image.")] = False,
        ctx: Context = None,
    ) -> Annotated[CallToolResult, StatusAnswer]:
        service = service_of(ctx)
        answer = service.training_status(family, model_id, job_id)
        content: list[Any] = [TextContent(type="text", text=json.dumps(answer, indent=2))]
        if include_plot:
            png = service.loss_plot(family, model_id, job_id)
            content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
        return CallToolResult(content=content, structured_content=answer)

    @agent_tool
    async def cancel_training(
        model_id: Annotated[str | None, Field(max_length=MAX_ID_CHARS,
                                              description="Model whose running job to stop.")] = None,
        job_id: JobId = None,
        ctx: Context = None,
    ) -> CancelAnswer:
        return service_of(ctx).cancel_training(family, model_id, job_id)

    @agent_tool
    async def list_jobs(ctx: Context = None) -> ListJobsAnswer:
        return service_of(ctx).list_jobs(family)

    @agent_tool
    async def generate(
        model_id: Annotated[str, Field(max_length=MAX_ID_CHARS, description=f"Id returned by {load_tool}.")],
        prompt: Annotated[str | None, Field(description="Raw text to continue (no chat template). Give this or "
                                                        "messages.")] = None,
        messages: Annotated[list[ChatMessage] | None, Field(description="A chat, rendered with the model's chat "
                                                                        "template plus the assistant prompt.")] = None,
        max_new_tokens: MaxNewTokens = GenerationConfig.max_new_tokens,
        temperature: Temperature = GenerationConfig.temperature,
        top_p: TopP = GenerationConfig.top_p,
        use_adapter: Annotated[bool, Field(description="false answers with the base model alone (LoRA off), to "
                                                       "compare before and after training.")] = True,
        seed: Seed = GenerationConfig.seed,
        ctx: Context = None,
    ) -> GenerateAnswer:
        config = validated(GenerationConfig, dict(
            prompt=prompt, messages=None if messages is None else tuple(messages), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, use_adapter=use_adapter, seed=seed), where="generate")
        return await service_of(ctx).generate(family, model_id, config)

    @agent_tool
    async def evaluate(
        model_id: Annotated[str, Field(max_length=MAX_ID_CHARS, description=f"Id returned by {load_tool}.")],
        eval_dataset: DatasetArg,
        dataset_format: Annotated[DatasetFormat, Field(description="Row format; 'auto' detects it.")] = "auto",
        batch_size: BatchSize = 4,
        use_adapter: Annotated[bool, Field(description="false: evaluate the base model without the adapter, for "
                                                       "before/after comparisons.")] = True,
        ctx: Context = None,
    ) -> EvaluateAnswer:
        return await service_of(ctx).evaluate(family, model_id, eval_dataset, dataset_format, batch_size,
                                              use_adapter=use_adapter)

    @agent_tool
    async def export(
        model_id: Annotated[str, Field(max_length=MAX_ID_CHARS, description=f"Id returned by {load_tool}, trained with "
                                                   f"{family.tool('train')}.")],
        format: Annotated[ExportFormat, Field(description=(
            "adapter = PEFT LoRA folder; merged_16bit = base weights dequantized and LoRA merged, a plain "
            "transformers/vLLM folder; gguf = the merged model as GGUF for llama.cpp/Ollama, with a Modelfile "
            "(also keeps adapter/ and merged/ beside it)."))] = ExportConfig.format,
        output_dir: Annotated[str, Field(description="Folder to write (relative to the workspace); must be new or "
                                                     "empty unless overwrite=true.")] = ExportConfig.output_dir,
        gguf_quantization: Annotated[GgufQuantization, Field(description=(
            "gguf only: f16, q8_0 (same answers as the merged model), or the k-quants q4_k_m, q5_k_m, q6_k "
            "(smaller; can lose what was learned, the answer reports the measured agreement; they need the "
            "[gguf] extra, llama-cpp-python)."))]
        = ExportConfig.gguf_quantization,
        save_dtype: Annotated[Literal["float16", "bfloat16"], Field(description="Dtype of merged weights.")]
        = ExportConfig.save_dtype,
        verify: Annotated[bool, Field(description="Load the export back and compare its greedy answer with the "
                                                  "adapter model's.")] = ExportConfig.verify,
        overwrite: Annotated[bool, Field(description="Replace an earlier export in output_dir (other files are "
                                                     "never deleted).")] = ExportConfig.overwrite,
        probe_prompt: Annotated[str | None, Field(max_length=10_000, description=(
            "Prompt for the verification's greedy comparison; default a short chat."))] = None,
        ctx: Context = None,
    ) -> ExportAnswer:
        config = validated(ExportConfig, dict(format=format, output_dir=output_dir,
                                              gguf_quantization=gguf_quantization, save_dtype=save_dtype,
                                              verify=verify, overwrite=overwrite), where="export")
        return await service_of(ctx).export(family, model_id, config, probe_prompt)

    return [
        (unload_model, family.tool("unload_model"),
         "Unload a model: its worker process ends, so all its CPU and GPU memory is released. Refused while it "
         f"trains (call {family.tool('cancel_training')} first)."),
        (training_status, family.tool("training_status"),
         "State of a training job (queued, running, succeeded, failed, cancelled): step/total, latest and recent "
         "losses, eval loss, learning rate, samples/s, ETA, last checkpoint, output_dir, error, worker log tail. "
         "Give model_id (its latest job) or job_id. Cheap: poll every 30-60 s while 'running'."),
        (cancel_training, family.tool("cancel_training"),
         "Stop a running training job at the next step boundary; a checkpoint is saved and the job ends "
         f"'cancelled'. Continue it later with {family.tool('train')}(resume_from_checkpoint=true)."),
        (generate, family.tool("generate"),
         "Generate text with a loaded model: a raw prompt, or chat messages rendered with its chat template. Stops "
         "at EOS (finish_reason 'eos') or after max_new_tokens ('length'). temperature=0 is greedy. "
         "use_adapter=false answers with the base model, to compare before/after training."),
        (evaluate, family.tool("evaluate"),
         "Eval loss and perplexity of the loaded model (with its adapter) on a dataset, computed as training "
         "computes eval_loss (answer tokens only for prompt/completion and chat rows)."),
        (export, family.tool("export"),
         "Export the trained model: 'adapter' (PEFT folder), 'merged_16bit' (LoRA merged into the dequantized "
         "base, safetensors that plain transformers loads, EOS and generation config kept), or 'gguf' (f16/q8_0/"
         "q4_k_m for llama.cpp, plus an Ollama Modelfile with the chat template and stop tokens). Each export is "
         "loaded back to verify it. Merging runs module by module on the CPU."),
        (list_jobs, family.tool("list_jobs"),
         "Every training job of this family, including those from before a server restart: state, step, loss, "
         "output_dir and final adapter folder, last checkpoint, error."),
    ]
