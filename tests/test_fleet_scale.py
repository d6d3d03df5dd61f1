"""A thousand boxes in one process (issue 9, part 4): limited by memory, not by ``select()``.

``select()`` cannot watch file descriptors above 1024, and one process running a thousand firmware
stubs holds several thousand. This runs ``molo boxes --count 1000`` as a real process against a
Mosquitto of its own (broker_config, credentials for the thousand boxes) and checks that every box
comes online, that the process really used descriptors above 1024, and that it stops cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from contract.topics import MessageKind, subscription
from firmware_stub.db import DB_FILE
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import Credentials, box_ids, provision
from tests.fixtures.broker import mqtt_client, subscribe

COUNT = 1000


def open_fds(pid: int) -> list[int]:
    return [int(name) for name in os.listdir(f"/proc/{pid}/fd")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watch_births(broker: RunningBroker, creds: Credentials) -> tuple[mqtt.Client, set[str]]:
    """A service client that collects the ids of boxes whose retained birth (online) it has seen."""
    watcher = mqtt_client(broker, "ingest", creds.services["ingest"])
    online: set[str] = set()

    def on_status(_client: object, _userdata: object, message: object) -> None:
        status = json.loads(message.payload)  # type: ignore[attr-defined]
        if status.get("online"):
            online.add(status["box_id"])

    watcher.on_message = on_status
    assert not subscribe(watcher, subscription(MessageKind.STATUS)).is_failure
    return watcher, online


def launch_boxes(
    tmp_path: Path, broker: RunningBroker, creds: Credentials, count: int, *extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MOLO_MQTT_HOST": broker.host, "MOLO_MQTT_PORT": str(broker.port)}
    with (tmp_path / "boxes.err").open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "molo.cli",
                "--log-level",
                "WARNING",
                "boxes",
                "--count",
                str(count),
                "--prefix",
                "flt",
                "--credentials",
                str(creds.path),
                "--state-dir",
                str(tmp_path / "state"),
                "--rate",
                "0.01",
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def wait_online(proc: subprocess.Popen[bytes], online: set[str], count: int, stderr: Path) -> None:
    deadline = time.monotonic() + 300  # about 10 s on a quiet machine; the rest is room for a loaded one
    while len(online) < count and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, stderr.read_text()[-2000:]
    assert len(online) == count, f"{len(online)} of {count} online; stderr: {stderr.read_text()[-2000:]}"


def tear_down(proc: subprocess.Popen[bytes], watcher: mqtt.Client, broker: RunningBroker) -> None:
    """Kill the boxes if they are still running, close the watcher, stop the broker."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    watcher.disconnect()
    watcher.loop_stop()
    broker.stop()


def test_a_thousand_boxes_run_in_one_process(tmp_path: Path) -> None:
    """`molo boxes --count 1000` brings every one of 1,000 boxes online from one process (file
    descriptors above 1024 in use, no select() errors) and stops within a minute."""
    ids = box_ids(COUNT, prefix="flt")
    creds = provision(tmp_path / "creds", ids, service_users=("ingest",))
    broker = start_mosquitto(tmp_path / "broker", creds)
    watcher, online = watch_births(broker, creds)
    stderr = tmp_path / "boxes.err"
    proc = launch_boxes(tmp_path, broker, creds, COUNT)
    try:
        launched = time.monotonic()
        wait_online(proc, online, COUNT, stderr)
        fds = open_fds(proc.pid)
        assert max(fds) > 1024, f"highest descriptor {max(fds)}: the test did not reach select()'s limit"
        threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        assert threads < 50, f"{threads} threads for {COUNT} boxes: the fleet should share one loop"
        print(
            f"{COUNT} boxes online from one process {time.monotonic() - launched:.0f} s after its start: "
            f"{len(fds)} open files, {threads} threads, RSS {rss_mb(proc.pid):.0f} MB"
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        print(f"stopped in {time.monotonic() - started:.1f} s")
    finally:
        tear_down(proc, watcher, broker)
    errors = stderr.read_text()
    assert "out of range" not in errors
    assert "Traceback" not in errors, errors[-2000:]


def test_boxes_spread_over_processes_come_online_and_stop_together(tmp_path: Path) -> None:
    """`molo boxes --count 300 --processes 3` runs three child processes, each with every third box;
    all 300 come online, each box exactly once, and SIGTERM to the parent stops every child cleanly."""
    count = 300
    ids = box_ids(count, prefix="flt")
    creds = provision(tmp_path / "creds", ids, service_users=("ingest",))
    broker = start_mosquitto(tmp_path / "broker", creds)
    watcher, online = watch_births(broker, creds)
    stderr = tmp_path / "boxes.err"
    proc = launch_boxes(tmp_path, broker, creds, count, "--processes", "3")
    try:
        wait_online(proc, online, count, stderr)
        assert online == set(ids)
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert all(not Path(f"/proc/{child}").exists() for child in children)
        # A box run by two processes would have its connection taken over again and again (one client
        # id), each reconnect a new session: every box connected once, in session 1.
        sessions = {}
        for box_id in ids:
            with contextlib.closing(sqlite3.connect(tmp_path / "state" / box_id / DB_FILE)) as db:
                sessions[box_id] = db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()[0]
        assert set(sessions.values()) == {1}, {b: s for b, s in sessions.items() if s != 1}
    finally:
        tear_down(proc, watcher, broker)
    assert "Traceback" not in stderr.read_text()


pytestmark = pytest.mark.timeout(480)
