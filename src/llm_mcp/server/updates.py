"""Resource updates for subscribers: as a job logs a step and when it starts or ends, its resources
(llm-mcp://jobs/{id}, .../log, .../loss.png) and the jobs list change. 2026-07-28 clients hear of it on their
`subscriptions/listen` stream (the SDK's subscription bus); clients of earlier protocol versions that sent
`resources/subscribe` get `notifications/resources/updated` on their session.

The job manager calls `job_changed` from its pump thread; the notices are sent on the server's event loop, a job's
progress at most every THROTTLE_S, its start and end always."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.types import EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from llm_mcp.server.resources import JOBS

log = logging.getLogger(__name__)
THROTTLE_S = 1.0


def client_of(session: Any) -> Any:
    """The client connection a session handle speaks on (the SDK keeps it as _connection)."""
    return getattr(session, "_connection", session)


def job_uris(job_id: str) -> list[str]:
    return [f"{JOBS}/{job_id}", f"{JOBS}/{job_id}/log", f"{JOBS}/{job_id}/loss.png"]


class ResourceUpdates:
    def __init__(self) -> None:
        self.bus = InMemorySubscriptionBus()
        self._loop: asyncio.AbstractEventLoop | None = None
        # uri -> {client connection: a session to it} for the clients that sent resources/subscribe, held until
        # they unsubscribe or a notice to them fails (the context's session is a per-request handle on the
        # connection: a weak reference would lose it at once, and the connection is what identifies the client)
        self._sessions: dict[str, dict[Any, Any]] = {}
        self._sent: dict[str, float] = {}  # job_id -> when its progress was last told

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def register(self, lowlevel_server: Any) -> None:
        """Serve resources/subscribe and resources/unsubscribe (the handshake-era way to subscribe)."""
        lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, self._subscribe)
        lowlevel_server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, self._unsubscribe)

    async def _subscribe(self, ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        self._sessions.setdefault(str(params.uri), {})[client_of(ctx.session)] = ctx.session
        return EmptyResult()

    async def _unsubscribe(self, ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        self._sessions.get(str(params.uri), {}).pop(client_of(ctx.session), None)
        return EmptyResult()

    def job_changed(self, job_id: str, what: str) -> None:
        """Thread-safe: `what` is "progress" (throttled), "start" or "end" (the jobs list changes too)."""
        if self._loop is None or self._loop.is_closed():
            return
        now = time.monotonic()
        if what == "progress" and now - self._sent.get(job_id, 0.0) < THROTTLE_S:
            return
        self._sent[job_id] = now
        if what == "end":
            self._sent.pop(job_id, None)
        uris = job_uris(job_id) + ([JOBS] if what != "progress" else [])
        try:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._publish(uris)))
        except RuntimeError:  # the loop closed between the check and the call: the server is stopping
            pass

    async def _publish(self, uris: list[str]) -> None:
        for uri in uris:
            try:
                await self.bus.publish(ResourceUpdated(uri=uri))
            except Exception:  # a listener's stream that broke is the SDK's to drop; others still hear
                log.debug("publishing %s to the subscription bus failed", uri, exc_info=True)
            for client, session in list(self._sessions.get(uri, {}).items()):
                try:
                    await session.send_resource_updated(uri)
                except Exception:  # a client that has gone: forget it
                    self._sessions.get(uri, {}).pop(client, None)
