"""Live streams at scale (issue 9): open streams hold no database connection, the limits per key and
in all, shared key lookups when many streams open at once, and 500 streams for a minute while the
API stays responsive and every stream receives every event.

The stream clients are plain asyncio sockets (bench/stream_load.py); events are real ``NOTIFY``s
committed through ``backend.operations.live``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import State
from starlette.requests import Request

from backend.access.keys import NewKey, Role, create_key
from backend.access.repository import revoke_key
from backend.api.app import create_app
from backend.api.auth import authenticate_briefly
from backend.api.errors import ApiError
from backend.api.server import ApiServer
from backend.operations import live
from backend.settings import Settings
from bench.stream_load import (
    EVENT_BOXES,
    StreamClient,
    api_process,
    close_streams,
    open_streams,
    raise_open_file_limit,
    register_boxes,
    run_load_in_fresh_process,
)
from tests.fixtures.database import DatabaseUnderTest, own_database
from tests.fixtures.keys import Headers
from tests.fixtures.pipeline import scalar, wait_for

OVERDUE_HOLD = (
    "INSERT INTO reservations (reservation_id, box_id, compartment, size_class, carrier, parcel_id, created_by,"
    " created_at, expires_at) VALUES (%s, 'stl-001', 3, 'A', 'gls', %s, 'test', now() - interval '2 hours',"
    " now() - interval '1 hour')"
)


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait (without blocking the event loop) until ``condition()`` is truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def notify(database_url: str, session: int) -> None:
    """Commit one live event (``box.status`` of the first load box, ``session`` as its marker)."""
    with psycopg.connect(database_url) as conn, conn.transaction():
        live.notify(conn, live.LiveEvent.BOX_STATUS, live.status_data(EVENT_BOXES[0], True, "birth", session, None))


def hold_status(db: psycopg.Connection[Any], reservation_id: uuid.UUID) -> str:
    row = db.execute("SELECT status FROM reservations WHERE reservation_id = %s", (reservation_id,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def load_boxes(database_url: str, db: psycopg.Connection[Any]) -> Iterator[None]:
    """50 boxes ``stl-001`` ... for the box list to read (and their holds), removed afterwards."""
    register_boxes(database_url, 50)
    yield
    db.execute("DELETE FROM reservations WHERE box_id LIKE 'stl-%'")
    db.execute("DELETE FROM boxes WHERE box_id LIKE 'stl-%'")


@pytest.fixture
def served(database_url: str) -> Iterator[Callable[..., tuple[ApiServer, Any]]]:
    """Serve the API in this process with settings overridden: ``served(db_pool_max=2)`` -> (server, app)."""
    servers: list[ApiServer] = []

    def _serve(**overrides: Any) -> tuple[ApiServer, Any]:
        app = create_app(Settings(database_url=database_url, **overrides))
        servers.append(ApiServer(app).start())
        return servers[-1], app

    yield _serve
    for server in servers:
        server.stop()


def test_streams_beyond_the_pool_size_hold_no_pool_connection(
    served: Callable[..., tuple[ApiServer, Any]],
    database_url: str,
    api_keys: dict[str, Headers],
    db: psycopg.Connection[Any],
    load_boxes: None,
) -> None:
    """With 25 streams open on a pool of 2 connections, every pool connection is free: the box list
    answers 200 at once, the reservation sweep ends an overdue hold, and every stream gets an event."""
    server, app = served(db_pool_max=2, reservation_sweep_interval_s=0.2, stream_max_per_key=50)
    token = api_keys["researcher"]["X-API-Key"]

    async def main() -> None:
        clients = [StreamClient(token, None) for _ in range(25)]
        tasks = await open_streams(server.url, clients)
        try:
            pool = app.state.pool
            await until(lambda: pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"])
            assert app.state.live.open_streams == 25
            async with httpx.AsyncClient(base_url=server.url, headers=api_keys["operator"], timeout=10) as client:
                for _ in range(10):
                    started = time.monotonic()
                    response = await client.get("/api/v1/boxes")
                    assert response.status_code == 200, response.text
                    assert time.monotonic() - started < 1.0  # not the pool's 5 s wait and a 503
            hold = uuid.uuid4()
            db.execute(OVERDUE_HOLD, (hold, f"P-STL-{hold}"))
            await until(lambda: hold_status(db, hold) == "expired", timeout=10)
            await asyncio.to_thread(notify, database_url, 7001)
            await until(lambda: all(c.received == [7001] for c in clients))
            assert all(c.error is None and not c.ended for c in clients)
        finally:
            await close_streams(tasks)

    asyncio.run(main())


def test_stream_limits_per_key_and_in_all(
    served: Callable[..., tuple[ApiServer, Any]], make_key: Callable[..., NewKey]
) -> None:
    """A key over MOLO_STREAM_MAX_PER_KEY gets 429 too_many_streams, anyone over MOLO_STREAM_MAX_TOTAL
    503 streams_full, both in the JSON error shape with Retry-After; a refusal takes no slot, and a
    closed stream gives its slot back."""
    server, app = served(stream_max_per_key=3, stream_max_total=5)
    keys = [make_key(Role.RESEARCHER, name=f"stream limits {i}") for i in range(3)]
    first, second, third = (k.token for k in keys)
    hub = app.state.live

    async def refused(token: str) -> StreamClient:
        client = StreamClient(token, None)
        await asyncio.wait_for(client.run(server.url), 10)
        return client

    async def main() -> None:
        tasks = await open_streams(server.url, [StreamClient(first, None) for _ in range(3)])
        tasks += await open_streams(server.url, [StreamClient(second, None) for _ in range(2)])
        try:
            over_key = await refused(first)
            assert over_key.status == 429
            assert int(over_key.headers["retry-after"]) > 0
            body = json.loads(over_key.body)
            assert body["error"]["code"] == "too_many_streams"
            assert body["error"]["details"] == {"limit": 3}
            assert set(body["error"]) == {"code", "message", "details"}

            full = await refused(third)
            assert full.status == 503
            assert int(full.headers["retry-after"]) > 0
            assert json.loads(full.body)["error"]["code"] == "streams_full"
            assert json.loads(full.body)["error"]["details"] == {"limit": 5}
            assert (hub.open_streams, hub.open_streams_of(keys[0].key_id)) == (5, 3)  # refusals took nothing

            tasks[0].cancel()  # one of the first key's streams goes away
            await until(lambda: hub.open_streams == 4)
            assert hub.open_streams_of(keys[0].key_id) == 2
            tasks += await open_streams(server.url, [StreamClient(third, None)])
            assert (await refused(third)).status == 503
        finally:
            await close_streams(tasks)
        await until(lambda: hub.open_streams == 0)

    asyncio.run(main())


def test_streams_opened_together_share_their_key_lookup(database_url: str, make_key: Callable[..., NewKey]) -> None:
    """Fifty streams authenticating at once with one key borrow the pool once (one lookup shared),
    a bad key is refused to all of them on one lookup too, and a later login looks again (a key
    revoked meanwhile is refused: nothing is cached)."""
    key = make_key(Role.RESEARCHER, name="shared lookup")

    async def main() -> None:
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            database_url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True)
        try:
            app = SimpleNamespace(state=State())
            app.state.pool = pool
            scope = {"type": "http", "method": "GET", "path": "/api/v1/stream", "headers": [], "app": app}
            request = Request(scope)
            pool.pop_stats()

            principals = await asyncio.gather(*(authenticate_briefly(request, key.token) for _ in range(50)))
            assert {p.key_id for p in principals} == {key.key_id}
            assert pool.pop_stats().get("requests_num") == 1

            bad = f"{key.token[:-4]}XXXX"
            refusals = await asyncio.gather(
                *(authenticate_briefly(request, bad) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, ApiError) and r.code == "invalid_api_key" for r in refusals)
            assert pool.pop_stats().get("requests_num") == 1

            with psycopg.connect(database_url, autocommit=True) as conn:
                assert revoke_key(conn, key.key_id)
            with pytest.raises(ApiError) as revoked:
                await authenticate_briefly(request, key.token)
            assert revoked.value.code == "revoked_api_key"
            assert app.state.brief_key_lookups == {}
        finally:
            await pool.close()

    asyncio.run(main())


@pytest.fixture
def load_database(test_database: DatabaseUnderTest, pg_admin_url: str) -> Iterator[str]:
    """A fresh database of the run's flavour holding exactly the 50 load boxes: what the box list
    costs grows with the boxes and state it returns, so the figure below is measured on a fixed
    input, not on whatever this session's earlier tests left in the shared database."""
    with own_database(test_database.flavour, pg_admin_url, "stream_load") as url:
        register_boxes(url, 50)
        yield url


