"""A year of 50 boxes on each storage flavour: how much disk it takes (and TimescaleDB's compression
ratio), and how long an operator's history queries take on old, compressed weeks.

Method (printed with the results):
- A fresh database per flavour (bench/flavours.py), migrated on it. The default scenario simulated for
  ``--days`` (365) gives the box events (about 380k), loaded by COPY as in bench/kpi_latency.py, and
  every box reports telemetry every 30 minutes for the same year (the live simulator's interval:
  about 876k rows, with the 16 door readings and 2 red-box weights a real box sends). ANALYZE, then
  sizes: plain PostgreSQL, the partitions of events and telemetry with their indexes and TOAST;
  TimescaleDB, ``hypertable_size`` before and after every chunk is compressed (``compress_chunk``, the
  project's segmentby box_id and orderby ts DESC, seq DESC). The ratio is before / after.
- History queries, each run once cold (first after loading or compressing) and then ``--repeat`` times
  (median): a box's events over one month that is 6 months old, as ``GET /api/v1/boxes/{id}/events``
  pages them (1,000 a page, its SQL from backend/api/repository.py, every page fetched); the same over
  HTTP through the API (operator key, uvicorn on 127.0.0.1); the box's hourly counts over 90 days from
  ``events_hourly`` (a history chart); and its telemetry of one week 6 months ago. On TimescaleDB the
  queries run twice, on the uncompressed chunks and after compression; the background scheduler is
  off for the database, and events_hourly is refreshed first (run_job), as its policy would have done.
- Boxes and months are picked by a fixed seed, the same on both flavours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import psycopg
from psycopg import AsyncConnection

from backend.access.keys import Role, create_key
from backend.api import repository
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.migrate import migrate
from backend.settings import Settings
from bench.flavours import FLAVOURS, admin_url, describe, mode
from bench.kpi_latency import load
from molo.postgres import create_database, drop_database

TELEMETRY_EVERY = timedelta(minutes=30)


def load_telemetry(url: str, since: datetime, until: datetime) -> int:
    """Telemetry of every registered box every 30 minutes over ``[since, until)``, by COPY."""
    rng = random.Random(7)
    n = 0
    with psycopg.connect(url, autocommit=True) as conn:
        boxes = [str(r[0]) for r in conn.execute("SELECT box_id FROM boxes ORDER BY 1").fetchall()]
        conn.execute("SELECT molo_ensure_partitions('telemetry', %s, %s)", (since, until))
        with conn.cursor().copy(
            "COPY telemetry (ts, received_at, box_id, seq, session, power, battery_pct, temperature_c, occupied,"
            " compartments, red_boxes) FROM STDIN"
        ) as copy:
            for box in boxes:
                ts, seq = since, 0
                occupied = [rng.random() < 0.4 for _ in range(16)]
                while ts < until:
                    seq += 1
                    flip = rng.randrange(3, 17)
                    occupied[flip - 1] = not occupied[flip - 1] if rng.random() < 0.3 else occupied[flip - 1]
                    doors = [
                        {"id": i, "occupied": occupied[i - 1] and i > 2, "door_open": False, "in_service": True}
                        for i in range(1, 17)
                    ]
                    red = [{"compartment": c, "weight_kg": round(rng.uniform(0, 12), 2)} for c in (1, 2)]
                    temp = round(12 + 8 * rng.random(), 1)
                    copy.write_row(
                        (ts, ts, box, seq, 1, "mains", None, temp, sum(d["occupied"] for d in doors),
                         json.dumps(doors), json.dumps(red))
                    )  # fmt: skip
                    ts += TELEMETRY_EVERY
                    n += 1
        conn.execute("ANALYZE telemetry")
    return n


def sizes(conn: psycopg.Connection[Any], flavour: str) -> dict[str, int]:
    """Bytes on disk of events and telemetry, indexes and TOAST included."""
    out = {}
    for table in ("events", "telemetry"):
        if flavour == "timescale":
            row = conn.execute("SELECT hypertable_size(%s)", (table,)).fetchone()
        else:
            row = conn.execute(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = %s::regclass",
                (table,),
            ).fetchone()
        out[table] = int(row[0]) if row and row[0] is not None else 0
    return out


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Cold seconds (first call), median of ``repeat`` more, and the last result."""
    t0 = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return cold, statistics.median(times), result


def box_month_sql(url: str, box: str, since: datetime, until: datetime) -> int:
    """Every page of the box's events over the range, with the API's own query."""

    async def run() -> int:
        async with await AsyncConnection.connect(url) as conn:
            n, after = 0, None
            while True:
                rows = await repository.box_events(
                    conn, box, since=since, until=until, types=None, after=after, limit=1001, descending=True
                )
                n += min(len(rows), 1000)
                if len(rows) <= 1000:
                    return n
                after = (rows[999]["ts"], rows[999]["seq"])

    return asyncio.run(run())


