"""Nothing lost when the broker restarts mid-stream (issue 9, part 1): counted, on the real pipeline.

Firmware stubs stream events through a Mosquitto of this test's own (broker_config, its own
credentials) into ingest workers and a fresh database, while the broker is killed (SIGKILL: only
what it had autosaved survives) or restarted gracefully, several times. Two broker behaviours used
to lose events here: a PUBACK with reason code 16 ("no matching subscribers", between the restart
and the ingest's new SUBSCRIBE) counted as delivered, and a crash lost what the broker had
acknowledged but not handed on. Now a box keeps every row until the ingest's receipt says it is
committed, and hands again what had no subscriber. Every event must be stored exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from backend.ingest.run import build_worker
from backend.ingest.worker import IngestWorker
from backend.settings import Settings
from contract import SizeClass
from contract.messages import ParcelDeposited
from firmware_stub.box import BoxFirmware
from firmware_stub.loop import BoxLoop
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import Credentials, box_ids, provision
from tests.fixtures.database import FLAVOURS, own_database
from tests.fixtures.pipeline import wait_for

BOXES = 30
EVENTS_PER_BOX = 100
RESTARTS = 3
#: The stream's pace: one round over every box this often (about 600 events/s in all).
ROUND_S = 0.05


@pytest.fixture(params=FLAVOURS)
def database_url(request: pytest.FixtureRequest, pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated database of this test alone."""
    with own_database(request.param, pg_admin_url, "restart") as url:
        yield url


def parcel(box_id: str, n: int) -> ParcelDeposited:
    return ParcelDeposited(compartment=5, size_class=SizeClass.A, parcel_id=f"P-{box_id}-{n}", carrier="gls")


def emit_stream(boxes: list[BoxFirmware], done: threading.Event, events: int = EVENTS_PER_BOX) -> None:
    """``events`` events per box, round-robin, at a steady pace (boxes keep emitting while the
    broker is down: their events wait in the outbox)."""
    try:
        for n in range(events):
            for box in boxes:
                box.emit(parcel(box.box_id, n))
            time.sleep(ROUND_S)
    finally:
        done.set()


