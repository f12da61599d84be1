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
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from llm_mcp.errors import LlmMcpError
from llm_mcp.server.service import Family, ModelService

log = logging.getLogger(__name__)

DatasetArg = Annotated[
    str | list[dict[str, Any]],
    Field(description=(
        "A .jsonl/.json/.csv/.parquet/.txt file path, a datasets.save_to_disk folder (relative paths start at the "
        "server's workspace), a hub id ('name' or 'name:split'), or inline rows. Row formats: {text}; "
        "{instruction, input, output}; {prompt, completion}; {messages: [{role, content}]}."
    )),
]
WaitSeconds = Annotated[float, Field(ge=-1, le=86400, description=(
    "Seconds to wait for the run to finish before answering 'running' with a job_id (training goes on); "
    "-1 waits until the end. Most clients drop calls after ~60 s, so keep it below that."))]


def agent_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into tool errors whose text reaches the agent; report unexpected ones with their message."""

    known = set(inspect.signature(fn).parameters) - {"ctx"}

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _refuse_unknown_arguments(kwargs.get("ctx"), known)
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


def _refuse_unknown_arguments(ctx: Any, known: set[str]) -> None:
    """The SDK drops arguments a tool does not declare; a misspelt one must not pass silently."""
    params = getattr(ctx, "_input_params", None)
    unknown = sorted(set(getattr(params, "arguments", None) or {}) - known)
    if unknown:
        raise ToolError(f"unknown argument(s) {unknown}; accepted: {sorted(known)}.")


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

    @agent_tool
    async def unload_model(
        model_id: Annotated[str, Field(description=f"Id returned by {load_tool}.")],
        ctx: Context = None,
    ) -> dict[str, Any]:
        return await service_of(ctx).unload(family, model_id)

    @agent_tool
    async def training_status(
        model_id: Annotated[str | None, Field(description="Model whose latest training job to show.")] = None,
        job_id: Annotated[str | None, Field(description=f"Job id returned by {family.tool('train')}.")] = None,
        include_plot: Annotated[bool, Field(description="Also return the loss curve (train/eval loss, learning "
                                                        "rate) as a PNG image.")] = False,
        ctx: Context = None,
    ) -> Annotated[CallToolResult, dict[str, Any]]:
        service = service_of(ctx)
        answer = service.training_status(family, model_id, job_id)
        content: list[Any] = [TextContent(type="text", text=json.dumps(answer, indent=2))]
        if include_plot:
            png = service.loss_plot(family, model_id, job_id)
            content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
        return CallToolResult(content=content, structured_content=answer)

    @agent_tool
    async def cancel_training(
        model_id: Annotated[str | None, Field(description="Model whose running job to stop.")] = None,
        job_id: Annotated[str | None, Field(description=f"Job id returned by {family.tool('train')}.")] = None,
        ctx: Context = None,
    ) -> dict[str, Any]:
        return service_of(ctx).cancel_training(family, model_id, job_id)

    @agent_tool
    async def list_jobs(ctx: Context = None) -> dict[str, Any]:
        return service_of(ctx).list_jobs(family)

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
        (list_jobs, family.tool("list_jobs"),
         "Every training job of this family, including those from before a server restart: state, step, loss, "
         "output_dir and final adapter folder, last checkpoint, error."),
    ]