def test_500_streams_for_a_minute_leave_the_api_responsive(load_database: str) -> None:
    """500 streams (25 keys, default limits) open for a minute on `molo api` over 50 boxes:
    GET /api/v1/boxes sent open loop at 20/s answers 200 with p99 under 100 ms (from the scheduled
    send), the API uses no more than its pool of 10, the reservation sweep runs, and every stream
    receives exactly every event meant for it (2 committed per second, in order, none twice)."""
    database_url = load_database
    raise_open_file_limit(4096)
    with psycopg.connect(database_url, autocommit=True) as conn:
        tokens = [create_key(conn, role=Role.RESEARCHER, name=f"stream load {i}").token for i in range(25)]
        operator = create_key(conn, role=Role.OPERATOR, name="stream load operator").token
    hold = uuid.uuid4()
    pooled = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
    most_pooled = 0
    done = threading.Event()

    def watch() -> None:
        """While the load runs: the API's connections, every 0.5 s; after 20 s an overdue hold for the sweep."""
        nonlocal most_pooled
        with psycopg.connect(database_url, autocommit=True) as conn:
            started = time.monotonic()
            held = False
            while not done.wait(0.5):
                most_pooled = max(most_pooled, int(scalar(conn, pooled, ("molo-api",))))
                if not held and time.monotonic() - started > 20:
                    conn.execute(OVERDUE_HOLD, (hold, f"P-STL-{hold}"))
                    held = True

    with api_process(database_url, stream_keepalive_s="5", reservation_sweep_interval_s="1") as base:
        watcher = threading.Thread(target=watch, name="stream-load-watch", daemon=True)
        watcher.start()
        try:
            # The load in a fresh process: this session's other tests may have left threads here.
            result = run_load_in_fresh_process(
                base, database_url, tokens, operator, streams=500, duration_s=60, rate=20, events_per_s=2
            )
        finally:
            done.set()
            watcher.join(timeout=10)
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_for(lambda: hold_status(conn, hold) == "expired", timeout=5)
    assert 0 < most_pooled <= 10  # the pool's size, whatever the number of streams
    print("\n".join(result.lines()))
    assert result.stream_errors == []
    assert result.statuses == {200: 1200}
    assert len(result.sent) == 120
    wrong = [i for i, (want, got) in enumerate(zip(result.expected, result.received, strict=True)) if want != got]
    assert wrong == [], f"{len(wrong)} streams missed, repeated or reordered events, e.g. stream {wrong[:3]}"
    assert result.quantile_ms(0.99) < 100, result.lines()
