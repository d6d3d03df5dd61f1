"""KPI latency: avoided trips and CO2 over a year of 50 boxes, as a dashboard asks for them.

Method (printed with the results): a fresh database migrated on the storage flavour of ``--flavour``
(plain PostgreSQL or TimescaleDB, bench/flavours.py; ``activity_daily`` is a rollup table kept by a
trigger on the events on both). The default Aalborg scenario is
simulated for ``--days`` (365) and its box events are loaded by COPY into ``events`` (~380k rows for
a year), with the boxes registered. The API runs under uvicorn on 127.0.0.1; one client asks
``GET /api/v1/kpis`` for the whole period per variant (grouped by day, by box, by week and category,
and with overrides): once cold (no day tallied yet in the API's day cache), then ``--repeat`` times
warm (p50 and max), and warm with a new event on the last day before every request (the dashboard's
case while boxes report). Beside it, in the same process: the same figures computed from the raw events (every row
fetched and counted in Python) instead of the aggregate, and the split of the aggregate path into
SQL, method and summary, so the ratio shows what the aggregate saves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from accounting import ActivityCounter, Method, assess, summarize
from backend.access.keys import Role, create_key
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.impact import repository, service
from backend.migrate import migrate
from backend.settings import Settings
from bench.flavours import FLAVOURS, admin_url, describe, mode
from contract.messages import PAYLOAD_BY_TYPE
from molo.postgres import create_database, drop_database
from molo.registry import register_boxes
from simulator.params import resolve
from simulator.run import network_for, run_batch
from simulator.trace import MemorySink, to_ms

COLUMNS = ("compartment", "parcel_id", "carrier", "size_class", "fraction", "weight_kg")


def load(url: str, days: float) -> tuple[int, str, str]:
    """Simulate ``days`` of the default scenario and COPY its box events into ``events``."""
    scenario = resolve(overrides=[f"simulation.days={days}"])
    network = network_for(scenario)
    sink = MemorySink()
    run_batch(scenario, sink, network=network)
    start = scenario.simulation.start
    register_boxes(url, network.boxes)
    seqs: dict[str, int] = {}
    n = 0
    with psycopg.connect(url, autocommit=True) as conn:
        end = start + timedelta(days=days + 1)
        conn.execute("SELECT molo_ensure_partitions('events', %s, %s)", (start, end))
        with conn.cursor().copy(
            "COPY events (ts, received_at, box_id, seq, session, type, compartment, parcel_id, carrier,"
            " size_class, fraction, weight_kg, payload) FROM STDIN"
        ) as copy:
            for t, box, kind, data in sink.records:
                if box is None or kind not in PAYLOAD_BY_TYPE or kind == "telemetry":
                    continue  # the model's own records (van trips, refusals) are not box events
                seqs[box] = seqs.get(box, 0) + 1
                ts = datetime.fromtimestamp(to_ms(start, t) / 1000, UTC)
                copy.write_row((ts, ts, box, seqs[box], 1, kind, *(data.get(c) for c in COLUMNS), json.dumps(data)))
                n += 1
        conn.execute("ANALYZE events")
    return n, start.date().isoformat(), (start + timedelta(days=days)).date().isoformat()


def timed(
    client: httpx.Client, params: dict[str, Any], repeat: int, before: Any = None
) -> tuple[float, float, float, dict[str, Any]]:
    """Cold time (the first request: no day tallied yet), then p50 and max of ``repeat`` more, each
    after ``before()`` (e.g. a new event on the last day)."""
    t0 = time.perf_counter()
    client.get("/api/v1/kpis", params=params).raise_for_status()
    cold = time.perf_counter() - t0
    times = []
    body: dict[str, Any] = {}
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        r = client.get("/api/v1/kpis", params=params)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        body = r.json()
    return cold, statistics.median(times), max(times), body


async def split(url: str, since: str, until: str) -> dict[str, float]:
    """The aggregate path's parts, and the raw-events path, in this process."""
    from datetime import date

    from psycopg import AsyncConnection

    out: dict[str, float] = {}
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        days = await repository.activity(conn, date.fromisoformat(since), date.fromisoformat(until))
        geo = await service.geography(conn, None)
        out["sql_aggregate_s"] = time.perf_counter() - t0
        out["rows"] = len(days)
        t0 = time.perf_counter()
        a = assess(days, geo, Method())
        out["method_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        summarize(a, ["day"])
        out["summary_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        counter = ActivityCounter()
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT ts, box_id, type, payload FROM events WHERE ts >= %s AND ts < %s",
                (date.fromisoformat(since), date.fromisoformat(until)),
            )
            async for ts, box, kind, payload in cur:
                counter.add(round(ts.timestamp() * 1000), box, kind, payload)
        raw = counter.rows()
        out["raw_fetch_and_count_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        summarize(assess(raw, geo, Method()), ["day"])
        out["raw_total_s"] = out["raw_fetch_and_count_s"] + time.perf_counter() - t0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--flavour", choices=FLAVOURS, default="postgres", help="storage flavour (bench/flavours.py)")
    args = parser.parse_args()
    admin = admin_url(args.flavour)
    url = create_database(admin, "molo_bench_kpi")
    try:
        migrate(url, mode(args.flavour))
        print(f"# storage: {args.flavour} ({describe(url)})")
        t0 = time.perf_counter()
        n, since, until = load(url, args.days)
        print(f"# loaded {n:,} box events ({args.days:g} days, 50 boxes) in {time.perf_counter() - t0:.1f} s")
        with psycopg.connect(url, autocommit=True) as conn:
            key = create_key(conn, role=Role.RESEARCHER, carrier=None, name="bench")
        server = ApiServer(create_app(Settings(database_url=url))).start()
        variants: list[tuple[str, dict[str, Any]]] = [
            ("group_by=day", {"group_by": ["day"]}),
            ("group_by=box", {"group_by": ["box"]}),
            ("group_by=week,category", {"group_by": ["week", "category"]}),
            ("day + e-vans 50% + marginal", {"group_by": ["day"], "van_electric_share": 0.5, "allocation": "marginal"}),
        ]
        seq = [10**9]

        def new_event() -> None:  # a parcel collected on the last day: that day must be worked out again
            seq[0] += 1
            last = datetime.fromisoformat(until).replace(tzinfo=UTC) - timedelta(hours=1)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO events (ts, received_at, box_id, seq, session, type, compartment, parcel_id, payload)"
                    " VALUES (%s, now(), 'aal-001', %s, 1, 'parcel.collected', 3, 'bench', '{}')",
                    (last, seq[0]),
                )

        try:
            with httpx.Client(base_url=server.url, timeout=300, headers={"X-API-Key": key.token}) as client:
                print(f"{'request (whole period)':<30} {'cold s':>7} {'warm p50':>9} {'max s':>7}  avoided t CO2e WTW")
                for name, params in variants:
                    q = {"since": since, "until": until, **params}
                    cold, p50, worst, body = timed(client, q, args.repeat)
                    avoided = body["totals"]["avoided"]["kg_co2e_wtw"] / 1000
                    print(f"{name:<30} {cold:>7.3f} {p50:>9.3f} {worst:>7.3f}  {avoided:,.1f}")
                q = {"since": since, "until": until, "group_by": ["day"]}
                _, p50, worst, body = timed(client, q, args.repeat, before=new_event)
                print(
                    f"{'day, a new event each time':<30} {'':>7} {p50:>9.3f} {worst:>7.3f}  (only the last day again)"
                )
        finally:
            server.stop()
        parts = asyncio.run(split(url, since, until))
        agg = parts["sql_aggregate_s"] + parts["method_s"] + parts["summary_s"]
        print(
            f"# aggregate path in-process: SQL {parts['sql_aggregate_s']:.3f} s ({parts['rows']:,.0f} box-days), "
            f"method {parts['method_s']:.3f} s, summary {parts['summary_s']:.3f} s = {agg:.3f} s"
        )
        print(
            f"# raw-events baseline: fetch and count every event {parts['raw_fetch_and_count_s']:.3f} s, "
            f"total {parts['raw_total_s']:.3f} s; aggregate / raw = {agg / parts['raw_total_s']:.2f}"
        )
    finally:
        drop_database(url, admin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
