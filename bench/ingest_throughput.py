"""Sustained ingest throughput: events/s from the first publish to the last committed row.

Method (printed with the results):
- A real Mosquitto started with broker_config/ (auth, ACL, limits), a fresh database migrated on the
  storage flavour of ``--flavour``: plain PostgreSQL (the local server, or MOLO_BENCH_DATABASE_URL) or
  TimescaleDB (MOLO_BENCH_TIMESCALE_URL, default a local cluster on 5433; see bench/flavours.py).
- ``--boxes`` boxes, each its own MQTT v5 connection with its own credentials, spread over
  ``--publishers`` processes; every box publishes ``--events`` pre-encoded contract events at QoS 1
  with at most ``--window`` unacknowledged (paho's in-flight window), as fast as the broker takes them.
- ``--workers`` ingest workers run as separate ``molo ingest`` processes on the shared subscription.
- Throughput = events / (time of last committed row - time of first publish). Zero loss is checked
  by counting rows (must equal boxes x events) and dead letters (must be 0).
- Baseline in the same run: COPY of the same number of rows (same shape) into a table with the same
  primary key, in one transaction: the raw write rate of this machine's PostgreSQL.
- Each configuration runs ``--repeat`` times (fresh database, broker and workers each time), with the
  ingest protocols of ``--protocols`` interleaved, and the median is reported with min and max: a
  single run on a shared 2-core machine varies by +-15%.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from backend.migrate import migrate
from bench.flavours import FLAVOURS, admin_url, describe, mode
from bench.lean_boxes import LeanBox, cpu_seconds, event_payloads, postgres_cpu_seconds
from contract import MessageKind, topic_for
from firmware_stub.loop import BoxLoop
from molo.brokers import start_mosquitto
from molo.postgres import create_database, drop_database
from molo.provision import box_ids, provision

T0_MS = 1_767_225_600_000


def publisher(
    host: str,
    port: int,
    boxes: list[tuple[str, str]],
    events: int,
    window: int,
    start: mp.synchronize.Event,
    done: mp.Queue[tuple[float, float, float]],
) -> None:
    """One publisher process: its boxes on one BoxLoop (bench/lean_boxes.py), every event encoded
    before the start; puts (first publish, last PUBACK, this process's CPU seconds) on ``done``."""
    loop = BoxLoop("bench-pub", connectors=4).start()
    clients = [LeanBox(box_id, password, host, port, loop, window=window) for box_id, password in boxes]
    for client in clients:
        client.start()
    payloads = {client.name: event_payloads(client.name, events) for client in clients}
    topics = {client.name: topic_for(client.name, MessageKind.EVENTS) for client in clients}
    for client in clients:
        if not client.connected.wait(30):
            raise RuntimeError(f"{client.name} did not connect")
    start.wait()
    cpu0 = cpu_seconds(os.getpid())
    t0 = time.time()
    for i in range(events):
        for client in clients:
            client.client.publish(topics[client.name], payloads[client.name][i], qos=1)
    total = len(clients) * events
    while sum(client.acked for client in clients) < total:
        time.sleep(0.01)
    t1 = time.time()
    cpu = cpu_seconds(os.getpid()) - cpu0
    for client in clients:
        client.stop()
    for client in clients:
        client.detached.wait(5)
    loop.stop()
    done.put((t0, t1, cpu))


def _count(conn: psycopg.Connection[tuple[int]], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def copy_baseline(url: str, rows: int) -> float:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE copy_baseline (LIKE events INCLUDING DEFAULTS, PRIMARY KEY (box_id, seq, ts))")
        ts = datetime.fromtimestamp(T0_MS / 1000, tz=UTC)
        payload = '{"compartment":3,"size_class":"A","parcel_id":"P1","carrier":"gls"}'
        data = [
            (ts, ts, f"box-{i % 100:03d}", i, 1, "parcel.deposited", 3, "P1", "gls", "A", None, None, payload)
            for i in range(rows)
        ]
        t0 = time.perf_counter()
        with conn.cursor().copy(
            "COPY copy_baseline (ts, received_at, box_id, seq, session, type, compartment, parcel_id, carrier, "
            "size_class, fraction, weight_kg, payload) FROM STDIN"
        ) as copy:
            for row in data:
                copy.write_row(row)
        conn.commit()
        return rows / (time.perf_counter() - t0)


@dataclass
class Run:
    protocol: str
    copy_rate: float
    publish_rate: float
    ingest_rate: float
    seconds: float
    rows: int
    distinct: int
    dead: int
    expected: int
    #: CPU seconds per 1,000 events of each part, first publish to last commit.
    cpu_per_1k: dict[str, float]

    @property
    def lossless(self) -> bool:
        return self.rows == self.distinct == self.expected and self.dead == 0


def run_once(args: argparse.Namespace, admin: str, protocol: str) -> Run:
    total = args.boxes * args.events
    url = create_database(admin, "molo_bench")
    work = Path(tempfile.mkdtemp(prefix="molo-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    broker = None
    try:
        migrate(url, mode(args.flavour))
        copy_rate = copy_baseline(url, total)
        ids = box_ids(args.boxes, prefix="bench")
        creds = provision(work / "creds", ids, service_users=[f"ingest-{w}" for w in range(1, args.workers + 1)])
        broker = start_mosquitto(work / "broker", creds)
        env = {
            **os.environ,
            "MOLO_DATABASE_URL": url,
            "MOLO_MQTT_HOST": broker.host,
            "MOLO_MQTT_PORT": str(broker.port),
            "MOLO_MQTT_PROTOCOL": protocol,
            "MOLO_INGEST_BATCH_MAX": str(args.batch_max),
        }
        procs.extend(
            subprocess.Popen(
                [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "ingest"],
                # One broker user per worker: the broker binds the client id (the session) to it.
                env={
                    **env,
                    "MOLO_WORKER_ID": f"bench-{w}",
                    "MOLO_MQTT_USERNAME": f"ingest-{w}",
                    "MOLO_MQTT_PASSWORD": creds.services[f"ingest-{w}"],
                },
            )
            for w in range(1, args.workers + 1)
        )
        with psycopg.connect(url, autocommit=True) as conn:
            time.sleep(3)  # let workers connect and subscribe before anything is published
            start = mp.Event()
            done: mp.Queue[tuple[float, float, float]] = mp.Queue()
            shares = [ids[i :: args.publishers] for i in range(args.publishers)]
            pubs = [
                mp.Process(
                    target=publisher,
                    args=(
                        broker.host,
                        broker.port,
                        [(b, creds.boxes[b]) for b in share],
                        args.events,
                        args.window,
                        start,
                        done,
                    ),
                )
                for share in shares
            ]
            for p in pubs:
                p.start()
            time.sleep(2 + args.boxes / 100)  # connections up, payloads encoded
            assert broker.pid is not None
            parts = {"broker": [broker.pid], "ingest": [proc.pid for proc in procs]}
            cpu0 = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in parts.items()}
            pg0 = postgres_cpu_seconds()
            start.set()
            deadline = time.time() + 600
            # Progress from the workers' own counters (committed with the rows): a count(*) of the
            # growing table every 50 ms would cost PostgreSQL a good share of a core.
            while (
                _count(conn, "SELECT coalesce(sum(events), 0) FROM ingest_workers") < total and time.time() < deadline
            ):
                time.sleep(0.05)
            t_end = time.time()
            cpu = {name: sum(cpu_seconds(pid) for pid in pids) - cpu0[name] for name, pids in parts.items()}
            cpu["postgres"] = postgres_cpu_seconds() - pg0
            spans = [done.get(timeout=60) for _ in pubs]
            cpu["publishers"] = sum(sp[2] for sp in spans)
            for p in pubs:
                p.join()
            t_first = min(sp[0] for sp in spans)
            t_pub = max(sp[1] for sp in spans)
            time.sleep(1)  # any late duplicate would land now and be counted
            return Run(
                protocol=protocol,
                copy_rate=copy_rate,
                publish_rate=total / (t_pub - t_first),
                ingest_rate=total / (t_end - t_first),
                seconds=t_end - t_first,
                rows=_count(conn, "SELECT count(*) FROM events"),
                distinct=_count(conn, "SELECT count(*) FROM (SELECT DISTINCT box_id, seq FROM events) x"),
                dead=_count(conn, "SELECT count(*) FROM dead_letters"),
                expected=total,
                cpu_per_1k={name: seconds * 1000 / total for name, seconds in cpu.items()},
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if broker is not None:
            broker.stop()
        drop_database(url, admin)
        shutil.rmtree(work, ignore_errors=True)  # thousands of box outboxes, broker data


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):10,.0f}  (min {min(values):,.0f}, max {max(values):,.0f}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--events", type=int, default=1000, help="events per box")
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--batch-max", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--protocols", default="3.1.1", help="ingest MQTT protocols to compare, e.g. 3.1.1,5")
    parser.add_argument("--flavour", choices=FLAVOURS, default="postgres", help="storage flavour (bench/flavours.py)")
    args = parser.parse_args()
    admin = admin_url(args.flavour)
    print(f"storage: {args.flavour} ({describe(admin)})")
    protocols = args.protocols.split(",")
    runs: list[Run] = []
    total = args.boxes * args.events
    print(
        f"machine: {os.cpu_count()} cores; {args.boxes} boxes (MQTT 5, QoS 1, window {args.window}) in "
        f"{args.publishers} publisher processes, {args.events} events each = {total:,} events per run; "
        f"{args.workers} ingest worker process(es), batch <= {args.batch_max}"
    )
    for i in range(args.repeat):
        for protocol in protocols:
            run = run_once(args, admin, protocol)
            runs.append(run)
            print(
                f"  run {i + 1} ingest MQTT {protocol:5}: ingest {run.ingest_rate:8,.0f} ev/s  "
                f"publish {run.publish_rate:8,.0f} msg/s  COPY {run.copy_rate:9,.0f} rows/s  "
                f"({run.seconds:.1f} s, rows {run.rows:,}, dead letters {run.dead}, "
                f"{'lossless' if run.lossless else 'LOSS OR DUPLICATES'})",
                flush=True,
            )
            print(
                "    CPU s per 1,000 events: "
                + ", ".join(f"{name} {value:.3f}" for name, value in sorted(run.cpu_per_1k.items())),
                flush=True,
            )
    copy_rates = [r.copy_rate for r in runs]
    print(f"raw COPY baseline (rows/s)       : {_spread(copy_rates)}   one COPY, PK (box_id, seq, ts)")
    for protocol in protocols:
        mine = [r for r in runs if r.protocol == protocol]
        rates = [r.ingest_rate for r in mine]
        print(f"ingest sustained, MQTT {protocol:5} (ev/s): {_spread(rates)}   first publish -> last commit")
        print(f"  ratio to COPY (median/median)  : {statistics.median(rates) / statistics.median(copy_rates):10.3f}")
    for name in sorted(runs[0].cpu_per_1k):
        values = [r.cpu_per_1k[name] for r in runs]
        print(
            f"CPU s per 1,000 events, {name:10}: {statistics.median(values):.3f} "
            f"(min {min(values):.3f}, max {max(values):.3f})"
        )
    lossless = all(r.lossless for r in runs)
    print(
        f"zero loss in every run           : {'OK' if lossless else 'FAILED'} (rows = distinct (box, seq) = "
        f"{total:,}, no dead letters)"
    )
    return 0 if lossless else 1


if __name__ == "__main__":
    raise SystemExit(main())
