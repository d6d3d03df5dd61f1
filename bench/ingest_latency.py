"""End-to-end latency of ingest: from an event's publish to the moment the API shows it, at fixed rates.

Method (printed with the results):
- A real Mosquitto with broker_config/ (auth, ACL), one ``molo ingest`` worker process, one ``molo api``
  process, and a fresh database on the storage flavour of ``--flavour`` (plain PostgreSQL, or
  TimescaleDB where MOLO_BENCH_TIMESCALE_URL or the local 5433 cluster has it; bench/flavours.py).
- ``--boxes`` boxes, each its own MQTT v5 connection and credentials, on one BoxLoop in this process
  (bench/lean_boxes.py). Events are published **open loop**: event i is due at start + i / rate,
  round-robin over the boxes, QoS 1, whether or not earlier ones were acknowledged, so queueing
  anywhere on the path shows as latency. Latency is measured from the event's scheduled time.
- "Visible through the API": a poller asks ``GET /api/v1/box-status`` again as soon as the previous
  answer is in; a box's ``last_seq`` is committed in the same transaction as its events, so when an
  answer shows ``last_seq >= s``, event s of that box was visible at the latest when the answer came
  back. Each event's latency is that moment less its scheduled time: an upper bound, too high by at
  most one poll (the poll interval is printed).
- ``--seconds`` at each rate of ``--rates``, the first ``--warmup`` seconds' events left out; every
  event must become visible (none lost), checked by counting rows at the end.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg

from backend.access.keys import Role, create_key
from backend.migrate import migrate
from bench.flavours import FLAVOURS, admin_url, describe, mode
from bench.lean_boxes import LeanBox, event_payloads
from bench.processes import stop_processes, wait_ready
from contract import MessageKind, topic_for
from firmware_stub.loop import BoxLoop
from molo.brokers import free_port, start_mosquitto
from molo.postgres import create_database, drop_database
from molo.provision import box_ids, provision

T0_MS = 1_767_225_600_000


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def run_rate(args: argparse.Namespace, admin: str, rate: float) -> dict[str, float]:
    url = create_database(admin, "molo_bench_latency")
    work = Path(tempfile.mkdtemp(prefix="molo-latency-"))
    ids = box_ids(args.boxes, prefix="lat")
    creds = provision(work / "creds", ids, service_users=["ingest-1"])
    broker = start_mosquitto(work / "broker", creds)
    procs: list[subprocess.Popen[bytes]] = []
    loop = BoxLoop("bench-latency", connectors=4).start()
    boxes: list[LeanBox] = []
    try:
        migrate(url, mode(args.flavour))
        with psycopg.connect(url, autocommit=True) as conn:
            token = create_key(conn, role=Role.OPERATOR, name="latency").token
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")} | {
            "MOLO_DATABASE_URL": url,
            "MOLO_MQTT_HOST": broker.host,
            "MOLO_MQTT_PORT": str(broker.port),
            "MOLO_MQTT_USERNAME": "ingest-1",
            "MOLO_MQTT_PASSWORD": creds.services["ingest-1"],
            "MOLO_WORKER_ID": "latency-1",
            "MOLO_HEARTBEAT_TIMEOUT_S": "86400",
        }
        if args.batch_wait_ms is not None:
            env["MOLO_INGEST_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
        cli = [sys.executable, "-m", "molo.cli", "--log-level", "WARNING"]
        procs.append(subprocess.Popen([*cli, "ingest"], env=env))
        port = free_port()
        api_env = {k: v for k, v in env.items() if not k.startswith("MOLO_MQTT")}
        procs.append(subprocess.Popen([*cli, "api", "--port", str(port)], env=api_env, stdout=subprocess.DEVNULL))
        api_url = f"http://127.0.0.1:{port}"
        wait_ready(api_url, procs[-1])
        boxes = [LeanBox(b, creds.boxes[b], broker.host, broker.port, loop, window=1000) for b in ids]
        for box in boxes:
            box.start()
        for box in boxes:
            if not box.connected.wait(30):
                raise RuntimeError(f"{box.name} did not connect")
        per_box = int(rate * args.seconds) // args.boxes
        total = per_box * args.boxes
        payloads = [event_payloads(box.name, per_box) for box in boxes]
        topics = [topic_for(box.name, MessageKind.EVENTS) for box in boxes]
        time.sleep(3)  # the ingest subscribed, the API warm
        start = time.monotonic() + 0.5
        # scheduled[b][s - 1]: when seq s of box b was due (monotonic).
        scheduled = [[start + (s * args.boxes + b) / rate for s in range(per_box)] for b in range(args.boxes)]
        late = {"max": 0.0}

        def publish() -> None:
            for s in range(per_box):
                for b in range(args.boxes):
                    due = scheduled[b][s]
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        late["max"] = max(late["max"], -wait)
                    boxes[b].client.publish(topics[b], payloads[b][s], qos=1)

        publisher = threading.Thread(target=publish, name="publish", daemon=True)
        publisher.start()
        seen = [0] * args.boxes
        index = {box.name: i for i, box in enumerate(boxes)}
        latencies: list[float] = []
        polls: list[float] = []
        warm = start + args.warmup
        with httpx.Client(base_url=api_url, headers={"X-API-Key": token}, timeout=30) as client:
            deadline = start + args.seconds + 120
            while sum(seen) < total and time.monotonic() < deadline:
                asked = time.monotonic()
                answer = client.get("/api/v1/box-status").json()
                now = time.monotonic()
                polls.append(now - asked)
                for status in answer:
                    b = index.get(status["box_id"])
                    if b is None:
                        continue
                    top = min(int(status["last_seq"]), per_box)
                    latencies.extend(now - due for due in scheduled[b][seen[b] : top] if due >= warm)
                    seen[b] = max(seen[b], top)
        publisher.join(60)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
            batches = conn.execute("SELECT batches, batch_seconds_sum FROM ingest_workers").fetchone()
        stored = int(row[0]) if row else 0
        n_batches, batch_seconds = (int(batches[0]), float(batches[1])) if batches else (0, 0.0)
        latencies.sort()
        return {
            "rate": rate,
            "events": total,
            "stored": stored,
            "measured": len(latencies),
            "p50_ms": pct(latencies, 50) * 1000,
            "p99_ms": pct(latencies, 99) * 1000,
            "max_ms": latencies[-1] * 1000,
            "under_100ms": bisect.bisect_right(latencies, 0.1) / len(latencies),
            "poll_ms": statistics.median(polls) * 1000,
            "publisher_late_ms": late["max"] * 1000,
            "batch_ms": batch_seconds / n_batches * 1000 if n_batches else 0.0,
            "batch_events": total / n_batches if n_batches else 0.0,
        }
    finally:
        for box in boxes:
            box.stop()
        loop.stop()
        stop_processes(procs)
        broker.stop()
        drop_database(url, admin)
        shutil.rmtree(work, ignore_errors=True)  # thousands of box outboxes, broker data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1000,5000", help="offered events per second, comma-separated")
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="publishing time per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of events left out at the start")
    parser.add_argument(
        "--batch-wait-ms", type=int, default=None, help="the ingest's MOLO_INGEST_BATCH_WAIT_MS (default: its own)"
    )
    parser.add_argument("--flavour", choices=FLAVOURS, default="postgres", help="storage flavour (bench/flavours.py)")
    args = parser.parse_args()
    admin = admin_url(args.flavour)
    print(f"storage: {args.flavour} ({describe(admin)})")
    print(
        f"method: {args.boxes} boxes (MQTT 5, QoS 1) on one BoxLoop, open loop at each rate for {args.seconds:g} s "
        f"(first {args.warmup:g} s left out); 1 ingest worker, 1 API process; latency = first GET "
        f"/api/v1/box-status showing the event's seq, less its scheduled publish time (upper bound by one poll); "
        f"{os.cpu_count()} cores, everything on this machine"
    )
    ok = True
    for rate in (float(r) for r in args.rates.split(",")):
        r = run_rate(args, admin, rate)
        ok &= r["stored"] == r["events"]
        print(
            f"  {r['rate']:6,.0f} ev/s offered: p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
            f"max {r['max_ms']:7.1f} ms  within 100 ms {r['under_100ms']:.1%}  (n={r['measured']:,.0f}; "
            f"poll {r['poll_ms']:.1f} ms; publisher at most {r['publisher_late_ms']:.0f} ms behind its schedule; "
            f"stored {r['stored']:,.0f} of {r['events']:,.0f}; ingest batches of {r['batch_events']:.0f} events "
            f"on average, {r['batch_ms']:.1f} ms each to write)",
            flush=True,
        )
    print(f"every event stored: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
