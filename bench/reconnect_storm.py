"""Reconnect storm: 5,000 live boxes, the broker killed and restarted; how long until every box is
online again in the API, how the API answers meanwhile, and what each process costs.

Method: Mosquitto with broker_config (its own credentials), one ingest worker process (`molo
ingest`), the API process (`molo api`), and the boxes from `molo boxes` (the fleet: one BoxLoop per
process, 2,000 boxes a process; 0.01 events/s per box plus telemetry every 15 s), all on this
machine with PostgreSQL. Once every box is online in `GET /api/v1/box-status`, the broker gets
SIGKILL and is started again 1 s later. From the restart on, `GET /api/v1/box-status` is requested
open loop at a fixed rate (each request sent on its schedule whether or not earlier ones returned;
latency measured from the scheduled time), and the time from the restart until the API shows every
box online with a newer session (it reconnected) is taken. Then: the alerts left open, the monitor
sweep's time (20 sweeps on the same database) and the time of `GET /api/v1/boxes` and
`GET /api/v1/box-status` (10 each, one at a time); then the boxes stop, and what is stored is checked
per box: events and telemetry share a box's seq space and `(box, seq)` is the key, so rows 1..n with no
hole mean nothing was lost and nothing stored twice.

Run: `uv run python bench/reconnect_storm.py [--boxes 5000] [--rate 10]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from backend.access.keys import Role, create_key
from backend.migrate import migrate
from backend.operations.alerts import AlertRules
from backend.operations.monitor import sweep
from backend.settings import TimescaleMode
from bench.lean_boxes import cpu_seconds
from bench.processes import stop_processes
from firmware_stub.db import DB_FILE
from molo.brokers import free_port, start_mosquitto
from molo.postgres import create_database, drop_database
from molo.provision import box_ids, provision


def sessions(client: httpx.Client) -> dict[str, int]:
    """Box id -> session of every box the API shows online."""
    response = client.get("/api/v1/box-status", params={"online": "true"})
    response.raise_for_status()  # a 503 under load is an answer too: counted as not yet
    return {b["box_id"]: int(b["session"]) for b in response.json() if b["online"]}


def online_count(client: httpx.Client) -> int:
    return len(sessions(client))


async def open_loop(url: str, headers: dict[str, str], rate: float, seconds: float) -> tuple[list[float], int]:
    """GET /api/v1/boxes at ``rate`` per second for ``seconds``: latencies (ms) from the schedule, and
    how many failed (a timeout of 30 s or an error status; their latency counts as measured)."""
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:

        async def one(scheduled: float) -> None:
            nonlocal failed
            try:
                response = await client.get("/api/v1/box-status")
                failed += response.status_code != 200
            except httpx.HTTPError:
                failed += 1
            latencies.append((time.monotonic() - scheduled) * 1000)

        start = time.monotonic()
        tasks = []
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    return latencies, failed


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def timed(client: httpx.Client, path: str, n: int) -> tuple[float, int]:
    """Median seconds of ``n`` GETs of ``path`` one at a time, and the size of the answer."""
    times, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(path)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        size = len(response.content)
    return statistics.median(times), size


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=5000)
    parser.add_argument(
        "--rate", type=float, default=2.0, help="GET /api/v1/box-status per second during the storm (default 2)"
    )
    parser.add_argument("--storm-seconds", type=float, default=60.0)
    parser.add_argument("--ingest-workers", type=int, default=1, help="molo ingest processes (shared subscription)")
    parser.add_argument("--api-workers", type=int, default=1, help="molo api --workers N")
    args = parser.parse_args()
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = create_database(admin, "molo_bench_storm")
    work = Path(tempfile.mkdtemp(prefix="molo-storm-"))
    ids = box_ids(args.boxes, prefix="stm")
    ingest_users = [f"ingest-{i}" for i in range(1, args.ingest_workers + 1)]
    creds = provision(work / "creds", ids, service_users=(*ingest_users, "api"))
    broker = start_mosquitto(work / "broker", creds)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        migrate(url, TimescaleMode.OFF)
        with psycopg.connect(url, autocommit=True) as conn:
            token = create_key(conn, role=Role.OPERATOR, name="storm").token
        headers = {"X-API-Key": token}
        env = {
            **os.environ,
            "MOLO_DATABASE_URL": url,
            "MOLO_MQTT_HOST": broker.host,
            "MOLO_MQTT_PORT": str(broker.port),
            "MOLO_CREDENTIALS_FILE": str(creds.path),
        }
        cli = [sys.executable, "-m", "molo.cli", "--log-level", "ERROR"]
        for user in ingest_users:
            procs[user] = subprocess.Popen(
                [*cli, "ingest"], env={**env, "MOLO_MQTT_USERNAME": user, "MOLO_WORKER_ID": f"storm-{user}"}
            )
        port = free_port()
        procs["api"] = subprocess.Popen(
            [*cli, "api", "--port", str(port), "--workers", str(args.api_workers)],
            env={**env, "MOLO_MQTT_USERNAME": "api"},
            stdout=subprocess.DEVNULL,
        )
        api_url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        procs["boxes"] = subprocess.Popen(
            [
                *cli,
                "boxes",
                "--count",
                str(args.boxes),
                "--prefix",
                "stm",
                "--credentials",
                str(creds.path),
                "--state-dir",
                str(work / "state"),
                "--rate",
                "0.01",
            ],
            env=env,
        )
        with httpx.Client(base_url=api_url, headers=headers, timeout=30) as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    if online_count(client) == args.boxes:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            first_online = time.monotonic() - started
            print(f"{args.boxes} boxes online in the API {first_online:.1f} s after `molo boxes` started")
            pids = {name: p.pid for name, p in procs.items() if name not in ("boxes", "api")}
            api_children = children(procs["api"].pid) if args.api_workers > 1 else []
            pids |= {f"api[{i}]": child for i, child in enumerate(api_children)} or {"api": procs["api"].pid}
            for i, child in enumerate(children(procs["boxes"].pid) or [procs["boxes"].pid]):
                pids[f"boxes[{i}]"] = child
            memory = {name: rss_mb(pid) for name, pid in pids.items()}
            broker_pid = broker.pid
            assert broker_pid is not None
            memory["mosquitto"] = rss_mb(broker_pid)

            before = sessions(client)  # every box is online here (checked above)
            broker.kill()
            time.sleep(1.0)
            broker.start()
            restarted = time.monotonic()
            assert broker.pid is not None
            pids["mosquitto"] = broker.pid
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            loop = asyncio.new_event_loop()
            future = loop.run_in_executor(
                None, lambda: asyncio.run(open_loop(api_url, headers, args.rate, args.storm_seconds))
            )
            back: float | None = None
            timeline: list[tuple[float, int]] = []  # (seconds after the restart, boxes back)
            # Back = online in the API with a newer session than before the crash (a box reconnecting
            # takes a new session; its old "online" is only stale until the heartbeat timeout).
            while time.monotonic() - restarted < args.storm_seconds + 120:
                try:
                    now = sessions(client)
                    timeline.append(
                        (time.monotonic() - restarted, sum(1 for b, s in now.items() if s > before.get(b, 0)))
                    )
                    if timeline[-1][1] == args.boxes:
                        back = time.monotonic() - restarted
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            cpu_storm = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            latencies, failed = loop.run_until_complete(future)
            loop.close()
            time.sleep(5)  # the ingest's sweep runs every few seconds: give it one after the storm
            with psycopg.connect(url, autocommit=True) as conn:
                left_open: dict[str, int] = dict(
                    conn.execute("SELECT kind, count(*) FROM alerts WHERE cleared_at IS NULL GROUP BY kind").fetchall()
                )
                raised = conn.execute("SELECT count(*) FROM alerts").fetchone()
                rules = AlertRules()
                sweeps = []
                for _ in range(20):
                    started_sweep = time.perf_counter()
                    sweep(conn, rules)
                    sweeps.append(time.perf_counter() - started_sweep)
            list_s, list_bytes = timed(client, "/api/v1/boxes", 10)
            status_s, status_bytes = timed(client, "/api/v1/box-status", 10)
        procs["boxes"].send_signal(15)
        procs["boxes"].wait(120)
        with psycopg.connect(url, autocommit=True) as conn:
            time.sleep(3)
            rows = conn.execute(
                "SELECT box_id, count(*), max(seq) FROM (SELECT box_id, seq FROM events UNION ALL "
                "SELECT box_id, seq FROM telemetry) s GROUP BY box_id"
            ).fetchall()
            stored_seqs: dict[str, set[int]] = {
                b: set(seqs)
                for b, seqs in conn.execute(
                    "SELECT box_id, array_agg(seq) FROM (SELECT box_id, seq FROM events UNION ALL "
                    "SELECT box_id, seq FROM telemetry) s GROUP BY box_id"
                ).fetchall()
            }
            state: dict[str, int] = dict(conn.execute("SELECT box_id, last_seq FROM box_state").fetchall())
        # Events and telemetry share a box's seq space: stored seqs 1..max without a hole = nothing lost.
        gaps = [b for b, n, top in rows if n != top]
        # A hole is not a loss while the box still holds the row: it is sent again at its next start.
        # A seq neither stored nor in the box's outbox is lost.
        lost: dict[str, list[int]] = {}
        pending = 0
        for box_id, _, top in rows:
            with contextlib.closing(sqlite3.connect(work / "state" / box_id / DB_FILE)) as db:
                held = {seq for (seq,) in db.execute("SELECT seq FROM outbox")}
            pending += len(held)
            missing = set(range(1, top + 1)) - stored_seqs[box_id] - held
            if missing:
                lost[box_id] = sorted(missing)
        print(
            f"{len(ingest_users)} ingest worker(s), {args.api_workers} API process(es); "
            f"method: SIGKILL of Mosquitto with {args.boxes} boxes online, restart after 1 s; "
            f"GET /api/v1/box-status open loop at {args.rate:g}/s for {args.storm_seconds:g} s from the restart"
        )
        when = f"{back:.1f} s after the restart" if back is not None else "not within the window"
        print(f"all {args.boxes} boxes online again in the API: {when}")
        marks = []
        for share in (0.5, 0.9, 0.99):
            hit = next((t for t, n in timeline if n >= share * args.boxes), None)
            marks.append(f"{share:.0%} by {hit:.1f} s" if hit is not None else f"{share:.0%} not reached")
        print("back online with a new session: " + ", ".join(marks))
        print(
            f"GET /api/v1/box-status during the storm: n={len(latencies)} p50 {pct(latencies, 50):.0f} ms, "
            f"p99 {pct(latencies, 99):.0f} ms, max {max(latencies):.0f} ms, failed or timed out (30 s) {failed}"
        )
        print(
            f"events and telemetry stored: {sum(n for _, n, _ in rows)} over {len(rows)} boxes; boxes with a hole "
            f"in their seqs: {len(gaps)}; boxes whose newest seq is not stored: "
            f"{sum(1 for b, _, top in rows if state.get(b, top) != top)}; rows still in the boxes' outboxes "
            f"(sent at their next start): {pending}; seqs neither stored nor held by their box (lost): "
            f"{sum(map(len, lost.values()))} over {len(lost)} boxes {dict(list(lost.items())[:3])}"
        )
        print(
            f"alerts: {raised[0] if raised else 0} raised in the whole run, open at the end: "
            + (", ".join(f"{k} {v}" for k, v in sorted(left_open.items())) or "none")
        )
        print(
            f"monitor sweep at {args.boxes} boxes: median {statistics.median(sweeps) * 1000:.1f} ms, "
            f"max {max(sweeps) * 1000:.1f} ms (20 sweeps, one after another, after the storm)"
        )
        print(
            f"GET /api/v1/boxes: median {list_s * 1000:.0f} ms, {list_bytes / 1e6:.2f} MB; "
            f"GET /api/v1/box-status: median {status_s * 1000:.0f} ms, {status_bytes / 1e6:.2f} MB (10 each, in turn)"
        )
        print("RSS before the storm (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
        print(
            "CPU seconds from the restart until every box was back: "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu_storm.items())
            + " (PostgreSQL not counted)"
        )
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
        return 0
    finally:
        stop_processes(procs.values())
        broker.stop()
        drop_database(url, admin)
        shutil.rmtree(work, ignore_errors=True)  # thousands of box outboxes, broker data


if __name__ == "__main__":
    raise SystemExit(main())
