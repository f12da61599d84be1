"""`llm-mcp serve --transport streamable-http` as a subprocess: bearer token, Host checks, the non-loopback refusal.

Only ever connects to 127.0.0.1; every wait is bounded and the server is killed in a finally.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import env_without_token, free_port, serve_http_command, serving_http, wait_for

TOKEN = "s3cret"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test-http", "version": "0"}}}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory):
    """A live token-protected HTTP server; yields (url, workspace, log): log holds its stdout and stderr."""
    workspace = tmp_path_factory.mktemp("http-workspace")
    log = tmp_path_factory.mktemp("http-log") / "server.log"
    with serving_http("--token", TOKEN, "--workspace", str(workspace), "--log-level", "DEBUG", log=log) as server:
        yield server.url, workspace, log


def _post_initialize(url: str, headers: dict[str, str]) -> httpx2.Response:
    return httpx2.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers}, timeout=10)


def test_http_requests_without_the_right_token_get_401(http_server):
    """No Authorization header, a wrong token, or a non-Bearer scheme: 401 with WWW-Authenticate, token not echoed."""
    url, _, _ = http_server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
        answer = _post_initialize(url, headers)
        assert answer.status_code == 401, (headers, answer.status_code, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in answer.text


def test_http_client_with_token_lists_tools_and_calls_list_models(http_server):
    """The SDK client over streamable HTTP, sending the bearer token, lists the tools and calls list_models."""
    url, _, _ = http_server

    async def session() -> tuple[set[str], object]:
        async with (create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
                    Client(streamable_http_client(url, http_client=http)) as client):
            tools = {t.name for t in (await client.list_tools()).tools}
            return tools, await client.call_tool("qloraevolved_list_models", {})

    tools, result = asyncio.run(asyncio.wait_for(session(), 20))
    assert {"qloraevolved_load_model", "qloraevolved_train", "qloraevolved_list_models"} <= tools
    assert not result.is_error and result.structured_content == {"status": "success", "models": {}}


def test_http_streams_are_resumable(http_server):
    """An SSE answer (protocol 2025-11-25 on) opens with a priming event (an id, no data) and says when to
    reconnect (`retry`), so a client that loses the stream reconnects with Last-Event-ID (the server keeps the
    events: server/event_store.py)."""
    from llm_mcp.server.event_store import RETRY_MS

    url, _, _ = http_server
    newer = {**INITIALIZE, "params": {**INITIALIZE["params"], "protocolVersion": "2025-11-25"}}  # primes streams
    answer = httpx2.post(url, json=newer, headers={**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    assert f"retry: {RETRY_MS}" in answer.text and "\nid: " in "\n" + answer.text, answer.text[:300]


def test_event_store_replays_what_a_stream_missed_within_its_bounds():
    import anyio

    from llm_mcp.server.event_store import BoundedEventStore

    async def run() -> tuple[list[str], list[str], object]:
        store = BoundedEventStore(per_stream=3, streams=2)
        ids = [await store.store_event("a", None)]  # the priming event
        for n in range(4):
            ids.append(await store.store_event("a", {"jsonrpc": "2.0", "method": f"m{n}"}))
        await store.store_event("b", {"jsonrpc": "2.0", "method": "other"})
        seen: list[str] = []

        async def send(event) -> None:
            seen.append(event.message["method"])

        stream = await store.replay_events_after(ids[2], send)  # after m1: m2, m3 (m0 fell out of the bound)
        await store.store_event("c", None)  # a third stream: the least recently written ("a") is forgotten
        gone = await store.replay_events_after(ids[3], send)
        return seen, [stream], gone

    seen, streams, gone = anyio.run(run)
    assert seen == ["m2", "m3"] and streams == ["a"] and gone is None


def test_http_bad_host_header_is_rejected_even_with_the_token(http_server):
    """DNS-rebinding protection stays on: a foreign Host (or Origin) is refused although the token is right."""
    url, _, _ = http_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _post_initialize(url, auth).status_code == 200  # the same request with a good Host passes
    bad_host = _post_initialize(url, {**auth, "Host": "evil.example:80"})
    assert bad_host.status_code == 421, bad_host.text
    bad_origin = _post_initialize(url, {**auth, "Origin": "http://evil.example"})
    assert bad_origin.status_code == 403, bad_origin.text


def test_http_token_is_not_logged_or_written(http_server):
    """After refused and accepted requests, the token appears neither in the server's output nor in the workspace."""
    url, workspace, log = http_server
    logged = log.read_text().count("POST /mcp")
    assert _post_initialize(url, {"Authorization": "Bearer wrong"}).status_code == 401
    assert _post_initialize(url, {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # the server logs both requests (so the absence below means something); the lines reach the file soon after
    output = wait_for(lambda: (text := log.read_text()).count("POST /mcp") >= logged + 2 and text,
                      "the access log lines of both requests", 30)
    assert TOKEN not in output
    for path in Path(workspace).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_http_refuses_non_loopback_host_without_token(host, tmp_path):
    """A non-loopback --host without a token exits 2 before binding, naming --token and LLM_MCP_TOKEN."""
    port = free_port()
    done = subprocess.run(serve_http_command("--host", host, "--port", str(port), "--workspace", str(tmp_path)),
                          capture_output=True, text=True, timeout=60, env=env_without_token(),
                          stdin=subprocess.DEVNULL, check=False)  # a server that bound would never exit: timeout
    assert done.returncode == 2, done.stderr
    assert "--token" in done.stderr and "LLM_MCP_TOKEN" in done.stderr
    assert not (tmp_path / ".llm-mcp").exists()  # refused before the server (and its state) was created


def _fake_serve(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict:
    """Run `llm-mcp <argv>` with create_server faked: returns what it was given and how it was run (nothing binds)."""
    from llm_mcp import cli

    seen: dict = {}

    def fake_create_server(config, *, token=None, closed=None):
        seen.update(config=config, token=token)

        class _Server:
            async def run_stdio_async(self) -> None:
                seen.update(run_args=("stdio",))

            def streamable_http_app(self, **kwargs):
                from starlette.applications import Starlette

                seen.update(run_args=("streamable-http",), run_kwargs=kwargs)
                return Starlette()

        return _Server()

    async def no_serve(self, *args, **kwargs) -> None:  # nothing binds a port
        seen.update(uvicorn_host=self.config.host, uvicorn_port=self.config.port)

    monkeypatch.setattr("llm_mcp.server.app.create_server", fake_create_server)
    monkeypatch.setattr("uvicorn.Server.serve", no_serve)
    assert cli.main(argv) == 0
    return seen


def test_cli_plumbs_allow_read_and_remote_code(tmp_path, monkeypatch):
    """--allow-read becomes absolute resolved paths in ServerConfig, --allow-remote-code sets the flag, and stdio
    drops the token (the token never reaches ServerConfig)."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    again = str(tmp_path / "data" / ".." / "data")
    seen = _fake_serve(monkeypatch, ["serve", "--allow-read", "data", "--allow-read", again, "--allow-remote-code",
                                     "--token", TOKEN, "--workspace", str(tmp_path)])
    config = seen["config"]
    assert config.allow_read == (str((tmp_path / "data").resolve()),) * 2
    assert config.allow_remote_code is True and seen["token"] is None and seen["run_args"] == ("stdio",)
    assert TOKEN not in repr(config)


def test_cli_non_loopback_host_with_token_keeps_host_checks_on(tmp_path, monkeypatch):
    """With a token (here from LLM_MCP_TOKEN) a non-loopback host may serve, and Host/Origin checks allow only it."""
    monkeypatch.setenv("LLM_MCP_TOKEN", TOKEN)
    seen = _fake_serve(monkeypatch, ["serve", "--transport", "streamable-http", "--host", "192.0.2.1", "--port", "9123",
                                     "--workspace", str(tmp_path)])
    security = seen["run_kwargs"]["transport_security"]
    assert seen["token"] == TOKEN and seen["run_kwargs"]["host"] == "192.0.2.1"
    assert (seen["uvicorn_host"], seen["uvicorn_port"]) == ("192.0.2.1", 9123)
    assert security.enable_dns_rebinding_protection and security.allowed_hosts == ["192.0.2.1:9123"]
    assert "http://192.0.2.1:9123" in security.allowed_origins


def test_cli_refuses_missing_allow_read_folder(tmp_path):
    """A mistyped --allow-read folder is refused up front instead of silently allowing nothing."""
    from llm_mcp import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--allow-read", str(tmp_path / "nope"), "--workspace", str(tmp_path)])
    assert exc.value.code == 2
