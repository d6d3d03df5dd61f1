"""The highest live speed factor at which the 50 Aalborg boxes keep up.

Method (printed with the results): a real Mosquitto with broker_config/, a fresh database on the local
PostgreSQL (or MOLO_BENCH_DATABASE_URL as admin URL), one `molo ingest` process, and the live simulator
with the default scenario's 50 boxes, each a firmware stub (MQTT 5, QoS 1, SQLite outbox), telemetry
every 30 simulated minutes. For each speed factor (simulated seconds per wall second) it runs the
first ``--sim-hours`` of the scenario (two weekdays with the carriers' rounds) and measures:
  lag    how far the simulation ever fell behind the wall clock (SimPy real-time pacing);
  drain  after the horizon, the time until every box's outbox was acknowledged by the broker;
  stored the time after the horizon until the backend had committed every event (rows counted).
A speed keeps up if lag <= 1 s, drain <= 5 s and stored <= 10 s. All runs use the same box disks, so
sequence numbers continue and nothing is mistaken for a replay.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from backend.migrate import migrate
from backend.settings import TimescaleMode
from molo.brokers import start_mosquitto
from molo.postgres import create_database, drop_database
from molo.provision import provision
from simulator.live import run_live
from simulator.params import resolve
from simulator.run import network_for


def stored(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM telemetry)").fetchone()
        return int(row[0]) if row else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speeds", default="14400,57600,115200,230400,460800")
    parser.add_argument("--sim-hours", type=float, default=48.0)
    args = parser.parse_args()
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = create_database(admin, "molo_bench_live")
    work = Path(tempfile.mkdtemp(prefix="molo-live-"))
    scenario = resolve(overrides=[f"simulation.days={args.sim_hours / 24}", "simulation.telemetry_interval_min=30"])
    network = network_for(scenario)
    creds = provision(work / "creds", [b.id for b in network.boxes])
    broker = start_mosquitto(work / "broker", creds)
    ingest = None
    try:
        migrate(url, TimescaleMode.OFF)
        env = {
            **os.environ,
            "MOLO_DATABASE_URL": url,
            "MOLO_MQTT_HOST": broker.host,
            "MOLO_MQTT_PORT": str(broker.port),
            "MOLO_MQTT_PASSWORD": creds.services["ingest"],
            "MOLO_WORKER_ID": "bench-live",
        }
        ingest = subprocess.Popen([sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "ingest"], env=env)
        time.sleep(3)
        print(
            f"machine: {os.cpu_count()} cores; {len(network.boxes)} boxes, first {args.sim_hours:g} simulated "
            f"hours of the default scenario per speed; Mosquitto + 1 ingest process + PostgreSQL on the same machine"
        )
        best = None
        for speed in [float(s) for s in args.speeds.split(",")]:
            before = stored(url)
            result = run_live(
                scenario,
                host=broker.host,
                port=broker.port,
                passwords=creds.boxes,
                state_dir=work / "boxes",
                speed=speed,
                network=network,
            )
            horizon_wall = time.monotonic()
            births = len(network.boxes)  # statuses are not rows; telemetry and events are
            expected = before + result.stats.events
            while stored(url) < expected and time.monotonic() - horizon_wall < 60:
                time.sleep(0.05)
            stored_s = result.stats.drain_s + (time.monotonic() - horizon_wall)
            ok = result.stats.max_lag_s <= 1.0 and result.stats.drain_s <= 5.0 and stored_s <= 10.0
            best = speed if ok else best
            print(
                f"  speed {speed:>9,.0f}x ({speed / 3600:6.1f} sim h/s): {result.stats.events:6,} events in "
                f"{result.stats.wall_s:6.1f} s wall, lag {result.stats.max_lag_s:5.2f} s, drain "
                f"{result.stats.drain_s:5.2f} s, stored {stored_s:5.2f} s, max backlog {result.stats.max_backlog:5,}"
                f" -> {'keeps up' if ok else 'falls behind'}  ({births} boxes)"
            )
        print(f"highest speed that keeps up: {best:,.0f}x" if best else "no tested speed keeps up")
        return 0
    finally:
        if ingest is not None:
            ingest.terminate()
            ingest.wait(10)
        broker.stop()
        drop_database(url, admin)


if __name__ == "__main__":
    raise SystemExit(main())
