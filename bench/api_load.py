"""The API under open-loop load at city scale: couriers' free-capacity query, the box list and the
KPI endpoint, against 5,000 boxes, with one API process and with several.

Method (printed with the results):
- A fresh database on the local PostgreSQL (or ``MOLO_BENCH_DATABASE_URL`` as admin URL), migrated
  on the plain path and seeded as bench/courier_capacity.py does: ``--boxes`` boxes over Aalborg,
  each with the default layout, a latest state (online, doors occupied with probability 0.5) and
  holds on 5% of them.
- The API as ``molo api --workers N`` (uvicorn with uvloop and httptools, one pool of 10
  connections per process, the key cache on), for each N of ``--workers``; courier requests
  carry a courier key, box-list and KPI requests an operator key.
- Load: bench/open_loop.py, an open-loop generator (wrk2's model) in this process on the same two
  cores: requests are due every 1/rate s whatever the server does, and each latency counts from
  when its request was due, so queueing shows. ``--connections`` keep-alive sockets; every request
  pre-encoded. The capacity query goes to a random point of the area (radius ``--radius`` m, size
  A/B/C, limit 20; 2,000 distinct requests cycled). ``boxes`` is the whole box list;
  ``boxes_page`` a page of it (``?limit=100&after=`` a random seeded id; 500 distinct requests).
- Per endpoint: ``--duration`` s at ``--rate`` req/s (after a 3 s warm-up at that rate): p50, p99,
  max; then the rate is raised in steps of ``--step`` (default: the fixed rate) until p99 >
  ``--slo-ms`` or errors appear; the highest rate that kept p99 <= ``--slo-ms``, with the achieved
  rate within 2% of it, is reported.
- CPU: user+system seconds of the API processes and of the generator during each run, from /proc,
  per request; the machine's load average at the start of each run is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import psycopg

from backend.access.keys import Role, create_key
from backend.migrate import migrate
from backend.settings import TimescaleMode
from bench import open_loop
from bench.courier_capacity import point, seed
from bench.processes import wait_ready
from molo.brokers import free_port
from molo.postgres import create_database, drop_database


@dataclass
class Row:
    endpoint: str
    workers: int
    rate: float
    achieved: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    api_cpu_ms: float  # per request
    gen_cpu_ms: float
    errors: int
    load: float


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def requests_for(endpoint: str, port: int, keys: dict[str, str], radius: float, rng: random.Random) -> list[bytes]:
    if endpoint == "capacity":
        out = []
        for _ in range(2000):
            lat, lon = point(rng)
            query = urlencode(
                {"lat": f"{lat:.6f}", "lon": f"{lon:.6f}", "radius_m": radius, "size_class": rng.choice("ABC")}
            )
            target = f"/api/v1/courier/capacity?{query}&limit=20"
            out.append(open_loop.get_request("127.0.0.1", port, target, {"X-API-Key": keys["courier"]}))
        return out
    if endpoint == "boxes_page":  # a page of 100 after a random one of the seeded ids (b-00000 ...)
        return [
            open_loop.get_request(
                "127.0.0.1", port, f"/api/v1/boxes?limit=100&after=b-{rng.randrange(4900):05d}",
                {"X-API-Key": keys["operator"]},
            )
            for _ in range(500)
        ]  # fmt: skip
    target = {"boxes": "/api/v1/boxes", "kpis": "/api/v1/kpis?group_by=week"}[endpoint]
    return [open_loop.get_request("127.0.0.1", port, target, {"X-API-Key": keys["operator"]})]


def start_api(url: str, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")} | {
        "MOLO_DATABASE_URL": url,
        "MOLO_HEARTBEAT_TIMEOUT_S": "86400",
    }
    api = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "molo.cli",
            "--log-level",
            "WARNING",
            "api",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}", api)
    time.sleep(1.0 if workers > 1 else 0.2)  # every worker up
    return api, port


def measure(
    endpoint: str, workers: int, api_pid: int, reqs: list[bytes], port: int, rate: float, args: argparse.Namespace
) -> Row:
    asyncio.run(open_loop.run("127.0.0.1", port, reqs, rate=rate, duration_s=3.0, connections=args.connections))
    load = os.getloadavg()[0]
    pids = descendants(api_pid)
    cpu0 = open_loop.process_cpu_s(pids)
    out = asyncio.run(
        open_loop.run("127.0.0.1", port, reqs, rate=rate, duration_s=args.duration, connections=args.connections)
    )
    api_cpu = open_loop.process_cpu_s(pids) - cpu0
    n = max(1, len(out.latencies))
    return Row(
        endpoint=endpoint,
        workers=workers,
        rate=rate,
        achieved=out.achieved,
        p50_ms=out.quantile_ms(0.5),
        p99_ms=out.quantile_ms(0.99),
        max_ms=max(out.latencies, default=0.0) * 1000,
        api_cpu_ms=api_cpu / n * 1000,
        gen_cpu_ms=out.cpu_s / n * 1000,
        errors=out.errors + sum(c for s, c in out.statuses.items() if s != 200),
        load=load,
    )


def show(row: Row, note: str = "") -> None:
    print(
        f"| {row.endpoint} | {row.workers} | {row.rate:,.0f} | {row.achieved:,.0f} | {row.p50_ms:.1f}"
        f" | {row.p99_ms:.1f} | {row.max_ms:.0f} | {row.api_cpu_ms:.2f} | {row.gen_cpu_ms:.2f} | {row.errors}"
        f" | {row.load:.1f} | {note} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=5000)
    parser.add_argument("--workers", default="1,2", help="API processes to compare, comma-separated")
    parser.add_argument("--endpoints", default="capacity,boxes,kpis")
    parser.add_argument("--rate", type=float, default=200.0, help="the fixed offered rate, requests/s")
    parser.add_argument("--rates", default=None, help="per-endpoint fixed rates, e.g. boxes=5,kpis=50")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    parser.add_argument(
        "--step",
        type=float,
        default=None,
        help="rate step of the search for the highest rate (default: the fixed rate)",
    )
    parser.add_argument("--max-rate", type=float, default=3000.0)
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--radius", type=float, default=2000.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fixed = dict.fromkeys(args.endpoints.split(","), args.rate)
    for item in (args.rates or "").split(","):
        if item:
            name, _, value = item.partition("=")
            fixed[name] = float(value)
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(__doc__)
    print(f"settings: boxes={args.boxes} duration={args.duration:g}s connections={args.connections} "
          f"fixed rates={fixed} slo p99<={args.slo_ms:g} ms; {os.cpu_count()} cores\n")  # fmt: skip
    print(
        "| endpoint | API processes | offered /s | achieved /s | p50 ms | p99 ms | max ms | API CPU ms/req"
        " | generator CPU ms/req | errors | load avg | |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    url = create_database(admin, "molo_bench_api_load")
    try:
        migrate(url, TimescaleMode.OFF)
        seed(url, args.boxes, random.Random(args.seed))
        with psycopg.connect(url, autocommit=True) as conn:
            keys = {
                "courier": create_key(conn, role=Role.COURIER, carrier="gls", name="bench").token,
                "operator": create_key(conn, role=Role.OPERATOR, name="bench").token,
            }
        for workers in (int(w) for w in args.workers.split(",")):
            api, port = start_api(url, workers)
            try:
                for endpoint in args.endpoints.split(","):
                    reqs = requests_for(endpoint, port, keys, args.radius, random.Random(args.seed + 1))
                    show(measure(endpoint, workers, api.pid, reqs, port, fixed[endpoint], args), "fixed rate")
                    best: Row | None = None
                    step = args.step or fixed[endpoint]
                    rate = fixed[endpoint] + step
                    while rate <= args.max_rate:
                        row = measure(endpoint, workers, api.pid, reqs, port, rate, args)
                        passed = row.p99_ms <= args.slo_ms and not row.errors and row.achieved >= 0.98 * rate
                        show(row, "search: " + ("p99 within" if passed else "p99 over, or behind"))
                        if not passed:
                            break
                        best = row
                        rate += step
                    if best is not None:
                        show(best, f"**highest rate with p99 <= {args.slo_ms:g} ms**")
            finally:
                api.terminate()
                api.wait(20)
    finally:
        drop_database(url, admin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
