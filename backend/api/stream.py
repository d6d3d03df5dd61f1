"""``GET /api/v1/stream``: status changes, alerts and command outcomes as server-sent events.

Where it sits in a message's journey: last. Ingest (and the monitor sweep, and the API itself)
``NOTIFY``s on the ``molo_live`` channel inside the transaction that commits a change
(:mod:`backend.operations.live`); each API process holds one dedicated connection that
``LISTEN``s (:class:`LiveHub`) and fans every notification out to its connected clients. So the
stream shows exactly what was committed, from whichever ingest worker committed it.

Wire format (``text/event-stream``)::

    retry: 3000

    event: hello
    data: {"listening": true}

    event: box.status
    data: {"box_id": "aal-001", "online": false, "reason": "connection_lost", "session": 7, "since": "..."}

A comment line (``: keepalive``) every 15 s keeps proxies from closing an idle stream. A client too
slow to keep up (over 1,000 events behind) gets ``event: lagged`` and the stream ends: reconnect and
re-read the alert list. Events and payloads: docs/operations.md. Browsers read it with ``fetch()``
(so the ``X-API-Key`` header can be sent) or with ``EventSource`` behind a proxy that adds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from psycopg import AsyncConnection

from backend.access import repository as access_repository
from backend.api.auth import ViewerDep
from backend.operations.live import CHANNEL
from contract.topics import BOX_ID_PATTERN

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["operations"])

QUEUE_MAX = 1000


@dataclass(eq=False)  # identity: each client is its own subscriber
class _Subscriber:
    box_id: str | None
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    lagged: bool = False


class LiveHub:
    """One LISTEN connection per API process, fanned out to the SSE clients."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._subscribers: set[_Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.ending = False
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-hub")

    def end_streams(self) -> None:
        """End every open stream (the server is shutting down); new ones end after ``hello``."""
        self.ending = True
        for sub in list(self._subscribers):
            sub.lagged = False
            while True:  # make room for the end marker
                try:
                    sub.queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    sub.queue.get_nowait()

    async def stop(self) -> None:
        self._closed = True
        self.end_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, box_id: str | None) -> _Subscriber:
        sub = _Subscriber(box_id)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)

    async def _run(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                conn = await AsyncConnection.connect(self._url, autocommit=True, application_name="molo-api-live")
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = 0.5
                    async for note in conn.notifies():
                        self._fan_out(note.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("live stream: database connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    def _fan_out(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            event, data = str(note["event"]), note["data"]
        except (ValueError, KeyError, TypeError):
            log.warning("live stream: ignoring a malformed notification %.100r", payload)
            return
        box_id = data.get("box_id") if isinstance(data, dict) else None
        text = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for sub in list(self._subscribers):
            if sub.box_id is not None and sub.box_id != box_id:
                continue
            try:
                sub.queue.put_nowait(text)
            except asyncio.QueueFull:
                sub.lagged = True


def _hub(request: Request) -> LiveHub:
    hub: LiveHub = request.app.state.live
    return hub


async def _revoked(request: Request, key_id: str) -> bool:
    """True if the stream's key has been revoked (or deleted) since the stream opened. If the
    database cannot be asked now, the stream goes on and asks again at the next keepalive."""
    pool = request.app.state.pool
    try:
        async with pool.connection(timeout=5.0) as conn:
            row = await access_repository.find_key(conn, key_id)
    except (psycopg.OperationalError, TimeoutError):
        return False
    return row is None or row["revoked_at"] is not None


@router.get(
    "/stream",
    summary="Live status changes, alerts and command outcomes (server-sent events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "events as described in docs/operations.md"},
        401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
        403: {"description": "`forbidden_role`: operators and researchers only"},
    },
)
async def stream(
    request: Request,
    viewer: ViewerDep,
    box_id: Annotated[str | None, Query(pattern=BOX_ID_PATTERN, description="only this box's events")] = None,
) -> StreamingResponse:
    hub = _hub(request)
    keepalive_s = request.app.state.settings.stream_keepalive_s

    async def events() -> AsyncIterator[str]:
        sub = hub.subscribe(box_id)  # before hello: everything committed after hello is delivered
        try:
            yield "retry: 3000\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.listening.wait(), 5.0)
            yield f"event: hello\ndata: {json.dumps({'listening': hub.listening.is_set(), 'box_id': box_id})}\n\n"
            while not hub.ending or not sub.queue.empty():
                if sub.lagged and sub.queue.empty():
                    yield 'event: lagged\ndata: {"reason": "too far behind; reconnect and re-read the alerts"}\n\n'
                    return
                try:
                    item = await asyncio.wait_for(sub.queue.get(), keepalive_s)
                except TimeoutError:
                    if await _revoked(request, viewer.key_id):  # a key revoked mid-stream ends it
                        yield 'event: revoked\ndata: {"reason": "the API key was revoked"}\n\n'
                        return
                    yield ": keepalive\n\n"
                    continue
                if item is None:
                    return
                yield item
        finally:
            hub.unsubscribe(sub)

    headers: dict[str, Any] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
