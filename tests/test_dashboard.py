"""The live training dashboard (MCP Apps, `ui://llm-mcp/training.html`): bound to *_train and *_training_status by
`_meta.ui.resourceUri`, served as `text/html;profile=mcp-app`, self-contained; tools and answers otherwise the same
for clients without Apps; and, in a real headless Chromium, the app rendered by a test host page (tests/
apps_host.html, the host side of the ext-apps postMessage bridge, relaying the app's tools/call through this test's
MCP client to a live `llm-mcp serve --transport streamable-http`) shows a training job's curve growing, and its
Cancel button (pressed from the keyboard) cancels the job.

The browser test needs Playwright (`pip install playwright`) and a Chromium (Debian: `apt-get install chromium`;
or LLM_MCP_CHROMIUM=/path/to/chrome); without them it skips, unless LLM_MCP_REQUIRE_BROWSER=1 (CI), then fails.
LLM_MCP_SAVE_SCREENSHOT=1 also writes the screenshot to docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.extension import advertise
from mcp.client.streamable_http import streamable_http_client
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import FAST_LOAD, FAST_TRAIN, ROOT, McpSession, serving_http, text_of, wait_for
from llm_mcp.config import ServerConfig
from llm_mcp.jobs.store import TERMINAL
from llm_mcp.server import annotations, dashboard
from llm_mcp.server.app import create_server

TOKEN = "dash-token"
HOST_PAGE = ROOT / "tests" / "apps_host.html"
BOUND = {f"{family}_{base}" for family in ("qloraevolved", "unsloth") for base in ("train", "training_status")}
# A slow learning rate so the loss falls over many steps (the curve visibly moves), one loss point per step, and a
# checkpoint every 20 steps; far more steps than the test waits for (it cancels the run).
LIVE_TRAIN = {**FAST_TRAIN, "learning_rate": 4e-4, "logging_steps": 1, "max_steps": 600, "save_steps": 20}
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def dumped(model: Any) -> dict[str, Any]:
    """An MCP result or tool as its JSON wire form (what a host hands an app)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


class HttpSession(McpSession):
    """An MCP client over streamable HTTP with the bearer token that, as an Apps host's client does, advertises the
    `io.modelcontextprotocol/ui` extension with the app MIME type (apps=True), or does not."""

    def __init__(self, url: str, apps: bool) -> None:
        super().__init__(url)
        self._apps = apps

    async def _hold(self) -> None:
        self._closing = asyncio.Event()
        extensions = [advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})] if self._apps else []
        async with (create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
                    Client(streamable_http_client(self._target, http_client=http), extensions=extensions) as client):
            self.client = client
            self._ready.set()
            await self._closing.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """A live HTTP server with the tiny model loaded as 'dash'; yields (apps client, plain client, workspace)."""
    workspace = tmp_path_factory.mktemp("dashboard-workspace")
    log = workspace.parent / "dashboard-server.log"
    with (serving_http("--token", TOKEN, "--workspace", str(workspace), "--allow-read", str(tiny_model.parent),
                       log=log) as server,
          HttpSession(server.url, apps=True) as host, HttpSession(server.url, apps=False) as plain):
        host.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "dash", **FAST_LOAD})
        yield host, plain, workspace


