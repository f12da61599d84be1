"""Shared fixtures: the tiny model folder, and an MCP client session on a real server, usable from sync tests.

`McpSession` keeps one in-memory `mcp.Client` open on a background event loop for a whole test module, so a
model loaded once serves many tests; each call goes through the SDK's client exactly as an agent's would.

Also the pieces every test shares: `HW` (this machine's hardware, which outcomes are asserted against, as the
`hw` fixture too), `cpu_only` and the `gpu` marker's skip, one `wait_for` (every wait is on an event or a step
count, bounded by a generous deadline, and raises naming what it waited for) with the job helpers built on it,
the worker processes of a model, and one `llm-mcp serve --transport streamable-http` subprocess (`serving_http`,
or the `http_server` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mcp import Client

from llm_mcp.config import ServerConfig
from llm_mcp.engine.device import detect
from llm_mcp.jobs.store import TERMINAL
from llm_mcp.server.app import create_server
from llm_mcp.dev.tiny import demo_records, make_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("llm-mcp")

# This machine's hardware, as the engine detects it: expected outcomes follow it, so the tests are right on a CPU
# and on a CUDA machine alike.
HW = detect()
cpu_only = pytest.mark.skipif(HW.has_cuda, reason="compares with CPU behaviour (the CUDA path differs by design)")

# Fast settings for the tiny model: float32 is the fastest CPU dtype, and high lr memorises in few steps.
FAST_LOAD = {"compute_dtype": "float32", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "max_length": 128}
FAST_TRAIN = {"learning_rate": 3e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "logging_steps": 5,
              "warmup_ratio": 0.0, "use_gradient_checkpointing": False, "lr_scheduler_type": "constant",
              "max_grad_norm": 1.0, "report_to": "none"}


class McpSession:
    """A live MCP client session on its own event loop thread; `call` is synchronous for the tests."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self.client: Client | None = None

    def __enter__(self) -> "McpSession":
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._hold(), self._loop)
        if not self._ready.wait(120):
            raise RuntimeError(f"MCP session did not start: {self._runner.exception() if self._runner.done() else ''}")
        return self

    async def _hold(self) -> None:
        self._closing = asyncio.Event()
        async with Client(self._target) as client:
            self.client = client
            self._ready.set()
            await self._closing.wait()

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._closing.set)
        self._runner.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def run(self, coro: Any, timeout: float = 900) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, name: str, args: dict[str, Any] | None = None, progress: list | None = None) -> Any:
        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append((p, total, message))

        cb = on_progress if progress is not None else None
        return self.run(self.client.call_tool(name, args or {}, progress_callback=cb))

    def ok(self, name: str, args: dict[str, Any] | None = None, progress: list | None = None) -> dict[str, Any]:
        """Call a tool that must succeed; return its structured answer."""
        result = self.call(name, args, progress)
        assert not result.is_error, f"{name} failed: {text_of(result)}"
        assert result.structured_content is not None
        return result.structured_content

    def error(self, name: str, args: dict[str, Any] | None = None) -> str:
        """Call a tool that must fail with a tool error; return the error text."""
        result = self.call(name, args)
        assert result.is_error, f"{name} should have failed but returned {result.structured_content}"
        return text_of(result)

    def tools(self) -> dict[str, Any]:
        return {t.name: t for t in self.run(self.client.list_tools()).tools}


def text_of(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need a CUDA GPU: skipped where torch sees none."""
    if HW.has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hw():
    """This machine's hardware (llm_mcp.engine.device.detect())."""
    return HW


# -- waiting on events --------------------------------------------------------------------------------------------
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str | Callable[[], str], timeout: float = 60,
             interval: float = 0.2) -> T:
    """Poll `predicate` until it returns something truthy and return that; past `timeout` seconds raise an
    AssertionError naming `what` (a string, or a function giving one, e.g. with the last state seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def job_status(mcp: McpSession, job_id: str) -> dict[str, Any]:
    return mcp.ok("qloraevolved_training_status", {"job_id": job_id})


def poll_job(mcp: McpSession, job_id: str, until: set[str] | frozenset[str] = TERMINAL,
             timeout: float = 180) -> dict[str, Any]:
    """The job's status once its state is one of `until` (by default: any end)."""
    seen: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        seen.update(job_status(mcp, job_id))
        return dict(seen) if seen["state"] in until else None

    return wait_for(reached, lambda: f"job {job_id} to reach {sorted(until)} (last status: {seen})", timeout)


