"""Demo calm: how many of the demo's boxes are not green at a time, and why.

Method: `molo demo` exactly as the README's first command runs it (embedded PostgreSQL and
Mosquitto, the 50 Aalborg boxes, 3,600 simulated seconds a wall second), with a fresh `--var`.
Once the API answers and every box has come online (start-up), `GET /api/v1/boxes` and
`GET /api/v1/alerts?state=open` are sampled every `--every` seconds for `--seconds`.
A box is non-green as the dashboard colours it
(backend/dashboard/static/dashboard.js, statusOf): in maintenance, offline, or with an
`alert_level` (an open alert of severity critical or warning). Per sample the non-green boxes are
counted and each is given its reasons (offline, or the kinds of its colouring alerts); the open
info alerts (parcel near expiry, which never colour a box) are counted beside them.

Run: `uv run python bench/demo_calm.py [--seconds 120] [--every 2]`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Calm:
    """What the samples saw."""

    samples: int = 0
    non_green: list[int] = field(default_factory=list)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    info_open: list[int] = field(default_factory=list)
    simulated_days: float = 0.0
    startup_s: float = 0.0


def reasons_of(box: dict[str, Any], alerts: list[dict[str, Any]]) -> list[str]:
    """Why the dashboard does not show ``box`` green (empty: it is green)."""
    if box.get("maintenance"):
        return ["maintenance"]
    if not box["online"]:
        return ["offline"]
    if box.get("alert_level"):
        kinds = sorted({a["kind"] for a in alerts if a["box_id"] == box["box_id"] and a["severity"] != "info"})
        return kinds or [f"alert_level {box['alert_level']}"]
    return []


def all_online(client: httpx.Client) -> bool:
    boxes = client.get("/api/v1/boxes").json()
    return bool(boxes) and all(b["online"] for b in boxes)


def sample(client: httpx.Client, calm: Calm) -> None:
    boxes = client.get("/api/v1/boxes").json()
    alerts = client.get("/api/v1/alerts", params={"state": "open", "limit": 1000}).json()
    alerts = alerts.get("items", alerts) if isinstance(alerts, dict) else alerts
    coloured = 0
    for box in boxes:
        why = reasons_of(box, alerts)
        if why:
            coloured += 1
            calm.reasons.update(why)
    calm.samples += 1
    calm.non_green.append(coloured)
    calm.info_open.append(sum(1 for a in alerts if a["severity"] == "info"))


def run(seconds: float, every: float, var: Path) -> Calm:
    """Start the demo, sample it for ``seconds``, stop it with SIGINT as a terminal would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "demo", "--port", "0", "--var", str(var)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:  # drain the demo's output all along, or its pipe fills and it blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "API key" in line:
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not up.wait(180):
            raise SystemExit("the demo's API did not come up:\n" + "".join(lines))
        text = "".join(lines)
        url = re.search(r"API\s+(http://\S+)/api/v1/boxes", text)
        key = re.search(r"API key\s+(molo_\S+)", text)
        if url is None or key is None:
            raise SystemExit("the demo printed no API address or key:\n" + text)
        calm = Calm()
        with httpx.Client(base_url=url.group(1), headers={"X-API-Key": key.group(1)}, timeout=30) as client:
            started = time.monotonic()
            while not all_online(client):  # start-up: every box connects once
                if time.monotonic() - started > 120:
                    raise SystemExit("not every box came online within 120 s")
                time.sleep(0.5)
            calm.startup_s = time.monotonic() - started
            end = time.monotonic() + seconds
            next_at = time.monotonic()
            while time.monotonic() < end:
                sample(client, calm)
                next_at += every
                time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        proc.stdout.close()
    clock = re.findall(r"simulated (\d{4}-\d\d-\d\d \d\d:\d\d)", "".join(lines))
    if len(clock) >= 2:
        first, last = (datetime.strptime(c, "%Y-%m-%d %H:%M") for c in (clock[0], clock[-1]))
        calm.simulated_days = (last - first).total_seconds() / 86_400
    return calm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="wall seconds to sample (default 120)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calm = run(args.seconds, args.every, Path(tmp) / "var")
    n = calm.non_green
    print(
        f"demo calm: 50 boxes at 3600x, {calm.samples} samples every {args.every:g} s over {args.seconds:g} s "
        f"(about {calm.simulated_days:.1f} simulated days), from when every box had come online "
        f"({calm.startup_s:.1f} s after the API was up)"
    )
    mean, median = statistics.fmean(n), statistics.median(n)
    print(f"  non-green boxes per sample: max {max(n)}, mean {mean:.2f}, median {median:g}")
    print(f"  samples with more than 5 non-green: {sum(1 for x in n if x > 5)} of {len(n)}")
    print(f"  open info alerts (never colour a box): max {max(calm.info_open)}")
    print("  reasons (box-samples): " + ", ".join(f"{k} {v}" for k, v in calm.reasons.most_common()))


if __name__ == "__main__":
    main()
