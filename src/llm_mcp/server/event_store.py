"""Resumable streamable-HTTP streams: the SDK's EventStore interface kept in memory, bounded, so a client that
loses its connection mid-stream (a long train call's progress) reconnects with Last-Event-ID and gets what it
missed. Per server process: a restart starts afresh."""

from collections import OrderedDict, deque
from itertools import count

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.types import JSONRPCMessage

EVENTS_PER_STREAM = 500  # enough for a long call's progress notifications; older ones are dropped
STREAMS = 200  # the streams remembered; the least recently written is forgotten first
RETRY_MS = 2000  # the `retry` the SSE streams announce: reconnect after this many milliseconds


class BoundedEventStore(EventStore):
    def __init__(self, per_stream: int = EVENTS_PER_STREAM, streams: int = STREAMS) -> None:
        self._per_stream, self._streams = per_stream, streams
        self._events: OrderedDict[StreamId, deque[tuple[int, JSONRPCMessage | None]]] = OrderedDict()
        self._stream_of: dict[int, StreamId] = {}
        self._ids = count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        number = next(self._ids)
        events = self._events.setdefault(stream_id, deque())
        self._events.move_to_end(stream_id)
        if len(events) == self._per_stream:
            self._stream_of.pop(events.popleft()[0], None)
        events.append((number, message))
        self._stream_of[number] = stream_id
        while len(self._events) > self._streams:
            _, dropped = self._events.popitem(last=False)
            for old, _ in dropped:
                self._stream_of.pop(old, None)
        return str(number)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        try:
            after = int(last_event_id)
        except ValueError:
            return None
        stream_id = self._stream_of.get(after)
        if stream_id is None:
            return None
        for number, message in self._events.get(stream_id, ()):
            if number > after and message is not None:  # None: a priming event, nothing to replay
                await send_callback(EventMessage(message, str(number)))
        return stream_id