def test_only_the_bound_tools_gain_meta_and_the_page_is_a_self_contained_app(tmp_path, monkeypatch):
    """tools/list is what it was apart from `_meta.ui.resourceUri` on *_train and *_training_status; the page is
    served as text/html;profile=mcp-app, small, loading nothing from anywhere, and the extension is advertised."""
    config = ServerConfig(workspace=str(tmp_path))

    async def listing() -> tuple[dict[str, Any], Any, Any]:
        async with Client(create_server(config)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            page = await client.read_resource(dashboard.URI)
            listed = {str(r.uri): r for r in (await client.list_resources()).resources}
            return tools, page, (client.server_capabilities, listed)

    tools, page, (capabilities, listed) = asyncio.run(listing())
    monkeypatch.setattr(annotations, "tool_meta", lambda name: None)  # the server as it was before the dashboard
    before, _, _ = asyncio.run(listing())

    assert set(tools) == set(before)
    assert {name for name, tool in tools.items() if tool.meta} == BOUND
    for name, tool in tools.items():
        assert dumped(tool) == {**dumped(before[name]), **({"_meta": {"ui": {"resourceUri": dashboard.URI}}}
                                                          if name in BOUND else {})}, name
    assert EXTENSION_ID in (capabilities.extensions or {})

    [content] = page.contents
    assert content.mime_type == APP_MIME_TYPE and listed[dashboard.URI].mime_type == APP_MIME_TYPE
    html = content.text
    assert html == dashboard.html() and html.lstrip().lower().startswith("<!doctype html>")
    assert len(html.encode()) < 15_000, len(html.encode())
    # Nothing external: no URLs, no src/href attributes, no @import or url() (a host's sandbox blocks them anyway)
    assert not re.search(r"https?:|//[a-z]|\bsrc=|\bhref=|@import|url\(|<link\b", html, re.I), \
        re.search(r"https?:|//[a-z]|\bsrc=|\bhref=|@import|url\(|<link\b", html, re.I)
    # Accessible by construction: a live status region, a labelled chart, a labelled job picker, a real button
    for needle in ('role="status" aria-live="polite"', 'role="img" aria-labelledby="cap"', "<label>Job <select",
                   '<button id="cancel" type="button"', 'lang="en"'):
        assert needle in html, needle


def test_answers_are_the_same_for_clients_with_and_without_apps(served, demo_rows):
    """A client that advertises MCP Apps and one that does not see the same tools and get the same answers."""
    host, plain, _ = served
    assert {n: dumped(t) for n, t in host.tools().items()} == {n: dumped(t) for n, t in plain.tools().items()}
    job = host.ok("qloraevolved_train", {"model_id": "dash", "train_dataset": demo_rows,
                                         "wait_seconds": -1, "training_config": {
                                             **FAST_TRAIN, "max_steps": 2, "output_dir": "same-answers"}})
    assert job["status"] == "success"
    for name, args in (("qloraevolved_training_status", {"model_id": "dash"}), ("qloraevolved_list_jobs", {}),
                       ("qloraevolved_list_models", {})):
        a, b = host.call(name, args), plain.call(name, args)
        assert not a.is_error and text_of(a) == text_of(b) and a.structured_content == b.structured_content, name


def browser_or_skip() -> tuple[Any, str]:
    """Playwright's sync API and a Chromium executable; skips (fails under LLM_MCP_REQUIRE_BROWSER=1) without."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("Playwright (pip install playwright)")
    chromium = os.environ.get("LLM_MCP_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
    if not chromium or not Path(chromium).exists():
        missing.append("a Chromium (apt-get install chromium, or set LLM_MCP_CHROMIUM)")
    if missing:
        reason = "the dashboard browser test needs " + " and ".join(missing)
        if os.environ.get("LLM_MCP_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright, chromium


@pytest.fixture(scope="module")
def browser() -> tuple[Any, str]:
    """Checked before the served fixture starts a server and loads a model."""
    return browser_or_skip()


def test_dashboard_in_chromium_draws_the_live_curve_and_cancels(browser, served, demo_rows, tmp_path):
    sync_playwright, chromium = browser
    host, _, workspace = served
    tools = host.tools()
    train_tool = tools["qloraevolved_train"]
    uri = train_tool.meta["ui"]["resourceUri"]
    [page_content] = host.run(host.client.read_resource(uri)).contents  # as a host fetches it: resources/read
    assert page_content.mime_type == APP_MIME_TYPE

    args = {"model_id": "dash", "train_dataset": demo_rows * 4, "wait_seconds": 0,
            "training_config": {**LIVE_TRAIN, "output_dir": "dashboard-run"}}
    result = host.call("qloraevolved_train", args)
    assert not result.is_error, text_of(result)
    job_id = result.structured_content["job_id"]

    def relay(method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The host's proxy to the MCP server for what the app asks (tools/call, resources/read)."""
        if method == "tools/call":
            return dumped(host.run(host.client.call_tool(params["name"], params.get("arguments") or {}), 60))
        return dumped(host.run(host.client.read_resource(params["uri"]), 60))

    console: list[str] = []
    shots = [tmp_path / "dashboard-1.png", tmp_path / "dashboard-2.png"]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 820, "height": 760})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                page.expose_function("mcpRelay", relay)
                page.goto(HOST_PAGE.as_uri())
                page.evaluate("o => startApp(o)", {
                    "html": page_content.text, "toolInput": args, "toolResult": dumped(result),
                    "toolInfo": {"id": 1, "tool": dumped(train_tool)}})
                page.wait_for_function("() => hostLog.some(m => m.method === 'ui/notifications/initialized')",
                                       timeout=30_000)
                app = next(f for f in page.frames if f is not page.main_frame)

                # The live view: steps past a checkpoint, a curve of many points, ETA, samples/s, the log tail
                app.wait_for_function("() => parseInt(document.getElementById('steps').textContent) >= 25 && "
                                      "/checkpoint-/.test(document.getElementById('ckpt').textContent)",
                                      timeout=180_000, polling=500)
                first = app.evaluate("() => +document.getElementById('lossline').dataset.n")
                page.locator("#frame").screenshot(path=str(shots[0]))
                app.wait_for_function(f"() => +document.getElementById('lossline').dataset.n >= {first + 8}",
                                      timeout=120_000, polling=500)
                page.wait_for_timeout(300)
                page.locator("#frame").screenshot(path=str(shots[1]))
                view = app.evaluate("""() => { const t = id => document.getElementById(id).textContent;
                    return {n: +document.getElementById('lossline').dataset.n, state: t('state'), steps: t('steps'),
                            eta: t('eta'), sps: t('sps'), lr: t('lr'), ckpt: t('ckpt'), log: t('log'), cap: t('cap'),
                            points: document.getElementById('lossline').getAttribute('points').trim().split(/\\s+/)
                                    .length, lrPoints: document.getElementById('lrline').getAttribute('points')
                                    .trim().split(/\\s+/).length} }""")
                assert view["n"] > first and view["points"] == view["n"] and view["lrPoints"] >= 2, (first, view)
                assert view["state"] == "running", view
                assert re.fullmatch(rf"\d+ / {LIVE_TRAIN['max_steps']}", view["steps"]), view
                assert re.search(r"\d", view["eta"]) and float(view["sps"]) > 0 and "e-" in view["lr"], view
                assert "checkpoint-" in view["ckpt"] and view["log"].strip(), view
                assert f"{view['n']} points" in view["cap"], view
                assert shots[0].read_bytes() != shots[1].read_bytes()

                # Accessible names as a screen reader gets them
                assert app.get_by_role("status").inner_text() == "running"
                assert app.get_by_role("img", name=re.compile(r"Training loss by step: \d+ points")).count() == 1
                assert app.get_by_role("combobox", name="Job").input_value() == job_id

                # Cancel from the keyboard: Tab focus on the button, Enter; the app calls the cancel tool through
                # the host, keeps polling, and shows the end
                button = app.get_by_role("button", name="Cancel training")
                assert button.is_enabled()
                button.focus()
                page.keyboard.press("Enter")
                app.wait_for_function("() => document.getElementById('state').textContent === 'cancelled'",
                                      timeout=120_000, polling=500)
                assert button.is_disabled()
                calls = page.evaluate("() => hostLog.filter(m => m.method === 'tools/call').map(m => m.params)")

                # A host that names no tool (no toolInfo, no result) and a dark theme: the app finds the family by
                # asking for its jobs and shows the model's latest job from the tool input
                page.evaluate("() => { hostLog.length = 0 }")
                page.evaluate("o => startApp(o)", {"html": page_content.text, "toolInput": {"model_id": "dash"},
                                                   "theme": "dark"})
                app = next(f for f in page.frames if f is not page.main_frame)
                app.wait_for_function("() => document.getElementById('state').textContent === 'cancelled' && "
                                      f"document.getElementById('title').textContent.endsWith({job_id!r})",
                                      timeout=30_000, polling=300)
                page.locator("#frame").screenshot(path=str(tmp_path / "dashboard-dark.png"))
                probed = page.evaluate("() => hostLog.filter(m => m.method === 'tools/call').map(m => m.params.name)")
                assert probed[0] == "qloraevolved_list_jobs" and "qloraevolved_training_status" in probed, probed
            finally:
                browser.close()
    finally:
        final = host.ok("qloraevolved_training_status", {"job_id": job_id})
        if final["state"] not in TERMINAL:  # never leave the run going
            host.ok("qloraevolved_cancel_training", {"job_id": job_id})
            wait_for(lambda: host.ok("qloraevolved_training_status", {"job_id": job_id})["state"] in TERMINAL,
                     "the dashboard's job to end", 120)

    assert final["state"] == "cancelled", final
    assert {"name": "qloraevolved_cancel_training", "arguments": {"job_id": job_id}} in calls
    assert {c["name"] for c in calls} <= {"qloraevolved_training_status", "qloraevolved_list_jobs",
                                          "qloraevolved_cancel_training"}, calls
    statuses = [c for c in calls if c["name"] == "qloraevolved_training_status"]
    assert len(statuses) >= 5 and all(c["arguments"] == {"job_id": job_id} for c in statuses)
    assert not [line for line in console if "Content Security Policy" in line or "pageerror" in line], console
    if os.environ.get("LLM_MCP_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(shots[1], ROOT / "docs" / "dashboard.png")
