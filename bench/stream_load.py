"""Live streams under load (issue 9): many open ``GET /api/v1/stream`` clients while ``GET
/api/v1/boxes`` is measured open loop, and every stream must receive every event.

Method (printed with the results):
- A fresh database on the local PostgreSQL (or MOLO_BENCH_DATABASE_URL as admin URL), migrated on
  the plain path, with ``--boxes`` boxes registered (so the box list has rows to read).
- The API as its own process (``molo api``: uvicorn, one worker, pool of 10 connections) on
  127.0.0.1, keepalive and key check every 5 s, reservation sweep every 1 s, default stream limits.
- ``--streams`` streams, all opened at once, over ``--keys`` researcher keys (streams / keys each:
  20 for the defaults, the default per-key limit), one in ten filtered to one box (``?box_id=``),
  read by plain asyncio sockets (HTTP/1.1, chunked) in the measuring process. All are open and past
  ``hello`` before anything is measured.
- For ``--duration`` s, **open loop**, from a separate client process (so reading the streams does
  not delay it): ``GET /api/v1/boxes`` as an operator at ``--rate`` per second on a fixed schedule,
  sent whether or not earlier ones returned (httpx, keep-alive connections of its own); latency runs
  from the *scheduled* send time to the full response, so a stall counts for every request it
  delays.
- Over the same window another thread commits ``--events`` live events per second, each in its own
  transaction through ``backend.operations.live.notify`` (``box.status``, alternating two boxes,
  ``session`` = the event's sequence number).
- Afterwards every stream's received sequence numbers are compared with what was sent for it: it
  must have all of them, in order, none twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import psycopg

from backend.operations import live
from bench.processes import wait_ready

#: The two boxes the events alternate between; filtered streams follow the first.
EVENT_BOXES = ("stl-ev-a", "stl-ev-b")


def raise_open_file_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (at most the hard limit): every stream
    is a socket here (and one in the API process, which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def register_boxes(url: str, n: int) -> None:
    """``n`` boxes (``stl-001`` ...) for the box list to read."""
    rows = [(f"stl-{i:03d}", f"load {i}", 57.0 + i / 1000, 9.9 + i / 1000, 40) for i in range(1, n + 1)]
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO boxes (box_id, name, latitude, longitude, households) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (box_id) DO NOTHING",
            rows,
        )


@contextmanager
def api_process(database_url: str, **settings: str) -> Iterator[str]:
    """``molo api`` as its own process on a free port, with ``MOLO_<NAME>`` settings; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")} | {"MOLO_DATABASE_URL": database_url}
    env |= {f"MOLO_{name.upper()}": value for name, value in settings.items()}
    api = subprocess.Popen(
        [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "api", "--port", str(port)], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, api, timeout=120, path="/health")
        yield base
    finally:
        api.terminate()
        try:
            api.wait(15)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


# --------------------------------------------------------------------------- the streams


