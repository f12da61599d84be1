"""Build the MCPServer: register the tools and own the worker pool for the server's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mcp.server.mcpserver import MCPServer

from llm_mcp import __version__
from llm_mcp.config import ServerConfig
from llm_mcp.jobs.manager import JobManager
from llm_mcp.jobs.store import JobStore
from llm_mcp.server import general_tools, qlora_tools, unsloth_tools
from llm_mcp.server.http_auth import StaticTokenVerifier, auth_settings
from llm_mcp.server.sandbox import Sandbox
from llm_mcp.server.service import ModelService
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


def create_server(config: ServerConfig | None = None, *, token: str | None = None) -> MCPServer:
    """The server with every tool; with `token`, each HTTP request must carry `Authorization: Bearer <token>`
    (stdio ignores it). The token stays out of ServerConfig so no config repr, log or pickle can carry it."""
    config = config or ServerConfig()
    workspace = Path(config.workspace).expanduser().resolve()
    state_dir = Path(config.state_dir).expanduser().resolve() if config.state_dir else workspace / ".llm-mcp"

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ModelService]:
        store = JobStore(state_dir / "jobs.sqlite")
        recovered = store.recover_after_restart()
        if recovered:
            log.warning("%d job(s) were running when the server last stopped; marked failed", recovered)
        pool = WorkerPool(python=config.worker_python, cwd=workspace, log_dir=state_dir / "logs",
                          env=dict(config.worker_env), family_python={"unsloth": config.unsloth_python or ""})
        try:
            yield ModelService(pool, JobManager(store), Sandbox.create(str(workspace), config.allow_read),
                               allow_remote_code=config.allow_remote_code)
        finally:
            pool.close()  # every worker ends with the server; running jobs stop with a checkpoint
            store.close()

    auth = {"token_verifier": StaticTokenVerifier(token), "auth": auth_settings()} if token else {}
    server = MCPServer("llm-mcp-server", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan, **auth)
    qlora_tools.register(server)
    unsloth_tools.register(server)
    general_tools.register(server)
    return server
