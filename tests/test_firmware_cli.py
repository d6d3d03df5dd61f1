"""``python -m firmware_stub``: one box as its own process, against the real test broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from contract import MessageKind, decode_event, decode_status, topic_for
from contract.messages import StatusReason
from firmware_stub.cli import PASSWORD_ENV, load_password, main
from molo.brokers import RunningBroker
from molo.provision import Credentials
from tests.fixtures.broker import close, mqtt_client, next_message, subscribe


@contextmanager
def firmware(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m firmware_stub ARGS`` with its output in ``log``; killed if still running after."""
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "firmware_stub", *args], stdout=out, stderr=out, env=env)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def wait_exit(process: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    """The exit code, with the process's output in the failure message if it does not end in time."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"firmware still running after {timeout} s; output:\n{log.read_text()[-3000:]}")


def test_cli_runs_a_demo_box_and_stops_cleanly_on_sigterm(
    broker: RunningBroker, credentials: Credentials, tmp_path: Path
) -> None:
    """With --demo-rate the process sends valid events and telemetry; SIGTERM ends it with exit code 0
    after a 'shutdown' offline status."""
    box_id = "box-036"
    listener = mqtt_client(broker, "ingest", credentials.services["ingest"])
    assert not subscribe(listener, f"molo/v1/boxes/{box_id}/#").is_failure
    log = tmp_path / "firmware.log"
    with firmware(
        log,
        "--box-id",
        box_id,
        "--credentials",
        str(credentials.path),
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--state-dir",
        str(tmp_path / box_id),
        "--demo-rate",
        "50",
        "--telemetry-interval",
        "0.2",
        "--seed",
        "1",
    ) as process:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 10
        while (seen.get("events", 0) < 5 or seen.get("telemetry", 0) < 2) and time.monotonic() < deadline:
            message = next_message(listener, 0.5)
            if message is None:
                continue
            kind = message.topic.removeprefix(f"molo/v1/boxes/{box_id}/")
            seen[kind] = seen.get(kind, 0) + 1
            if kind in ("events", "telemetry"):
                decode_event(bytes(message.payload), topic_box_id=box_id)  # raises if invalid
        assert seen.get("events", 0) >= 5, (seen, log.read_text()[-3000:])
        assert seen.get("telemetry", 0) >= 2, seen
        process.send_signal(signal.SIGTERM)
        assert wait_exit(process, log, 10) == 0
        status_topic = topic_for(box_id, MessageKind.STATUS)
        last = None
        while (message := next_message(listener, 1.0)) is not None:
            if message.topic == status_topic:
                last = decode_status(bytes(message.payload), topic_box_id=box_id)
        assert last is not None
        assert (last.online, last.reason) == (False, StatusReason.SHUTDOWN)
    close(listener)


def test_cli_exits_3_when_the_broker_refuses_the_password(broker: RunningBroker, tmp_path: Path) -> None:
    """A wrong password (here from $MOLO_BOX_PASSWORD) ends the process with exit code 3."""
    env = dict(os.environ, **{PASSWORD_ENV: "wrong-password"})
    log = tmp_path / "firmware.log"
    with firmware(
        log,
        "--box-id",
        "box-037",
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--state-dir",
        str(tmp_path / "box-037"),
        env=env,
    ) as process:
        assert wait_exit(process, log, 15) == 3


def test_cli_without_a_password_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No --credentials and no $MOLO_BOX_PASSWORD: exit code 2 before anything starts."""
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert main(["--box-id", "box-038", "--state-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "box.sqlite3").exists()


def test_password_comes_from_the_credentials_file(credentials: Credentials) -> None:
    """load_password reads the box's entry of credentials.json and refuses unknown boxes."""
    assert load_password("box-036", credentials.path) == credentials.boxes["box-036"]
    with pytest.raises(ValueError, match="no password for box"):
        load_password("box-999", credentials.path)
