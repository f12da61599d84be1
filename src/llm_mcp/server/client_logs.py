"""The logging capability: a client that sends `logging/setLevel` receives the server's log records (jobs starting
and ending, workers failing, the job store's trouble ...) at or above that level as `notifications/message`, the
logger named. Handshake-era clients (2025-11-25 and before); the 2026-07-28 protocol deprecates the capability.

Records are sent on the server's event loop from whichever thread logged them; the SDK's own loggers are left out
(a record about sending a record would loop)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mcp.types import EmptyResult, SetLevelRequestParams

from llm_mcp.server.updates import client_of

LOGGER = "llm_mcp"
# MCP's syslog levels as Python levels; a record's MCP level is the highest at or below its own
_LEVELS = {"debug": 10, "info": 20, "notice": 25, "warning": 30, "error": 40, "critical": 50, "alert": 55,
           "emergency": 60}


def mcp_level(levelno: int) -> str:
    return max((name for name, n in _LEVELS.items() if n <= levelno), key=_LEVELS.get, default="debug")


class ClientLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[Any, tuple[Any, int]] = {}  # client connection -> (a session to it, Python level)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        logging.getLogger(LOGGER).addHandler(self)

    def stop(self) -> None:
        logging.getLogger(LOGGER).removeHandler(self)
        self._loop = None

    def register(self, lowlevel_server: Any) -> None:
        lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, self._set_level)

    async def _set_level(self, ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        threshold = _LEVELS[params.level]
        self._clients[client_of(ctx.session)] = (ctx.session, threshold)
        package = logging.getLogger(LOGGER)
        if package.getEffectiveLevel() > threshold:  # records below the package's level never reach a handler
            package.setLevel(threshold)
        return EmptyResult()

    def emit(self, record: logging.LogRecord) -> None:
        loop = self._loop
        wanted = [(c, s) for c, (s, level) in self._clients.items() if record.levelno >= level]
        if loop is None or loop.is_closed() or not wanted:
            return
        data = {"message": record.getMessage()[:4000]}
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._send(wanted, mcp_level(record.levelno),
                                                                          record.name, data)))
        except RuntimeError:  # the loop closed: the server is stopping
            pass

    async def _send(self, wanted: list[tuple[Any, Any]], level: str, logger: str, data: dict[str, Any]) -> None:
        for client, session in wanted:
            try:
                await session.send_log_message(level=level, data=data, logger=logger)
            except Exception:  # a client that has gone: forget it
                self._clients.pop(client, None)