@dataclass(eq=False)
class StreamClient:
    """One SSE client on a plain socket: what it received."""

    token: str
    box_id: str | None
    status: int | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[int] = field(default_factory=list)  # sessions of the load events, in order
    other_events: Counter[str] = field(default_factory=Counter)
    body: str = ""  # of a refusal
    headers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    error: str | None = None

    def _event(self, event: str, data: str) -> None:
        if event == "hello":
            self.hello.set()
            return
        if event == "box.status":
            payload = json.loads(data)
            if payload["box_id"] in EVENT_BOXES:
                self.received.append(payload["session"])
                return
        self.other_events[event] += 1

    async def run(self, base_url: str) -> None:
        """Open the stream and read it until the server ends it (or this task is cancelled)."""
        parts = urlsplit(base_url)
        query = f"?{urlencode({'box_id': self.box_id})}" if self.box_id else ""
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
            writer.write(
                f"GET /api/v1/stream{query} HTTP/1.1\r\nHost: {parts.netloc}\r\nX-API-Key: {self.token}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            status_line = await reader.readline()
            self.status = int(status_line.split()[1])
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                self.headers[name.strip().lower()] = value.strip()
            chunked = self.headers.get("transfer-encoding") == "chunked"
            if self.status != 200:
                size = int(self.headers.get("content-length", "0"))
                self.body = (await reader.readexactly(size)).decode() if size else ""
                return
            event, data, pending = "message", "", ""
            while True:
                if chunked:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        break
                    text = (await reader.readexactly(size + 2))[:-2].decode()
                else:
                    raw = await reader.read(65536)
                    if not raw:
                        break
                    text = raw.decode()
                lines = (pending + text).split("\n")
                pending = lines.pop()
                for line_ in lines:
                    if line_.startswith("event:"):
                        event = line_[6:].strip()
                    elif line_.startswith("data:"):
                        data = line_[5:].strip()
                    elif line_ == "":
                        if data:
                            self._event(event, data)
                        event, data = "message", ""
            self.ended = True
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if writer is not None:
                writer.close()


async def open_streams(base_url: str, clients: list[StreamClient], timeout: float = 60.0) -> list[asyncio.Task[None]]:
    """Start every client at once; return their tasks when all are past ``hello`` (else RuntimeError)."""
    tasks = [asyncio.create_task(c.run(base_url)) for c in clients]
    waits = [asyncio.create_task(c.hello.wait()) for c in clients]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    if pending:
        for task in [*pending, *tasks]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        errors = Counter(c.error or f"status {c.status}: {c.body[:120]}" for c in clients if not c.hello.is_set())
        raise RuntimeError(f"{len(pending)} of {len(clients)} streams did not reach hello: {dict(errors)}")
    return tasks


async def close_streams(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- requests and events


def measure_open_loop(
    base_url: str, token: str, path: str, rate: float, duration_s: float, start_at: float
) -> tuple[list[float], dict[int, int]]:
    """(latencies in s, status counts) of ``GET path`` sent ``rate`` per second for ``duration_s``
    from wall-clock time ``start_at``, open loop. Runs in a process of its own (see :func:`run_load`)."""

    async def main() -> tuple[list[float], dict[int, int]]:
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=base_url, headers={"X-API-Key": token}, timeout=30.0, limits=limits
        ) as client:
            await client.get(path)  # one warm connection, not measured
            loop = asyncio.get_running_loop()
            t0 = loop.time() + max(0.0, start_at - time.time())

            async def one(i: int) -> None:
                at = t0 + i / rate
                await asyncio.sleep(max(0.0, at - loop.time()))
                try:
                    statuses[(await client.get(path)).status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1
                latencies.append(loop.time() - at)

            await asyncio.gather(*(one(i) for i in range(round(rate * duration_s))))
        return latencies, dict(statuses)

    return asyncio.run(main())


def commit_events(url: str, rate: float, duration_s: float, start_at: float, sent: list[int]) -> None:
    """From wall-clock ``start_at``, commit ``rate`` live events per second for ``duration_s``, each
    in its own transaction, appending each sequence number to ``sent`` once committed."""
    with psycopg.connect(url) as conn:
        t0 = time.monotonic() + max(0.0, start_at - time.time())
        for i in range(round(rate * duration_s)):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with conn.transaction():
                status = live.status_data(EVENT_BOXES[i % 2], i % 4 < 2, "birth", i, None)
                live.notify(conn, live.LiveEvent.BOX_STATUS, status)
            sent.append(i)


@dataclass
class LoadResult:
    """What a run measured: ``latencies_s`` of the box-list requests (from the scheduled send),
    their status codes, and per stream what it was sent and what it received."""

    streams: int
    duration_s: float
    rate: float
    events_per_s: float
    open_s: float
    latencies_s: list[float]
    statuses: dict[int, int]
    sent: list[int]
    expected: list[list[int]]  # per stream
    received: list[list[int]]  # per stream
    stream_errors: list[str]

    def quantile_ms(self, q: float) -> float:
        """The ``q``-quantile (0-1) of the request latencies, ms (inclusive method)."""
        cuts = statistics.quantiles([x * 1000 for x in self.latencies_s], n=1000, method="inclusive")
        return cuts[min(len(cuts) - 1, max(0, round(q * 1000) - 1))]

    @property
    def exact_streams(self) -> int:
        """Streams that received exactly the events meant for them, in order, none twice."""
        return sum(1 for want, got in zip(self.expected, self.received, strict=True) if want == got)

    def lines(self) -> list[str]:
        late = sum(1 for x in self.latencies_s if x > 0.1)
        deliveries = sum(len(got) for got in self.received)
        return [
            f"streams: {self.streams}, all open and past hello {self.open_s:.1f} s after the first was sent",
            f"GET /api/v1/boxes: {len(self.latencies_s)} requests, {self.rate:g}/s open loop for"
            f" {self.duration_s:g} s; status {dict(sorted(self.statuses.items()))}",
            f"  latency from the scheduled send: p50 {self.quantile_ms(0.5):.1f} ms, p90 {self.quantile_ms(0.9):.1f}"
            f" ms, p99 {self.quantile_ms(0.99):.1f} ms, max {max(self.latencies_s) * 1000:.1f} ms;"
            f" over 100 ms: {late}",
            f"events: {len(self.sent)} committed, {self.events_per_s:g}/s; {deliveries:,} delivered;"
            f" streams with exactly their events: {self.exact_streams}/{self.streams}",
            *([f"stream errors: {self.stream_errors[:5]}"] if self.stream_errors else []),
        ]


async def run_load(
    base_url: str,
    database_url: str,
    stream_tokens: list[str],
    request_token: str,
    *,
    streams: int = 500,
    duration_s: float = 60.0,
    rate: float = 20.0,
    events_per_s: float = 5.0,
    settle_s: float = 20.0,
) -> LoadResult:
    """Open ``streams`` streams (round-robin over ``stream_tokens``; every tenth filtered to the first
    event box), then for ``duration_s`` measure the box list open loop (in a child process) while
    events are committed; wait up to ``settle_s`` for the last events to arrive, then close all."""
    clients = [
        StreamClient(stream_tokens[i % len(stream_tokens)], EVENT_BOXES[0] if i % 10 == 9 else None)
        for i in range(streams)
    ]
    started = time.monotonic()
    tasks = await open_streams(base_url, clients)
    open_s = time.monotonic() - started
    loop = asyncio.get_running_loop()
    sent: list[int] = []
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            start_at = time.time() + 3.0  # the child's interpreter and httpx start meanwhile
            measured = loop.run_in_executor(
                pool, measure_open_loop, base_url, request_token, "/api/v1/boxes", rate, duration_s, start_at
            )
            committed = asyncio.to_thread(commit_events, database_url, events_per_s, duration_s, start_at, sent)
            (latencies, statuses), _ = await asyncio.gather(measured, committed)
        expected = [[i for i in sent if c.box_id is None or EVENT_BOXES[i % 2] == c.box_id] for c in clients]
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and any(
            len(c.received) < len(want) and not c.ended and c.error is None
            for c, want in zip(clients, expected, strict=True)
        ):
            await asyncio.sleep(0.1)
    finally:
        await close_streams(tasks)
    errors = [f"stream {i}: {c.error or 'ended early'}" for i, c in enumerate(clients) if c.error or c.ended]
    return LoadResult(
        streams=streams,
        duration_s=duration_s,
        rate=rate,
        events_per_s=events_per_s,
        open_s=open_s,
        latencies_s=latencies,
        statuses=statuses,
        sent=sent,
        expected=expected,
        received=[list(c.received) for c in clients],
        stream_errors=errors,
    )


def _run_load_blocking(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LoadResult:
    return asyncio.run(run_load(*args, **kwargs))


def run_load_in_fresh_process(*args: Any, **kwargs: Any) -> LoadResult:
    """``run_load`` in a new interpreter (spawned): the stream readers and the event committer then
    share a process with nothing else, e.g. not with threads a test session left running, so what
    is measured is the API. Takes ``run_load``'s arguments."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_load_blocking, args, kwargs).result()


def main() -> int:
    from backend.access.keys import Role, create_key
    from backend.migrate import migrate
    from backend.settings import TimescaleMode
    from molo.postgres import create_database, drop_database

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--keys", type=int, default=25)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="box-list requests per second")
    parser.add_argument("--events", type=float, default=5.0, help="live events committed per second")
    parser.add_argument("--boxes", type=int, default=50)
    args = parser.parse_args()
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(__doc__)
    print(
        f"settings: streams={args.streams} keys={args.keys} duration={args.duration:g} s rate={args.rate:g}/s"
        f" events={args.events:g}/s boxes={args.boxes}\n",
        flush=True,
    )
    raise_open_file_limit(2 * args.streams + 1000)
    url = create_database(admin, "molo_bench_stream")
    try:
        migrate(url, TimescaleMode.OFF)
        register_boxes(url, args.boxes)
        with psycopg.connect(url, autocommit=True) as conn:
            tokens = [create_key(conn, role=Role.RESEARCHER, name=f"bench {i}").token for i in range(args.keys)]
            operator = create_key(conn, role=Role.OPERATOR, name="bench operator").token
        with api_process(url, stream_keepalive_s="5", reservation_sweep_interval_s="1") as base:
            result = asyncio.run(
                run_load(
                    base,
                    url,
                    tokens,
                    operator,
                    streams=args.streams,
                    duration_s=args.duration,
                    rate=args.rate,
                    events_per_s=args.events,
                )
            )
        print("\n".join(result.lines()), flush=True)
        return 0 if result.exact_streams == result.streams and set(result.statuses) == {200} else 1
    finally:
        drop_database(url, admin)


if __name__ == "__main__":
    raise SystemExit(main())
