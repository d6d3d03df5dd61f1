"""Latency of the courier free-capacity query under concurrent load, for 50 and 5,000 boxes.

Method (printed with the results):
- A fresh database per fleet size on the local PostgreSQL (or MOLO_BENCH_DATABASE_URL as admin
  URL), migrated on the plain path, seeded directly: ``--boxes`` boxes spread uniformly over
  Aalborg (lat 57.00-57.08, lon 9.85-10.02, about 8.9 x 10.3 km), each with the default layout (2
  red boxes, 4 A, 6 B, 4 C doors), a latest state row (online, seen now, each parcel door occupied
  with probability 0.5, out of service with 0.02), and active holds on 5% of the boxes (one door each).
- The API as its own process (``molo api``, uvicorn, one worker, pool of 10 connections), on
  127.0.0.1, authenticated with a courier key (each request checks it against the database).
- Load: ``--clients`` concurrent clients (asyncio + httpx, each one request at a time, keep-alive),
  ``--requests`` requests after ``--warmup`` unmeasured ones: GET /api/v1/courier/capacity at a
  random point in the area, radius ``--radius`` m, size class drawn from A/B/C, limit 20.
  Latency = client-side time from sending to the full response; throughput = requests / wall time.
- Also the SQL alone: the same query run back to back on one connection (no HTTP), median.
- ``--no-index`` drops the latitude/longitude index first, to show what it is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import psycopg

from backend.access.keys import Role, create_key
from backend.couriers.fit import bounding_box, fitting_sizes
from backend.couriers.repository import _CAPACITY
from backend.migrate import migrate
from backend.settings import TimescaleMode
from bench.processes import wait_ready
from contract import SizeClass, default_layout
from molo.brokers import free_port
from molo.postgres import create_database, drop_database

AREA = (57.00, 57.08, 9.85, 10.02)


@dataclass
class Result:
    boxes: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    rps: float
    sql_ms: float
    mean_results: float


def seed(url: str, boxes: int, rng: random.Random) -> None:
    layout = default_layout()
    parcel = [c.id for c in layout.parcel_compartments]
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor().copy("COPY boxes (box_id, name, latitude, longitude, layout) FROM STDIN") as copy:
            for i in range(boxes):
                lat, lon = rng.uniform(AREA[0], AREA[1]), rng.uniform(AREA[2], AREA[3])
                copy.write_row((f"b-{i:05d}", f"Bench box {i}", lat, lon, layout.model_dump_json()))
        with conn.cursor().copy(
            "COPY box_state (box_id, status_online, status_session, status_reason, status_changed_at,"
            " last_received_at, last_seen_at, compartments, red_boxes) FROM STDIN"
        ) as copy:
            for i in range(boxes):
                readings = [
                    {
                        "id": c.id,
                        "occupied": c.id in parcel and rng.random() < 0.5,
                        "door_open": False,
                        "in_service": rng.random() >= 0.02,
                    }
                    for c in layout.compartments
                ]
                copy.write_row((f"b-{i:05d}", True, 1, "birth", "now", "now", "now", json.dumps(readings), "[]"))
        with conn.cursor().copy(
            "COPY reservations (reservation_id, box_id, compartment, size_class, carrier, parcel_id, created_by,"
            " expires_at) FROM STDIN"
        ) as copy:
            for i in rng.sample(range(boxes), max(1, boxes // 20)):
                door = rng.choice(layout.parcel_compartments)
                copy.write_row(
                    (
                        f"00000000-0000-4000-8000-{i:012d}",
                        f"b-{i:05d}",
                        door.id,
                        door.size_class,
                        "gls",
                        f"BENCH-{i}",
                        "bench",
                        "2100-01-01T00:00:00Z",
                    )
                )
        conn.execute("VACUUM ANALYZE")


def point(rng: random.Random) -> tuple[float, float]:
    return rng.uniform(AREA[0], AREA[1]), rng.uniform(AREA[2], AREA[3])


def sql_alone(url: str, radius: float, n: int, rng: random.Random) -> tuple[float, float]:
    times: list[float] = []
    found: list[int] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            lat, lon = point(rng)
            sizes = [s.value for s in fitting_sizes(rng.choice(list(SizeClass)))]
            bbox = bounding_box(lat, lon, radius)
            params = {
                "lat": lat,
                "lon": lon,
                "radius": radius,
                "lat_min": bbox[0],
                "lat_max": bbox[1],
                "lon_min": bbox[2],
                "lon_max": bbox[3],
                "sizes": sizes,
                "timeout": 86400.0,
                "limit": 20,
            }
            t = time.perf_counter()
            rows = conn.execute(_CAPACITY, params).fetchall()
            times.append(time.perf_counter() - t)
            found.append(len(rows))
    return statistics.median(times) * 1000, statistics.mean(found)


async def load(
    base: str, key: str, clients: int, requests: int, warmup: int, radius: float, seed_: int
) -> tuple[list[float], float, float]:
    """(latencies in s, requests/s, mean boxes per answer) of the measured phase (after the warm-up)."""
    rng = random.Random(seed_)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    counts: list[int] = []

    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=60, limits=limits) as client:

        async def phase(n: int, record: bool) -> float:
            queue: asyncio.Queue[tuple[float, float, str]] = asyncio.Queue()
            for _ in range(n):
                queue.put_nowait((*point(rng), rng.choice("ABC")))

            async def worker() -> None:
                while not queue.empty():
                    lat, lon, size = queue.get_nowait()
                    t = time.perf_counter()
                    response = await client.get(
                        "/api/v1/courier/capacity",
                        params={"lat": lat, "lon": lon, "radius_m": radius, "size_class": size, "limit": 20},
                    )
                    elapsed = time.perf_counter() - t
                    if response.status_code != 200:
                        raise RuntimeError(f"{response.status_code}: {response.text}")
                    if record:
                        latencies.append(elapsed)
                        counts.append(len(response.json()["boxes"]))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return time.perf_counter() - started

        await phase(warmup, record=False)
        wall = await phase(requests, record=True)
    return latencies, requests / wall, statistics.mean(counts)


def run(admin: str, boxes: int, args: argparse.Namespace) -> Result:
    url = create_database(admin, f"molo_bench_courier_{boxes}")
    api: subprocess.Popen[bytes] | None = None
    try:
        migrate(url, TimescaleMode.OFF)
        seed(url, boxes, random.Random(args.seed))
        if args.no_index:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP INDEX boxes_lat_lon")
        with psycopg.connect(url, autocommit=True) as conn:
            key = create_key(conn, role=Role.COURIER, carrier="gls", name="bench").token
        sql_ms, _ = sql_alone(url, args.radius, 200, random.Random(args.seed + 1))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")} | {
            "MOLO_DATABASE_URL": url,
            "MOLO_HEARTBEAT_TIMEOUT_S": "86400",
        }
        api = subprocess.Popen(
            [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, timeout=30, path="/health")
        latencies, rps, mean_results = asyncio.run(
            load(base, key, args.clients, args.requests, args.warmup, args.radius, args.seed + 2)
        )
        q = statistics.quantiles([x * 1000 for x in latencies], n=100, method="inclusive")
        return Result(
            boxes=boxes,
            p50_ms=q[49],
            p90_ms=q[89],
            p99_ms=q[98],
            max_ms=max(latencies) * 1000,
            rps=rps,
            sql_ms=sql_ms,
            mean_results=mean_results,
        )
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        drop_database(url, admin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", default="50,5000", help="fleet sizes, comma-separated (default 50,5000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--radius", type=float, default=2000.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-index", action="store_true", help="drop the latitude/longitude index first")
    args = parser.parse_args()
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(__doc__)
    print(
        f"settings: clients={args.clients} requests={args.requests} warmup={args.warmup} radius={args.radius:g} m"
        f" index={'dropped' if args.no_index else 'boxes_lat_lon'}\n"
    )
    print("| boxes | p50 ms | p90 ms | p99 ms | max ms | requests/s | SQL alone, median ms | boxes per answer |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.boxes.split(",")):
        r = run(admin, n, args)
        print(
            f"| {r.boxes:,} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.rps:,.0f}"
            f" | {r.sql_ms:.2f} | {r.mean_results:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
