"""``GET /api/v1/stream``: status changes, alerts and command outcomes as server-sent events.

Where it sits in a message's journey: last. Ingest (and the monitor sweep, and the API itself)
``NOTIFY``s on the ``molo_live`` channel inside the transaction that commits a change
(:mod:`backend.operations.live`); each API process holds one dedicated connection that
``LISTEN``s (:class:`LiveHub`) and fans every notification out to its connected clients, in memory.
So the stream shows exactly what was committed, from whichever ingest worker committed it.

An open stream holds no database connection: its key is looked up on a pool connection that is
returned before the stream starts (``StreamViewerDep``). The hub also ``LISTEN``s for changes to
keys (``molo_keys``): it drops a changed key from the process's key cache (backend/api/auth.py) and
checks the keys of its open streams for revocation then, and with one query on its own connection
every ``MOLO_STREAM_KEEPALIVE_S`` in any case. A
process serves at most ``MOLO_STREAM_MAX_PER_KEY`` streams per key (then 429 ``too_many_streams``)
and ``MOLO_STREAM_MAX_TOTAL`` in all (then 503 ``streams_full``), both with ``Retry-After``.

Wire format (``text/event-stream``)::

    retry: 3000

    event: hello
    data: {"listening": true}

    event: box.status
    data: {"box_id": "aal-001", "online": false, "reason": "connection_lost", "session": 7, "since": "..."}

A comment line (``: keepalive``) every 15 s keeps proxies from closing an idle stream. A client too
slow to keep up (over 1,000 events behind) gets ``event: lagged`` and the stream ends: reconnect and
re-read the alert list. A stream whose key is revoked gets ``event: revoked`` and ends. Events and
payloads: docs/operations.md. Browsers read it with ``fetch()`` (so the ``X-API-Key`` header can be
sent) or with ``EventSource`` behind a proxy that adds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from psycopg import AsyncConnection
from starlette.types import Receive, Scope, Send

from backend.access.repository import KEY_CHANNEL
from backend.api.auth import KeyCache, StreamViewerDep
from backend.api.errors import error_body
from backend.operations.live import CHANNEL
from contract.topics import BOX_ID_PATTERN

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["operations"])

QUEUE_MAX = 1000
#: Events written to a client in one chunk at most, when several are waiting.
CHUNK_MAX = 100
#: Streams woken per turn of the event loop when an event is fanned out.
FAN_OUT_SLICE = 10
#: ``Retry-After`` (seconds) of a refused stream.
RETRY_AFTER_S = 10

_REVOKED = b'event: revoked\ndata: {"reason": "the API key was revoked"}\n\n'
_KEEPALIVE = b": keepalive\n\n"
_LAGGED = b'event: lagged\ndata: {"reason": "too far behind; reconnect and re-read the alerts"}\n\n'

# The keys of open streams still valid (api_keys; see backend/access/repository.py find_key).
_VALID_KEYS = "SELECT key_id FROM api_keys WHERE key_id = ANY(%s) AND revoked_at IS NULL"


@dataclass(eq=False)  # identity: each client is its own subscriber
class _Subscriber:
    box_id: str | None
    key_id: str
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    last_queued: float = field(default_factory=time.monotonic)  # an event or a keepalive
    lagged: bool = False
    revoked: bool = False


class LiveHub:
    """One LISTEN connection per API process, fanned out to the SSE clients in memory. The hub also
    counts the open streams (per key and in all), queues the keepalives of quiet streams, and ends
    the streams whose key was revoked (one query on its own connection every ``keepalive_s``)."""

    def __init__(self, database_url: str, *, keepalive_s: float = 15.0, key_cache_s: float = 0.0) -> None:
        self._url = database_url
        self._keepalive_s = keepalive_s
        self._subscribers: set[_Subscriber] = set()
        self._per_key: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()
        #: The process's cache of key lookups: used only while this hub listens for key changes.
        self.key_cache = KeyCache(key_cache_s, self.listening.is_set)
        self.ending = False
        self._closed = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="live-hub"),
            asyncio.create_task(self._keep_alive(), name="live-hub-keepalive"),
        ]

    def end_streams(self) -> None:
        """End every open stream (the server is shutting down); new ones end after ``hello``."""
        self.ending = True
        for sub in list(self._subscribers):
            self._end(sub)

    async def stop(self) -> None:
        self._closed = True
        self.end_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def open_streams(self) -> int:
        return len(self._subscribers)

    def open_streams_of(self, key_id: str) -> int:
        return self._per_key.get(key_id, 0)

    def subscribe(self, box_id: str | None, key_id: str) -> _Subscriber:
        sub = _Subscriber(box_id, key_id)
        self._subscribers.add(sub)
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        if self.ending:
            self._end(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        """Forget ``sub`` (idempotent: the stream and its response both call this when they end)."""
        if sub not in self._subscribers:
            return
        self._subscribers.discard(sub)
        left = self._per_key[sub.key_id] - 1
        if left:
            self._per_key[sub.key_id] = left
        else:
            del self._per_key[sub.key_id]

    @staticmethod
    def _end(sub: _Subscriber, *, revoked: bool = False) -> None:
        """Queue the end marker; a revoked key's stream gets nothing more that was queued."""
        sub.lagged = False
        sub.revoked = sub.revoked or revoked
        while True:  # make room for the end marker
            if revoked:
                while not sub.queue.empty():
                    sub.queue.get_nowait()
            try:
                sub.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                sub.queue.get_nowait()

    async def _run(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                conn = await AsyncConnection.connect(self._url, autocommit=True, application_name="molo-api-live")
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {KEY_CHANNEL}")
                    self.key_cache.clear()  # changes may have been missed while away
                    self.listening.set()
                    delay = 0.5
                    next_check = time.monotonic() + self._keepalive_s
                    while True:
                        # Notifications that arrive during the key check wait in psycopg's backlog
                        # and come first from the next notifies().
                        streams_key_changed = False
                        async for note in conn.notifies(timeout=max(0.0, next_check - time.monotonic())):
                            if note.channel != KEY_CHANNEL:
                                await self._fan_out(note.payload)
                            elif self._key_changed(note.payload):
                                streams_key_changed = True
                                break
                        if streams_key_changed or time.monotonic() >= next_check:
                            await self._check_keys(conn)
                            next_check = time.monotonic() + self._keepalive_s
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("live stream: database connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    def _key_changed(self, key_id: str) -> bool:
        """A key changed (``molo_keys``): drop it from the key cache; True if a stream uses it."""
        self.key_cache.forget(key_id)
        return self._per_key.get(key_id, 0) > 0

    async def _check_keys(self, conn: AsyncConnection[Any]) -> None:
        """End the streams whose key has been revoked (or deleted) since they opened: one query for
        all of them. If it fails on a connection still good, the next check asks again."""
        keys = {sub.key_id for sub in self._subscribers}
        if not keys:
            return
        try:
            cur = await conn.execute(_VALID_KEYS, (sorted(keys),))
            valid = {row[0] for row in await cur.fetchall()}
        except psycopg.Error as exc:
            if conn.broken:
                raise
            log.warning("live stream: key check failed (%s); trying again in %g s", exc, self._keepalive_s)
            return
        for sub in list(self._subscribers):
            if sub.key_id in keys and sub.key_id not in valid and not sub.revoked:
                self._end(sub, revoked=True)

    async def _keep_alive(self) -> None:
        """Queue a keepalive for every stream quiet for ``keepalive_s``: a pass every quarter of it
        (so a quiet stream gets one after 1 to 1.25 times ``keepalive_s``), also while the database
        is away, and a slice of streams per turn of the event loop as in :meth:`_fan_out`."""
        while True:
            await asyncio.sleep(self._keepalive_s / 4)
            due = time.monotonic() - self._keepalive_s
            for n, sub in enumerate([s for s in self._subscribers if s.last_queued <= due], start=1):
                with contextlib.suppress(asyncio.QueueFull):  # full: it is not quiet
                    sub.queue.put_nowait(_KEEPALIVE)
                sub.last_queued = time.monotonic()
                if n % FAN_OUT_SLICE == 0:
                    await asyncio.sleep(0)

    async def _fan_out(self, payload: str) -> None:
        """Queue the event for every stream it is for, ``FAN_OUT_SLICE`` streams per turn of the
        event loop: each woken stream writes to its socket at once, so waking hundreds together
        would make every other request wait behind all those writes."""
        try:
            note = json.loads(payload)
            event, data = str(note["event"]), note["data"]
        except (ValueError, KeyError, TypeError):
            log.warning("live stream: ignoring a malformed notification %.100r", payload)
            return
        box_id = data.get("box_id") if isinstance(data, dict) else None
        text = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()  # once for all
        now = time.monotonic()
        woken = 0
        for sub in list(self._subscribers):
            if sub.revoked or (sub.box_id is not None and sub.box_id != box_id):
                continue
            try:
                sub.queue.put_nowait(text)
            except asyncio.QueueFull:
                sub.lagged = True
            sub.last_queued = now
            woken += 1
            if woken % FAN_OUT_SLICE == 0:
                await asyncio.sleep(0)  # let those streams write, and other requests run, first


def _hub(request: Request) -> LiveHub:
    hub: LiveHub = request.app.state.live
    return hub


class _LiveResponse(StreamingResponse):
    """A streaming response that gives its stream's slot back however it ends (also when the
    client goes away before the first byte, so the body never started)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _refuse(status: int, code: str, message: str, limit: int) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, {"limit": limit}),
        status_code=status,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@router.get(
    "/stream",
    summary="Live status changes, alerts and command outcomes (server-sent events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "events as described in docs/operations.md"},
        401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
        403: {"description": "`forbidden_role`: operators and researchers only"},
        429: {"description": "`too_many_streams`: this key holds `MOLO_STREAM_MAX_PER_KEY` streams (`Retry-After`)"},
        503: {
            "description": "`streams_full`: the process serves `MOLO_STREAM_MAX_TOTAL` streams (`Retry-After`); "
            "`database_unavailable`"
        },
    },
)
async def stream(
    request: Request,
    viewer: StreamViewerDep,
    box_id: Annotated[str | None, Query(pattern=BOX_ID_PATTERN, description="only this box's events")] = None,
) -> Response:
    hub = _hub(request)
    settings = request.app.state.settings
    if hub.open_streams_of(viewer.key_id) >= settings.stream_max_per_key:
        return _refuse(
            429,
            "too_many_streams",
            f"the API key {viewer.key_id} already has {settings.stream_max_per_key} live streams open here;"
            " close one or retry later",
            settings.stream_max_per_key,
        )
    if hub.open_streams >= settings.stream_max_total:
        return _refuse(
            503,
            "streams_full",
            "this API process serves all the live streams it can; retry later",
            settings.stream_max_total,
        )
    # Counted from here (no await since the checks): everything committed after hello is delivered.
    sub = hub.subscribe(box_id, viewer.key_id)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 3000\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.listening.wait(), 5.0)
            hello = {"listening": hub.listening.is_set(), "box_id": box_id}
            yield f"event: hello\ndata: {json.dumps(hello)}\n\n".encode()
            while True:
                if sub.lagged and sub.queue.empty():
                    yield _LAGGED
                    return
                items = [await sub.queue.get()]  # the hub queues keepalives too
                while items[-1] is not None and len(items) < CHUNK_MAX and not sub.queue.empty():
                    items.append(sub.queue.get_nowait())  # several waiting: one write
                text = b"".join(item for item in items if item is not None)
                if text:
                    yield text
                if items[-1] is None:
                    if sub.revoked:
                        yield _REVOKED
                    return
        finally:
            hub.unsubscribe(sub)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _LiveResponse(events(), lambda: hub.unsubscribe(sub), headers)