def wait_for_step(mcp: McpSession, job_id: str, step: int, checkpoint: bool = False,
                  timeout: float = 180) -> dict[str, Any]:
    """The job's status once it has trained `step` steps (and, with checkpoint=true, written a checkpoint); an
    AssertionError at once if the job ended before that."""
    seen: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        seen.update(job_status(mcp, job_id))
        if seen["step"] >= step and (seen["last_checkpoint"] or not checkpoint):
            return dict(seen)
        assert seen["state"] not in TERMINAL, f"job {job_id} ended before step {step}: {seen}"
        return None

    what = f"step {step}" + (" and a checkpoint" if checkpoint else "")
    return wait_for(reached, lambda: f"job {job_id} to reach {what} (last status: {seen})", timeout)


# -- processes ----------------------------------------------------------------------------------------------------
def worker_pids(model_id: str, *, any_parent: bool = False) -> list[int]:
    """Pids of the live worker processes for model_id (workers name their model last in argv): this test process's
    children, or with any_parent=true whoever their parent is (a killed server's workers are re-parented).
    Zombies (ended, not yet reaped) are left out.

    Reads /proc rather than running `ps`, which a minimal machine (CI's) may not have."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if "llm_mcp.workers.worker" in args and args[-1] == model_id and state != "Z" \
                and (any_parent or int(ppid) == os.getpid()):
            pids.append(int(proc.name))
    return pids


def rank_pids() -> dict[int, int]:
    """pid -> RANK of the live processes training as ranks of a run across processes (llm_mcp.engine.train.rank,
    not the launcher that started them), whoever their parent is; zombies left out."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            env = dict(v.decode(errors="replace").partition("=")[::2]
                       for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if "llm_mcp.engine.train.rank" in args and "torch.distributed.run" not in args and state != "Z":
            ranks[int(proc.name)] = int(env.get("RANK", "-1"))
    return ranks


def unsloth_python() -> str:
    """The interpreter of the Unsloth environment; skips the test where there is none (fails in CI, which sets
    LLM_MCP_REQUIRE_UNSLOTH)."""
    python = os.environ.get("LLM_MCP_UNSLOTH_PYTHON") or str(ROOT / ".venv-unsloth" / "bin" / "python")
    if not Path(python).is_file():
        if os.environ.get("LLM_MCP_REQUIRE_UNSLOTH"):
            pytest.fail(f"no Unsloth environment at {python} (scripts/setup-unsloth-env.sh builds it)")
        pytest.skip("no Unsloth environment (run scripts/setup-unsloth-env.sh)")
    return python


# -- the HTTP transport as a subprocess ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def serve_http_command(*args: str) -> list[str]:
    return [str(EXE), "serve", "--transport", "streamable-http", *args]


