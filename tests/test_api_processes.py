"""Several API processes against one database: what must hold when ``molo api`` runs more than one
(docs/architecture.md, "Growing"). Real processes (``molo api`` as a child process) on the test
PostgreSQL; the reservation sweeper's test adds the project's Mosquitto.

- A revoked key stops working in every process at once, although each caches key lookups, and its
  open live streams in every process end (the ``molo_keys`` notification, migration 0011).
- Every live stream of every process gets every notification, in commit order.
- Of several processes' periodic reservation sweeps one runs at a time, and an overdue hold gets
  one release, not one per process.
- ``molo api --workers 2`` runs two worker processes on one port.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from backend.access.keys import NewKey, Role
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.couriers import service
from backend.couriers.repository import try_session_lock, unlock_session
from backend.operations.live import LiveEvent, notify
from bench.processes import wait_ready
from molo.brokers import RunningBroker, free_port
from molo.cli import main as molo_main
from molo.provision import Credentials
from tests.fixtures.keys import Headers, headers
from tests.fixtures.pipeline import settings_for, wait_for
from tests.test_couriers import _insert_hold, seed_box, spot
from tests.test_operations import read_events


class ApiProcess:
    """``molo api`` in a child process on a free port, with the test database and no broker."""

    def __init__(self, database_url: str, *, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")}
        environ |= {"MOLO_DATABASE_URL": database_url, "MOLO_RESERVATION_SWEEP_INTERVAL_S": "0", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "api", "--port", str(self.port),
             "--workers", str(workers)],
            env=environ,
        )  # fmt: skip
        wait_ready(self.url, self.proc)

    def workers(self) -> list[int]:
        """The worker processes under uvicorn's supervisor (not multiprocessing's resource tracker)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        out = []
        for pid in children:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def two_apis(database_url: str) -> Iterator[list[ApiProcess]]:
    """Two API processes (each its own pool, key cache and live-stream listener); the streams' key
    check every 30 s, so a stream ended sooner was ended by the notification."""
    apis = [ApiProcess(database_url, MOLO_STREAM_KEEPALIVE_S="30") for _ in range(2)]
    yield apis
    for api in apis:
        api.stop()


