"""The whole pipeline with the reference firmware: box -> Mosquitto -> ingest -> PostgreSQL -> API.

Boxes box-052 .. box-056 belong to this module.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from backend.ingest.worker import IngestWorker
from contract import MessageKind, SizeClass, encode, topic_for
from contract.messages import Command, CommandAction, ParcelCollected, ParcelDeposited
from firmware_stub.box import BoxFirmware
from firmware_stub.db import DB_FILE
from molo.brokers import RunningBroker, free_port
from molo.provision import Credentials
from tests.fixtures.broker import close, mqtt_client, publish
from tests.fixtures.pipeline import scalar, wait_for

T0 = 1_767_225_600_000


def firmware(broker: RunningBroker, credentials: Credentials, box_id: str, state: Path, **kw: Any) -> BoxFirmware:
    box = BoxFirmware(box_id, credentials.boxes[box_id], broker.host, broker.port, state / box_id, keepalive=2, **kw)
    box.start()
    assert box.wait_connected(10), f"{box_id} did not connect"
    return box


def test_firmware_events_reach_the_api(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, api: httpx.Client, tmp_path: Path
) -> None:
    """Events a firmware stub emits are returned by the API in order, with device timestamps."""
    clock = iter(range(T0, T0 + 10_000_000, 60_000))
    box = firmware(broker, credentials, "box-052", tmp_path, clock=lambda: next(clock))
    try:
        box.emit(ParcelDeposited(compartment=4, size_class=SizeClass.A, parcel_id="PX-1", carrier="postnord"))
        box.emit(ParcelCollected(compartment=4, parcel_id="PX-1"))
        box.telemetry(temperature_c=7.5)
        assert box.flush(10)
        page = wait_for(lambda: len((p := api.get("/api/v1/boxes/box-052/events").json()).get("items", [])) == 2 and p)
        assert [e["type"] for e in page["items"]] == ["parcel.deposited", "parcel.collected"]
        assert [e["seq"] for e in page["items"]] == [1, 2]
        assert page["items"][0]["ts"].startswith("2026-01-01T00:0")
        detail = wait_for(lambda: (d := api.get("/api/v1/boxes/box-052").json()).get("telemetry") and d)
        assert detail["online"] is True
        assert detail["temperature_c"] == 7.5
        assert detail["firmware"]
    finally:
        box.stop()


def test_box_killed_goes_offline_and_comes_back_online(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, api: httpx.Client, tmp_path: Path
) -> None:
    """A box dying without DISCONNECT shows offline (Last Will); restarted, it is online with a newer session."""
    box = firmware(broker, credentials, "box-053", tmp_path)
    first = wait_for(lambda: (b := api.get("/api/v1/boxes/box-053").json()).get("online") and b)
    box.kill()
    offline = wait_for(lambda: (b := api.get("/api/v1/boxes/box-053").json())["online"] is False and b)
    assert offline["status_reason"] == "connection_lost"
    assert offline["session"] == first["session"]
    again = firmware(broker, credentials, "box-053", tmp_path)
    try:
        back = wait_for(lambda: (b := api.get("/api/v1/boxes/box-053").json())["online"] and b)
        assert back["session"] == first["session"] + 1
        assert back["status_reason"] == "birth"
    finally:
        again.stop()
    stopped = wait_for(lambda: (b := api.get("/api/v1/boxes/box-053").json())["online"] is False and b)
    assert stopped["status_reason"] == "shutdown"


def test_outbox_replay_after_box_restart_is_stored_once(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    """A whole outbox replayed (the box's disk restored to before its acks) is stored once: every
    replayed event counts as a duplicate and numbering continues after it."""
    box_id = "box-054"
    state = tmp_path / box_id
    # 1. The box records 30 events while it cannot reach any broker (nothing listens on that port).
    offline = BoxFirmware(box_id, credentials.boxes[box_id], broker.host, free_port(), state, keepalive=2)
    offline.start()
    for i in range(30):
        offline.emit(ParcelDeposited(compartment=5, size_class=SizeClass.A, parcel_id=f"R-{i}", carrier="gls"))
    assert offline.pending_count == 30
    offline.kill()
    snapshot = tmp_path / "snapshot.sqlite3"
    with sqlite3.connect(state / DB_FILE) as src, sqlite3.connect(snapshot) as dst:
        src.backup(dst)  # the disk as it was: 30 events not yet acknowledged
    # 2. It comes online: the outbox is delivered and stored.
    box = firmware(broker, credentials, box_id, tmp_path)
    assert box.flush(15)
    box.stop()
    wait_for(lambda: scalar(db, "SELECT count(*) FROM events WHERE box_id = %s", (box_id,)) == 30)
    before = ingest.totals.duplicates
    # 3. Its disk is rolled back to the snapshot: the same 30 events are replayed, then 10 new ones.
    for leftover in state.glob(f"{DB_FILE}*"):
        leftover.unlink()
    with sqlite3.connect(snapshot) as src, sqlite3.connect(state / DB_FILE) as dst:
        src.backup(dst)
    # Counted on the restored disk, before the box starts: once connected it replays at once, so its
    # own pending count may already be falling.
    with sqlite3.connect(state / DB_FILE) as restored:
        assert restored.execute("SELECT count(*) FROM outbox").fetchone() == (30,)
    again = firmware(broker, credentials, box_id, tmp_path)
    try:
        for i in range(30, 40):
            again.emit(ParcelDeposited(compartment=5, size_class=SizeClass.A, parcel_id=f"R-{i}", carrier="gls"))
        assert again.flush(15)
        wait_for(lambda: scalar(db, "SELECT count(*) FROM events WHERE box_id = %s", (box_id,)) == 40)
        wait_for(lambda: ingest.totals.duplicates - before >= 30)
        seqs = [r[0] for r in db.execute("SELECT seq FROM events WHERE box_id = %s ORDER BY seq", (box_id,))]
        assert seqs == list(range(1, 41))
        assert scalar(db, "SELECT count(*) FROM dead_letters WHERE box_id = %s", (box_id,)) == 0
    finally:
        again.stop()


def test_command_acknowledgement_updates_the_command(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """A command sent to a box is executed and its acknowledgement, ingested, marks the command succeeded."""
    box = firmware(broker, credentials, "box-055", tmp_path)
    command_id = uuid.uuid4()
    db.execute(
        "INSERT INTO commands (command_id, box_id, action, compartment, status) "
        "VALUES (%s, 'box-055', 'open_compartment', 4, 'sent')",
        (command_id,),
    )
    sender = mqtt_client(broker, "ingest", credentials.services["ingest"])
    try:
        command = Command(
            v=1, command_id=command_id, box_id="box-055", ts_ms=T0, action=CommandAction.OPEN_COMPARTMENT, compartment=4
        )
        assert not publish(sender, topic_for("box-055", MessageKind.COMMANDS), encode(command)).is_failure
        wait_for(lambda: scalar(db, "SELECT status FROM commands WHERE command_id = %s", (command_id,)) == "succeeded")
        assert scalar(db, "SELECT acked_at IS NOT NULL FROM commands WHERE command_id = %s", (command_id,))
    finally:
        close(sender)
        box.stop()
