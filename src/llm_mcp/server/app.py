"""Build the MCPServer: register the tools and own the worker pool for the server's lifetime."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mcp.server.mcpserver import MCPServer

from llm_mcp import __version__
from llm_mcp.config import RAY_ADDRESS_ENV, ServerConfig
from llm_mcp.jobs import ends
from llm_mcp.jobs.manager import JobManager
from llm_mcp.jobs.store import JobStore
from llm_mcp.server import dashboard, general_tools, prompts, qlora_tools, resources, unsloth_tools
from llm_mcp.server.http_auth import bearer_auth
from llm_mcp.server.sandbox import Sandbox
from llm_mcp.server.service import ModelService
from llm_mcp.server.client_logs import ClientLogs
from llm_mcp.server.tool_errors import LlmMcpServer
from llm_mcp.server.updates import ResourceUpdates
from llm_mcp.workers.pool import WorkerPool

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Fine-tune open LLMs with LoRA/QLoRA. Typical flow: qloraevolved_load_model -> "
    "qloraevolved_prepare_for_training -> qloraevolved_train (progress notifications carry step and loss) -> "
    "qloraevolved_unload_model. A train call answers 'running' with a job_id after wait_seconds; poll "
    "qloraevolved_training_status, stop with qloraevolved_cancel_training, see all runs with "
    "qloraevolved_list_jobs. Datasets are file paths inside the workspace, saved-dataset folders, hub ids, "
    "or inline rows. Responses carry 'warnings' for anything this machine could not do as asked."
)


def _dataset_limits(config: ServerConfig) -> dict[str, str]:
    """The dataset size limits as the environment variables data/ reads, in the server and its workers."""
    limits = {"LLM_MCP_MAX_DATASET_BYTES": config.max_dataset_bytes, "LLM_MCP_MAX_DATASET_ROWS": config.max_dataset_rows}
    return {name: str(value) for name, value in limits.items() if value is not None}


def create_server(config: ServerConfig | None = None, *, token: str | None = None,
                  closed: threading.Event | None = None) -> MCPServer:
    """The server with every tool; with `token`, each HTTP request must carry `Authorization: Bearer <token>`
    (stdio ignores it). The token stays out of ServerConfig so no config repr, log or pickle can carry it.
    `closed` is set once the server has stopped its workers and closed its job store."""
    config = config or ServerConfig()
    workspace = Path(config.workspace).expanduser().resolve()
    state_dir = Path(config.state_dir).expanduser().resolve() if config.state_dir else workspace / ".llm-mcp"

    running: dict[str, ModelService] = {}  # the live service, for resources read without a request context
    updates = ResourceUpdates()  # job resources' subscribers, told as jobs start, step and end
    client_logs = ClientLogs()  # clients that asked for the server's log records (logging/setLevel)

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ModelService]:
        store = JobStore(state_dir / "jobs.sqlite")
        recovered = store.recover_after_restart()
        if recovered:
            log.warning("%d job(s) were running when the server last stopped; their ends recorded", recovered)
        limits = _dataset_limits(config)
        os.environ.update(limits)  # inspect_dataset without a model reads in this process
        pool = WorkerPool(python=config.worker_python, cwd=workspace, log_dir=state_dir / "logs",
                          env={**config.worker_env, ends.STATE_DIR_ENV: str(state_dir), **limits,
                               **({RAY_ADDRESS_ENV: config.ray_address} if config.ray_address else {})},
                          family_python={"unsloth": config.unsloth_python or ""})
        updates.bind(asyncio.get_running_loop())
        client_logs.start(asyncio.get_running_loop())
        jobs = JobManager(store, on_change=updates.job_changed)
        service = ModelService(pool, jobs, Sandbox.create(str(workspace), config.allow_read),
                               allow_remote_code=config.allow_remote_code)
        running["service"] = service
        try:
            yield service
        finally:
            jobs.shutting_down = True
            client_logs.stop()
            try:
                pool.close()  # every worker ends with the server; running jobs stop with a checkpoint
                store.close()
            finally:
                if closed is not None:
                    closed.set()

    auth = bearer_auth(token, config.oauth)  # HTTP only: the static token, OAuth's JWTs, either, or none
    server = LlmMcpServer("llm-mcp-server", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan,
                          subscriptions=updates.bus, extensions=[dashboard.apps()], **auth)
    # MCPServer has no public hook for resources/subscribe or logging/setLevel: the lowlevel server's own
    updates.register(server._lowlevel_server)
    client_logs.register(server._lowlevel_server)
    if "qloraevolved" in config.families:
        qlora_tools.register(server)
    if "unsloth" in config.families:
        unsloth_tools.register(server)
    general_tools.register(server)
    resources.register(server, lambda: running["service"])
    prompts.register(server, "qloraevolved" if "qloraevolved" in config.families else "unsloth")
    return server
