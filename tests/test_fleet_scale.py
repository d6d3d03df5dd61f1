"""A thousand boxes in one process (issue 9, part 4): limited by memory, not by ``select()``.

``select()`` cannot watch file descriptors above 1024, and one process running a thousand firmware
stubs holds several thousand. This runs ``molo boxes --count 1000`` as a real process against a
Mosquitto of its own (broker_config, credentials for the thousand boxes) and checks that every box
comes online, that the process really used descriptors above 1024, and that it stops cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.topics import MessageKind, subscription
from molo.brokers import start_mosquitto
from molo.provision import box_ids, provision
from tests.fixtures.broker import mqtt_client, subscribe

COUNT = 1000


def open_fds(pid: int) -> list[int]:
    return [int(name) for name in os.listdir(f"/proc/{pid}/fd")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_thousand_boxes_run_in_one_process(tmp_path: Path) -> None:
    """`molo boxes --count 1000` brings every one of 1,000 boxes online from one process (file
    descriptors above 1024 in use, no select() errors) and stops within a minute."""
    ids = box_ids(COUNT, prefix="flt")
    creds = provision(tmp_path / "creds", ids, service_users=("ingest",))
    broker = start_mosquitto(tmp_path / "broker", creds)
    watcher = mqtt_client(broker, "ingest", creds.services["ingest"])
    online: set[str] = set()

    def on_status(_client: object, _userdata: object, message: object) -> None:
        status = json.loads(message.payload)  # type: ignore[attr-defined]
        if status.get("online"):
            online.add(status["box_id"])

    watcher.on_message = on_status
    assert not subscribe(watcher, subscription(MessageKind.STATUS)).is_failure
    env = {**os.environ, "MOLO_MQTT_HOST": broker.host, "MOLO_MQTT_PORT": str(broker.port)}
    stderr = tmp_path / "boxes.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "molo.cli",
                "--log-level",
                "WARNING",
                "boxes",
                "--count",
                str(COUNT),
                "--prefix",
                "flt",
                "--credentials",
                str(creds.path),
                "--state-dir",
                str(tmp_path / "state"),
                "--rate",
                "0.01",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        launched = time.monotonic()
        deadline = launched + 300  # about 60 s on a quiet machine; the rest is room for a loaded one
        while len(online) < COUNT and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, stderr.read_text()[-2000:]
        assert len(online) == COUNT, f"{len(online)} of {COUNT} online; stderr: {stderr.read_text()[-2000:]}"
        fds = open_fds(proc.pid)
        assert max(fds) > 1024, f"highest descriptor {max(fds)}: the test did not reach select()'s limit"
        print(
            f"{COUNT} boxes online from one process {time.monotonic() - launched:.0f} s after its start: "
            f"{len(fds)} open files, RSS {rss_mb(proc.pid):.0f} MB"
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        print(f"stopped in {time.monotonic() - started:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.disconnect()
        watcher.loop_stop()
        broker.stop()
    errors = stderr.read_text()
    assert "out of range" not in errors
    assert "Traceback" not in errors, errors[-2000:]


pytestmark = pytest.mark.timeout(480)