def stored_per_box(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    rows = conn.execute("SELECT box_id, array_agg(seq ORDER BY seq) FROM events GROUP BY box_id").fetchall()
    return {box_id: list(seqs) for box_id, seqs in rows}


def start_ingest_workers(
    database_url: str, broker: RunningBroker, creds: Credentials, users: list[str]
) -> list[IngestWorker]:
    workers = []
    for user in users:
        settings = Settings(
            database_url=database_url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            mqtt_username=user,
            mqtt_password=SecretStr(creds.services[user]),
            worker_id=user,
            ingest_batch_wait_ms=20,
        )
        worker = build_worker(settings)
        worker.start()
        assert worker.mqtt.subscribed.wait(10), worker.mqtt.last_error
        workers.append(worker)
    return workers


def start_boxes(
    tmp_path: Path, broker: RunningBroker, creds: Credentials, ids: list[str], loop: BoxLoop | None = None
) -> list[BoxFirmware]:
    """The boxes, started, retrying fast (a restart takes the broker away for a moment only)."""
    boxes = []
    for i, box_id in enumerate(ids):
        box = BoxFirmware(
            box_id,
            creds.boxes[box_id],
            broker.host,
            broker.port,
            tmp_path / "boxes" / box_id,
            reconnect_min_delay=0.05,
            reconnect_max_delay=1.0,
            rng=random.Random(i),
            synchronous="NORMAL",
            loop=loop,
        )
        box.start()
        boxes.append(box)
    return boxes


def check_stored_once(database_url: str, ids: list[str], events: int) -> None:
    """Every box's seqs 1..events stored, each once, and no dead letters."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        total = len(ids) * events
        wait_for(lambda: conn.execute("SELECT count(*) FROM events").fetchone() == (total,), timeout=30)
        per_box = stored_per_box(conn)
        assert sorted(per_box) == ids
        wrong = {b: seqs for b, seqs in per_box.items() if seqs != list(range(1, events + 1))}
        assert wrong == {}
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fault", ["kill", "graceful"])
def test_broker_restarts_mid_stream_lose_nothing(tmp_path: Path, database_url: str, workers: int, fault: str) -> None:
    """Three broker restarts (SIGKILL, or SIGTERM) during a stream of 3,000 events from 30 boxes into 1 or 2
    ingest workers: every event is stored exactly once, and no box's outbox keeps a row."""
    ids = box_ids(BOXES, prefix="rst")
    users = [f"ingest-{w}" for w in range(1, workers + 1)]
    creds = provision(tmp_path / "creds", ids, service_users=users)
    broker = start_mosquitto(tmp_path / "broker", creds)
    ingest: list[IngestWorker] = []
    boxes: list[BoxFirmware] = []
    try:
        ingest = start_ingest_workers(database_url, broker, creds, users)
        boxes = start_boxes(tmp_path, broker, creds, ids)
        assert all(box.wait_connected(10) for box in boxes)

        done = threading.Event()
        emitter = threading.Thread(target=emit_stream, args=(boxes, done), daemon=True)
        emitter.start()
        for _ in range(RESTARTS):
            time.sleep(1.0)
            restart(broker, fault)
        emitter.join(60)
        assert done.is_set()
        unflushed = [box.box_id for box in boxes if not box.flush(60)]
        assert unflushed == [], f"outboxes not emptied: {unflushed}"

        check_stored_once(database_url, ids, EVENTS_PER_BOX)
        total = BOXES * EVENTS_PER_BOX
        resent = sum(box.stats.resent for box in boxes)
        no_subscribers = sum(box.stats.no_subscribers for box in boxes)
        print(
            f"{fault} x{RESTARTS}, {workers} worker(s): {total} stored once; "
            f"{resent} re-sent, {no_subscribers} PUBACK 16"
        )
    finally:
        for box in boxes:
            box.kill()
        for worker in ingest:
            worker.stop()
        broker.stop()


def restart(broker: RunningBroker, fault: str) -> None:
    """Crash (SIGKILL) or stop (SIGTERM) the broker, and start it again on the same port and data."""
    if fault == "kill":
        broker.kill()
    else:
        broker.stop()
    time.sleep(0.3)
    broker.start()


FLEET_BOXES = 300
FLEET_EVENTS = 20


def test_a_fleet_on_one_loop_loses_nothing_through_broker_crashes(tmp_path: Path, database_url: str) -> None:
    """300 boxes on one shared BoxLoop (a few threads for all of them, not three per box) stream 6,000
    events while the broker is killed (SIGKILL) three times: every box reconnects each time with a
    new session, every event is stored exactly once, and no outbox keeps a row."""
    ids = box_ids(FLEET_BOXES, prefix="flr")
    creds = provision(tmp_path / "creds", ids, service_users=["ingest-1"])
    broker = start_mosquitto(tmp_path / "broker", creds)
    ingest: list[IngestWorker] = []
    boxes: list[BoxFirmware] = []
    loop = BoxLoop("fleet", connectors=4).start()
    try:
        ingest = start_ingest_workers(database_url, broker, creds, ["ingest-1"])
        boxes = start_boxes(tmp_path, broker, creds, ids, loop)
        assert all(box.wait_connected(30) for box in boxes)
        assert loop.attached == FLEET_BOXES
        first_sessions = {box.box_id: box.session for box in boxes}

        done = threading.Event()
        emitter = threading.Thread(target=emit_stream, args=(boxes, done, FLEET_EVENTS), daemon=True)
        emitter.start()
        for _ in range(RESTARTS):
            time.sleep(1.0)
            restart(broker, "kill")
        emitter.join(60)
        assert done.is_set()
        unflushed = [box.box_id for box in boxes if not box.flush(90)]
        assert unflushed == [], f"{len(unflushed)} outboxes not emptied: {unflushed[:5]}"
        check_stored_once(database_url, ids, FLEET_EVENTS)
        assert all(box.wait_connected(30) for box in boxes)
        assert all(box.session > first_sessions[box.box_id] for box in boxes)
        assert min(box.stats.connects for box in boxes) >= 2
    finally:
        for box in boxes:
            box.kill()
        assert loop.attached == 0
        loop.stop()
        for worker in ingest:
            worker.stop()
        broker.stop()