def env_without_token(**extra: str) -> dict[str, str]:
    """This process's environment without LLM_MCP_TOKEN (a token the caller did not ask for changes what the
    server accepts), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "LLM_MCP_TOKEN"}, **extra}


@dataclass
class HttpServer:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        """Terminate the server (if it still runs) and wait for it: its log is complete afterwards."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@contextmanager
def serving_http(*args: str, log: Path, env: dict[str, str] | None = None,
                 timeout: float = 60) -> Iterator[HttpServer]:
    """`llm-mcp serve --transport streamable-http --port <free port> *args` on loopback, its stdout and stderr
    appended to `log`, its environment this one's without LLM_MCP_TOKEN plus `env`; yields once it listens (an
    early exit fails at once, with the log's end) and stops it afterwards."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_http_command("--port", str(port), *args), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env_without_token(**(env or {})))
    server = HttpServer(port, proc, log)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited early with {proc.returncode}: "
                                     f"{log.read_text(errors='replace')[-2000:]}")
            return port_open(port)

        wait_for(listening, f"the HTTP server to listen on 127.0.0.1:{port}", timeout)
        yield server
    finally:
        server.stop()


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Callable[..., HttpServer]]:
    """Starts HTTP servers for one test: http_server(*args, log=..., env=...) -> HttpServer (url, port, proc,
    log; default log tmp_path/'server.log'); every one is stopped when the test ends."""
    with ExitStack() as stack:
        def start(*args: str, log: Path | None = None, env: dict[str, str] | None = None) -> HttpServer:
            return stack.enter_context(serving_http(*args, log=log or tmp_path / "server.log", env=env))

        yield start


def lora_param_count(model_dir: Path, r: int) -> int:
    """The LoRA parameters of rank r on every projection (q, k, v, o, gate, up, down) of a Llama model folder:
    r x (in + out) per adapted linear layer, from its config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    per_layer = (hidden + q) + 2 * (hidden + kv) + (q + hidden) + 3 * (hidden + c["intermediate_size"])
    return r * per_layer * c["num_hidden_layers"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


def server_config(workspace: Path, tiny_model: Path, **options: Any) -> ServerConfig:
    """A server on `workspace` that may also read the tiny model's folder (outside it, as a user's models are)."""
    return ServerConfig(workspace=str(workspace), allow_read=(str(tiny_model.parent),), **options)


@pytest.fixture(scope="module")
def mcp(workspace: Path, tiny_model: Path) -> McpSession:
    with McpSession(create_server(server_config(workspace, tiny_model))) as session:
        yield session


@pytest.fixture(scope="session")
def demo_rows() -> list[dict[str, str]]:
    return demo_records()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def lora_step():
    """One forward/backward of a LoRA model on a fixed batch under context-manager patches (the engine's lean_*
    functions), its dropout seeded: (loss, LoRA gradients, bytes autograd kept)."""
    return _lora_step


def _lora_step(model, patches) -> tuple[float, dict[str, Any], int]:
    """One forward/backward on a fixed batch under the patches; the loss, LoRA gradients and bytes autograd kept."""
    import contextlib

    import torch

    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    ids = (torch.arange(4 * 48).reshape(4, 48) % 400 + 5).to(model.device)
    torch.manual_seed(7)
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch(model))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, \
        sum(kept.values())


# A run across two processes, the tiny model's fast settings with 2 examples per rank (a global batch of 4).
TWO_RANKS = {**FAST_TRAIN, "batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1, "num_processes": 2}


def cancel_after_two_steps(mcp: McpSession, model_id: str, rows: list[dict[str, Any]], workspace: Path,
                           output_dir: str) -> Path:
    """Start a long two-process run, cancel it once it has trained two steps, and check that it ended cancelled
    with exactly one sealed checkpoint; that checkpoint's folder."""
    job = mcp.ok("qloraevolved_train", {
        "model_id": model_id, "train_dataset": rows * 4, "wait_seconds": 0,
        "training_config": {**TWO_RANKS, "max_steps": 400, "save_steps": 1000, "output_dir": output_dir}})["job_id"]
    wait_for_step(mcp, job, 2)
    mcp.ok("qloraevolved_cancel_training", {"job_id": job})
    ended = poll_job(mcp, job)
    assert ended["state"] == "cancelled", ended
    checkpoints = list((workspace / output_dir).glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / ".complete").is_file()
    return checkpoints[0]


def merge_agrees(verified: dict) -> bool:
    """The merged model answers the probe as the adapter model does, or parts from it only at a near-tie that
    16-bit rounding flips (the adapter model's own token leads there by less than NEAR_TIE logits)."""
    return verified["greedy_matches_adapter_model"] is True or verified.get("near_tie") is True