def box_month_http(client: httpx.Client, box: str, since: datetime, until: datetime) -> int:
    n, cursor = 0, None
    while True:
        params: dict[str, Any] = {"since": since.isoformat(), "until": until.isoformat(), "limit": 1000}
        params |= {"order": "desc"} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/api/v1/boxes/{box}/events", params=params)
        page.raise_for_status()
        body = page.json()
        n += len(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return n


CHART = "SELECT bucket, type, events FROM events_hourly WHERE box_id = %s AND bucket >= %s AND bucket < %s"
WEEK = "SELECT ts, temperature_c, occupied FROM telemetry WHERE box_id = %s AND ts >= %s AND ts < %s ORDER BY ts"


def report(label: str, what: str, fn: Callable[[], Any], repeat: int) -> None:
    """Time ``fn`` cold and warm and print one line; ``fn`` returns a count or the rows."""
    cold, warm, result = timed(fn, repeat)
    n = result if isinstance(result, int) else len(result)
    print(f"  {label:<17} {what:<34} cold {cold * 1e3:7.1f} ms  warm {warm * 1e3:7.1f} ms  ({n} rows)")


def measure(url: str, label: str, picks: list[tuple[str, datetime]], repeat: int, key: str) -> None:
    """Print the history queries' cold and warm times on the database as it is now."""
    server = ApiServer(create_app(Settings(database_url=url))).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": key}) as client:
            for box, month in picks:
                end = month + timedelta(days=30)
                report(label, f"{box} a month of events, SQL", partial(box_month_sql, url, box, month, end), repeat)
                http = partial(box_month_http, client, box, month, end)
                report(label, f"{box} a month of events, HTTP", http, repeat)
        with psycopg.connect(url, autocommit=True) as conn:
            for box, month in picks:
                chart = (box, month - timedelta(days=60), month + timedelta(days=30))
                report(label, f"{box} 90 days hourly (events_hourly)", partial(_rows, conn, CHART, chart), repeat)
                week = (box, month, month + timedelta(days=7))
                report(label, f"{box} a week of telemetry", partial(_rows, conn, WEEK, week), repeat)
    finally:
        server.stop()


def _rows(conn: psycopg.Connection[Any], query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    return conn.execute(query, args).fetchall()


def run(flavour: str, days: float, repeat: int) -> None:
    admin = admin_url(flavour)
    url = create_database(admin, f"molo_bench_storage_{flavour}")
    try:
        migrate(url, mode(flavour))
        print(f"# {flavour}: {describe(url)}")
        if flavour == "timescale":  # the policies run when this script says, not when the scheduler does
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs")
            time.sleep(2)
        t0 = time.perf_counter()
        n_events, since_s, until_s = load(url, days)
        since = datetime.fromisoformat(since_s).replace(tzinfo=UTC)
        until = datetime.fromisoformat(until_s).replace(tzinfo=UTC)
        n_tele = load_telemetry(url, since, until)
        print(f"# loaded {n_events:,} events and {n_tele:,} telemetry rows ({since_s} .. {until_s}) "
              f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
        rng = random.Random(12)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            conn.execute("VACUUM ANALYZE telemetry")
            key = create_key(conn, role=Role.OPERATOR, name="bench").token
            boxes = [str(r[0]) for r in conn.execute("SELECT box_id FROM boxes ORDER BY 1").fetchall()]
            month = since + timedelta(days=days / 2 - 45)  # a month about 6 months before the year's end
            picks = [(rng.choice(boxes), month) for _ in range(2)]
            before = sizes(conn, flavour)
            if flavour == "timescale":
                job = conn.execute(
                    "SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name = 'events_hourly'"
                ).fetchone()
                assert job is not None
                conn.execute(f"CALL run_job({int(job[0])})")
        for table in ("events", "telemetry"):
            print(f"  size {table:<10} {before[table] / 2**20:9.1f} MiB")
        measure(url, "uncompressed" if flavour == "timescale" else "plain partitions", picks, repeat, key)
        if flavour != "timescale":
            return
        with psycopg.connect(url, autocommit=True) as conn:
            t0 = time.perf_counter()
            for table in ("events", "telemetry"):
                conn.execute(
                    f"SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('{table}') c"
                )
            seconds = time.perf_counter() - t0
            after = sizes(conn, flavour)
            conn.execute("ANALYZE events")
            conn.execute("ANALYZE telemetry")
        print(f"  compressed every chunk in {seconds:.0f} s")
        for table in ("events", "telemetry"):
            ratio = before[table] / after[table]
            print(f"  size {table:<10} {after[table] / 2**20:9.1f} MiB compressed, ratio {ratio:.1f}x")
        total_before, total_after = sum(before.values()), sum(after.values())
        print(f"  size both        {total_before / 2**20:9.1f} MiB -> {total_after / 2**20:.1f} MiB, "
              f"ratio {total_before / total_after:.1f}x")  # fmt: skip
        measure(url, "compressed", picks, repeat, key)
    finally:
        drop_database(url, admin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--flavour", choices=(*FLAVOURS, "both"), default="both")
    args = parser.parse_args()
    for flavour in FLAVOURS if args.flavour == "both" else (args.flavour,):
        run(flavour, args.days, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
