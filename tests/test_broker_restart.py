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
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import box_ids, provision
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


def emit_stream(boxes: list[BoxFirmware], done: threading.Event) -> None:
    """EVENTS_PER_BOX events per box, round-robin, at a steady pace (boxes keep emitting while the
    broker is down: their events wait in the outbox)."""
    try:
        for n in range(EVENTS_PER_BOX):
            for box in boxes:
                box.emit(parcel(box.box_id, n))
            time.sleep(ROUND_S)
    finally:
        done.set()


def stored_per_box(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    rows = conn.execute("SELECT box_id, array_agg(seq ORDER BY seq) FROM events GROUP BY box_id").fetchall()
    return {box_id: list(seqs) for box_id, seqs in rows}


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
            ingest.append(worker)
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
            )
            box.start()
            boxes.append(box)
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

        with psycopg.connect(database_url, autocommit=True) as conn:
            total = BOXES * EVENTS_PER_BOX
            wait_for(lambda: conn.execute("SELECT count(*) FROM events").fetchone() == (total,), timeout=30)
            per_box = stored_per_box(conn)
            assert sorted(per_box) == ids
            wrong = {b: seqs for b, seqs in per_box.items() if seqs != list(range(1, EVENTS_PER_BOX + 1))}
            assert wrong == {}
            assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
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