def _cache_lookups(api: ApiProcess) -> dict[str, float]:
    text = httpx.get(f"{api.url}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("molo_api_key_lookups_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            out[source] = float(line.rsplit(" ", 1)[1])
    return out


class Stream:
    """An open live stream in a thread: its events, as they come."""

    def __init__(self, url: str, key: Headers, until: Callable[[str, dict[str, Any]], bool]) -> None:
        self.events: list[tuple[str, Any]] = []
        self.hello = threading.Event()
        self.error: BaseException | None = None
        self._url, self._key, self._until = url, key, until
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with (
                httpx.Client(base_url=self._url, timeout=30, headers=self._key) as client,
                client.stream("GET", "/api/v1/stream") as response,
            ):
                assert response.status_code == 200
                lines = response.iter_lines()
                self.events += read_events(lines, lambda e, d: e == "hello")
                self.hello.set()
                self.events += read_events(lines, self._until)
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.hello.set()

    def join(self, timeout: float) -> list[tuple[str, Any]]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stream did not end; saw {self.events}"
        assert self.error is None, self.error
        return self.events


def test_a_revocation_takes_effect_at_once_in_every_process_despite_the_key_cache(
    two_apis: list[ApiProcess], make_key: Callable[..., NewKey], database_url: str
) -> None:
    """Both processes answer a key's requests from their key cache; `molo keys revoke` makes both
    answer 401 revoked_api_key within a second, and ends the key's open stream in each (with event
    revoked, long before the 30 s key check)."""
    key = make_key(Role.OPERATOR)
    for api in two_apis:
        for _ in range(5):
            assert httpx.get(f"{api.url}/api/v1/boxes", headers=headers(key), timeout=10).status_code == 200
        assert _cache_lookups(api).get("cache", 0) >= 4  # the first went to the database
    streams = [Stream(api.url, headers(key), lambda e, d: e == "revoked") for api in two_apis]
    for s in streams:
        assert s.hello.wait(10)
    started = time.monotonic()
    assert molo_main(["keys", "--database-url", database_url, "revoke", key.key_id]) == 0

    def refused_everywhere() -> bool:
        codes = [
            httpx.get(f"{api.url}/api/v1/boxes", headers=headers(key), timeout=10).json().get("error", {}).get("code")
            for api in two_apis
        ]
        return codes == ["revoked_api_key", "revoked_api_key"]

    wait_for(refused_everywhere, timeout=5.0, interval=0.02)
    assert time.monotonic() - started < 1.0
    for s in streams:
        assert s.join(5)[-1] == ("revoked", {"reason": "the API key was revoked"})
    assert time.monotonic() - started < 5.0


def test_every_stream_of_every_process_gets_every_notification_in_order(
    two_apis: list[ApiProcess], api_keys: dict[str, Headers], db: psycopg.Connection[Any]
) -> None:
    """Three streams on each of two processes; 100 committed notifications (and one rolled back)
    reach all six, each exactly once and in commit order."""
    n = 100
    streams = [
        Stream(api.url, api_keys["operator"], lambda e, d: e == "box.status" and d["session"] == n - 1)
        for api in two_apis
        for _ in range(3)
    ]
    for s in streams:
        assert s.hello.wait(10)
    with psycopg.connect(db.info.dsn) as conn:
        for i in range(n):
            with conn.transaction():
                notify(
                    conn, LiveEvent.BOX_STATUS, {"box_id": "proc-1", "online": True, "reason": "birth", "session": i}
                )
            if i == 50:  # rolled back: never delivered
                conn.execute("BEGIN")
                notify(conn, LiveEvent.BOX_STATUS, {"box_id": "proc-1", "session": -1})
                conn.rollback()
    for s in streams:
        sessions = [d["session"] for e, d in s.join(20) if e == "box.status"]
        assert sessions == list(range(n))


def test_one_periodic_pass_at_a_time(database_url: str) -> None:
    """While one connection holds the periodic pass's lock, another process's pass is skipped
    (False); once it is given back, the other's pass runs (True)."""
    ctx = service.CommandContext(sender=None, timeout_s=5.0)

    async def check() -> None:
        async with (
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as first,
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as second,
        ):
            assert await try_session_lock(first, service.PERIODIC_LOCK_KEY)
            assert await service.periodic_pass(second, ctx, max_attempts=3, retry_s=1.0) is False
            await unlock_session(first, service.PERIODIC_LOCK_KEY)
            assert await service.periodic_pass(second, ctx, max_attempts=3, retry_s=1.0) is True
            assert await service.periodic_pass(first, ctx, max_attempts=3, retry_s=1.0) is True  # it let go

    asyncio.run(check())


def test_two_sweeping_apis_send_one_release_per_overdue_hold(
    database_url: str, broker: RunningBroker, credentials: Credentials, db: psycopg.Connection[Any]
) -> None:
    """Two API instances with the broker, each sweeping every 0.2 s: twelve overdue holds each get
    exactly one release_compartment command (one attempt), not one per API."""
    seed_box(db, "proc-sweep", *spot())
    overdue = [_insert_hold(db, "proc-sweep", door, expires_s=-1) for door in range(3, 15)]
    servers = [
        ApiServer(create_app(settings_for(database_url, broker, credentials, reservation_sweep_interval_s=0.2))).start()
        for _ in range(2)
    ]
    try:
        done = """SELECT count(*) FROM reservations
                  WHERE reservation_id = ANY(%s::uuid[]) AND release_command_id IS NOT NULL"""
        wait_for(lambda: db.execute(done, (overdue,)).fetchone() == (12,), timeout=20)
        time.sleep(1.0)  # several more passes of both: nothing is sent twice
    finally:
        for server in servers:
            server.stop()
    releases = db.execute(
        "SELECT count(*), count(DISTINCT compartment) FROM commands"
        " WHERE box_id = 'proc-sweep' AND action = 'release_compartment'"
    ).fetchone()
    assert releases == (12, 12)
    attempts = db.execute(
        "SELECT DISTINCT release_attempts FROM reservations WHERE reservation_id = ANY(%s::uuid[])", (overdue,)
    ).fetchall()
    assert attempts == [(1,)]


def test_molo_api_workers_runs_that_many_processes_on_one_port(database_url: str, api_keys: dict[str, Headers]) -> None:
    """`molo api --workers 2`: two worker processes under uvicorn's supervisor; fresh connections
    (spread over both by the kernel) are all answered; stopping it stops both."""
    api = ApiProcess(database_url, workers=2)
    try:
        wait_for(lambda: len(api.workers()) == 2, timeout=20)
        workers = api.workers()
        for _ in range(20):
            with httpx.Client(base_url=api.url, timeout=10, headers=api_keys["operator"]) as client:
                assert client.get("/api/v1/boxes").status_code == 200
    finally:
        api.stop()
    assert api.proc.returncode == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
