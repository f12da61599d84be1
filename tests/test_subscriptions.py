"""Resource updates through the MCP SDK's client: a subscriber to a job's resource hears of its steps, and a
subscriber to the jobs list hears of its end, on a 2026-07-28 client (subscriptions/listen) and on a 2025-11-25
client (resources/subscribe) alike, in memory, over stdio and over streamable HTTP."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.subscriptions import ResourceUpdated

from conftest import FAST_LOAD, FAST_TRAIN, server_config
from llm_mcp.server.app import create_server

JOBS = "llm-mcp://jobs"
LONG_RUN = {**FAST_TRAIN, "max_steps": 400, "logging_steps": 1}
EXE = Path(sys.executable).with_name("llm-mcp")
TRANSPORTS = ("memory", "stdio", "http")


def _server(transport: str, workspace: Path, tiny_model: Path, http_server) -> object:
    """What the client connects to: the server in this process, `llm-mcp serve` over stdio, or over HTTP."""
    if transport == "memory":
        return create_server(server_config(workspace, tiny_model))
    args = ["--workspace", str(workspace), "--allow-read", str(tiny_model.parent)]
    if transport == "stdio":
        return StdioServerParameters(command=str(EXE), args=["serve", *args])
    return http_server(*args).url


async def _start(client: Client, tiny_model, demo_rows, output_dir: str) -> str:
    await client.call_tool("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "sub",
                                                       **FAST_LOAD})
    started = await client.call_tool("qloraevolved_train", {
        "model_id": "sub", "train_dataset": demo_rows, "wait_seconds": 0,
        "training_config": {**LONG_RUN, "output_dir": output_dir}})
    assert not started.is_error, started.content
    return started.structured_content["job_id"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_listen_stream_hears_a_jobs_steps_and_its_end(transport, workspace, tiny_model, demo_rows, http_server):
    heard: list[str] = []
    target = _server(transport, workspace, tiny_model, http_server)

    async def scenario() -> None:
        async with Client(target) as client:
            job = await _start(client, tiny_model, demo_rows, f"sub-listen-{transport}")
            async with client.listen(resource_subscriptions=[f"{JOBS}/{job}", JOBS]) as events:
                with anyio.fail_after(300):
                    async for event in events:
                        assert isinstance(event, ResourceUpdated)
                        heard.append(event.uri)
                        if event.uri == f"{JOBS}/{job}" and heard.count(event.uri) == 2:
                            await client.call_tool("qloraevolved_cancel_training", {"job_id": job})
                        if event.uri == JOBS:
                            break
            status = await client.call_tool("qloraevolved_training_status", {"job_id": job})
            assert status.structured_content["state"] == "cancelled"
            await client.call_tool("qloraevolved_unload_model", {"model_id": "sub"})

    anyio.run(scenario)
    assert heard.count(f"{JOBS}/{heard[0].rsplit('/', 1)[-1]}") >= 2 and heard[-1] == JOBS, heard


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resources_subscribe_hears_a_jobs_steps_and_its_end_on_an_older_client(transport, workspace, tiny_model,
                                                                                 demo_rows, http_server):
    heard: list[str] = []
    arrived = anyio.Event
    target = _server(transport, workspace, tiny_model, http_server)

    async def scenario() -> None:
        news = arrived()

        async def on_message(message) -> None:
            params = getattr(getattr(message, "params", None), "uri", None)
            if getattr(message, "method", "") == "notifications/resources/updated" and params is not None:
                heard.append(str(params))
                news.set()

        async with Client(target, mode="legacy", message_handler=on_message) as client:
            job = await _start(client, tiny_model, demo_rows, f"sub-legacy-{transport}")
            await client.subscribe_resource(f"{JOBS}/{job}")
            await client.subscribe_resource(JOBS)
            with anyio.fail_after(300):
                while heard.count(f"{JOBS}/{job}") < 2:
                    await news.wait()
                    news = arrived()
                await client.call_tool("qloraevolved_cancel_training", {"job_id": job})
                while JOBS not in heard:
                    await news.wait()
                    news = arrived()
            await client.unsubscribe_resource(f"{JOBS}/{job}")
            await client.call_tool("qloraevolved_unload_model", {"model_id": "sub"})

    anyio.run(scenario)
    assert heard[-1] == JOBS and len(heard) >= 3, heard


def test_a_client_that_sets_a_log_level_hears_the_servers_log(workspace, tiny_model, demo_rows):
    """logging/setLevel (the logging capability of handshake-era clients): jobs starting and ending reach the
    client as notifications/message at info level; nothing below the level asked for."""
    heard: list[tuple[str, str]] = []

    async def scenario() -> None:
        async def on_log(params) -> None:
            heard.append((params.level, str(params.data.get("message", ""))))

        async with Client(create_server(server_config(workspace, tiny_model)), mode="legacy",
                          logging_callback=on_log) as client:
            await client.set_logging_level("info")
            await client.call_tool("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "logs",
                                                               **FAST_LOAD})
            trained = await client.call_tool("qloraevolved_train", {
                "model_id": "logs", "train_dataset": demo_rows, "wait_seconds": -1,
                "training_config": {**FAST_TRAIN, "max_steps": 2, "output_dir": "logs-run"}})
            job = trained.structured_content["job_id"]
            with anyio.fail_after(60):
                while not any(f"job {job} ended" in m for _, m in heard):
                    await anyio.sleep(0.05)
            await client.call_tool("qloraevolved_unload_model", {"model_id": "logs"})
            assert any(f"job {job} started" in m and level == "info" for level, m in heard), heard

    anyio.run(scenario)
