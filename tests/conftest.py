"""Shared fixtures: the tiny model folder, and an MCP client session on a real server, usable from sync tests.

`McpSession` keeps one in-memory `mcp.Client` open on a background event loop for a whole test module, so a
model loaded once serves many tests; each call goes through the SDK's client exactly as an agent's would.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from llm_mcp.config import ServerConfig
from llm_mcp.server.app import create_server
from llm_mcp.dev.tiny import demo_records, make_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    ids = torch.arange(4 * 48).reshape(4, 48) % 400 + 5
    torch.manual_seed(7)
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch(model))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, \
        sum(kept.values())
