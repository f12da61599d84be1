"""Read-only views as MCP resources, for clients that show or attach them: the jobs (a list, each job's status
record, its worker log tail, its loss curve) and the loaded models. The same data as the status and list tools,
under stable URIs."""

import json
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from llm_mcp.errors import InvalidArgument, LlmMcpError
from llm_mcp.jobs.manager import log_tail
from llm_mcp.server.service import ModelService

JOBS = "llm-mcp://jobs"
MODELS = "llm-mcp://models"
RECENT_JOBS = 50
FAMILIES = ("qloraevolved", "unsloth")


def _job(service: ModelService, job_id: str) -> Any:
    try:
        return service.jobs.reconciled(service.jobs.store.get(job_id))
    except (KeyError, LlmMcpError):
        raise ResourceNotFoundError(str(InvalidArgument("job_id", job_id, f"a job listed in {JOBS}"))) from None


def register(server: Any, service_now: Callable[[], ModelService]) -> None:
    """service_now gives the running server's ModelService (static resources get no request context)."""

    @server.resource(JOBS, name="jobs", title="Training jobs", mime_type="application/json",
                     description=f"The {RECENT_JOBS} most recent training jobs of both families, newest first: "
                                 "job_id, model, state, step/total, loss, and each job's own resource URIs.")
    def jobs() -> str:
        service = service_now()
        records = sorted(service.jobs.store.list(None), key=lambda r: r.created_at or 0, reverse=True)
        out = [{"job_id": r.job_id, "family": r.family, "model_id": r.model_id, "state": r.state, "step": r.step,
                "total_steps": r.total_steps, "loss": r.loss, "uri": f"{JOBS}/{r.job_id}",
                "log_uri": f"{JOBS}/{r.job_id}/log", "loss_curve_uri": f"{JOBS}/{r.job_id}/loss.png"}
               for r in map(service.jobs.reconciled, records[:RECENT_JOBS])]
        return json.dumps({"jobs": out}, indent=1)

    @server.resource(JOBS + "/{job_id}", name="job", title="A training job's status", mime_type="application/json",
                     description="What *_training_status answers for this job, as JSON.")
    def job(job_id: str, ctx: Context) -> str:
        service = ctx.request_context.lifespan_context
        return json.dumps(service.jobs.status(_job(service, job_id)), indent=1, default=str)

    @server.resource(JOBS + "/{job_id}/log", name="job-log", title="A training job's worker log",
                     mime_type="text/plain", description="The last lines of the model worker's log for this job.")
    def job_log(job_id: str, ctx: Context) -> str:
        return "\n".join(log_tail(_job(ctx.request_context.lifespan_context, job_id).log_path))

    @server.resource(JOBS + "/{job_id}/loss.png", name="job-loss-curve", title="A training job's loss curve",
                     mime_type="image/png", description="The job's training (and eval) loss by step, as a PNG.")
    def job_loss(job_id: str, ctx: Context) -> bytes:
        service = ctx.request_context.lifespan_context
        return service.loss_plot_of(_job(service, job_id))

    @server.resource(MODELS, name="models", title="Loaded models", mime_type="application/json",
                     description="Every loaded model of both families: family, model name, device and state.")
    def models() -> str:
        service = service_now()
        out = {}
        for family in FAMILIES:
            for loaded in service.pool.models(family):
                out[loaded.model_id] = {"family": family, "model_name": loaded.load_config.model_name,
                                        "device": loaded.device, "state": service.model_state(loaded)}
        return json.dumps({"models": out}, indent=1)
