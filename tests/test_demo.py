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
import pytest


@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_runs_the_whole_pipeline_on_embedded_defaults(tmp_path: Path, broker: str) -> None:
    """`molo demo` starts its own PostgreSQL and broker (Mosquitto, or the amqtt fallback), runs the live
    simulator's boxes through them into storage, serves the API behind the operator key it prints, and stops
    cleanly on SIGINT."""
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
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "stopped cleanly" in output
    assert ("in-process amqtt" in output) == (broker == "amqtt")
    assert "Traceback" not in output
