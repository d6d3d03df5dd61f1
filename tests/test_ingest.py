"""End to end through the real broker and PostgreSQL: boxes publish, ingest stores, the API shows.

Each test uses its own box ids (box-040 ..) so tests stay independent in the shared test database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
from psycopg.conninfo import conninfo_to_dict

from backend.ingest.mqtt import Received
from backend.ingest.worker import IngestWorker
from backend.ingest.writer import BatchWriter
from contract import MessageKind, SizeClass, WasteFraction, default_layout, encode, make_event, topic_for
from contract.messages import (
    CommandAck,
    CommandResult,
    CompartmentReading,
    ParcelCollected,
    ParcelDeposited,
    PowerSource,
    RedBoxReading,
    Status,
    StatusReason,
    Telemetry,
    WasteDeposited,
)
from molo.brokers import RunningBroker
from molo.provision import Credentials
from tests.fixtures.broker import close, mqtt_client, publish
from tests.fixtures.database import DatabaseUnderTest
from tests.fixtures.pipeline import scalar, settings_for, wait_for, wait_rows

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def box_client(broker: RunningBroker, credentials: Credentials, box_id: str) -> mqtt.Client:
    return mqtt_client(broker, box_id, credentials.boxes[box_id])


def deposited(box_id: str, seq: int, *, compartment: int = 5, session: int = 1, ts_ms: int | None = None) -> bytes:
    payload = ParcelDeposited(
        compartment=compartment, size_class=SizeClass.A, parcel_id=f"P-{box_id}-{seq}", carrier="gls"
    )
    return encode(make_event(box_id=box_id, seq=seq, session=session, ts_ms=ts_ms or T0 + seq * 1000, payload=payload))


def birth(box_id: str, session: int, online: bool = True, reason: StatusReason | None = None) -> bytes:
    return encode(
        Status(
            v=1,
            box_id=box_id,
            online=online,
            session=session,
            reason=reason,
            ts_ms=T0,
            firmware="test",
            layout=default_layout() if online else None,
        )
    )


def events_of(db: psycopg.Connection[Any], box_id: str) -> list[tuple[int, str]]:
    return [
        (r[0], r[1])
        for r in db.execute("SELECT seq, type FROM events WHERE box_id = %s ORDER BY seq", (box_id,)).fetchall()
    ]


def test_event_flows_from_box_to_api(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    db: psycopg.Connection[Any],
    api: httpx.Client,
) -> None:
    """An event a box publishes is stored once and returned by the API with its payload."""
    box = "box-041"
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.STATUS), birth(box, 1), retain=True)
    publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, 1))
    close(client)
    wait_for(lambda: events_of(db, box) == [(1, "parcel.deposited")])

    page = api.get(f"/api/v1/boxes/{box}/events").json()
    assert [(e["seq"], e["type"]) for e in page["items"]] == [(1, "parcel.deposited")]
    assert page["items"][0]["payload"]["parcel_id"] == f"P-{box}-1"
    assert page["items"][0]["ts"].startswith("2026-01-01T00:00:01")
    detail = api.get(f"/api/v1/boxes/{box}").json()
    assert detail["online"] is True
    assert detail["status_reason"] == "birth"
    assert len(detail["compartments"]) == len(default_layout().compartments)
    assert detail["last_seq"] == 1
    listed = {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}
    assert listed[box]["online"] is True


def test_redelivered_and_replayed_events_are_stored_once(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    db: psycopg.Connection[Any],
    api: httpx.Client,
) -> None:
    """The same event twice, and a whole outbox replayed after it, leave exactly one row per seq."""
    box = "box-042"
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    for seq in (1, 1, 2, 3):
        publish(client, topic, deposited(box, seq))
    wait_for(lambda: len(events_of(db, box)) == 3)
    for seq in range(1, 11):  # a replayed outbox: 1..3 again, then new ones
        publish(client, topic, deposited(box, seq))
    close(client)
    wait_for(lambda: len(events_of(db, box)) == 10)
    time.sleep(0.3)  # let any stray duplicate land before counting
    assert [s for s, _ in events_of(db, box)] == list(range(1, 11))
    assert ingest.totals.duplicates >= 4
    # The worker's counters are committed with the rows, and /metrics reports them.
    events, duplicates = db.execute(
        "SELECT events, duplicates FROM ingest_workers WHERE worker_id = %s", (ingest.worker_id,)
    ).fetchone() or (None, None)
    assert events == 10
    assert duplicates == ingest.totals.duplicates
    metrics = api.get("/metrics").text
    assert f'molo_ingest_events_total{{worker="{ingest.worker_id}"}} 10.0' in metrics
    assert f'molo_ingest_duplicates_total{{worker="{ingest.worker_id}"}} {float(duplicates)}' in metrics


def test_reused_seq_with_other_content_is_dead_lettered_not_dropped(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """A (box, seq) already stored is not stored again, and if its content differs (a box that reused
    a seq, e.g. after a wiped flash) it is kept as a seq_conflict dead letter, while true repeats are
    counted as duplicates."""
    box = "box-043"
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    publish(client, topic, deposited(box, 1))
    publish(client, topic, deposited(box, 2))
    wait_for(lambda: len(events_of(db, box)) == 2)
    clash = deposited(box, 1, ts_ms=T0 + 999_999_000)  # same seq, other content, other month
    publish(client, topic, clash)
    publish(client, topic, deposited(box, 2))  # a true repeat
    publish(client, topic, deposited(box, 3))
    close(client)
    wait_for(lambda: len(events_of(db, box)) == 3)
    assert scalar(db, "SELECT count(*) FROM events WHERE box_id = %s AND seq = 1", (box,)) == 1
    rows = wait_rows(db, "SELECT error_code, reason, payload FROM dead_letters WHERE box_id = %s", (box,), 1)
    assert rows[0][0] == "seq_conflict"
    assert "seq 1 of box box-043" in rows[0][1]
    assert bytes(rows[0][2]) == clash


def test_malformed_payloads_are_dead_lettered_and_ingest_goes_on(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """Each malformed payload lands in dead_letters with its code and raw bytes; valid ones still flow."""
    box = "box-044"
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.STATUS), birth(box, 1), retain=True)
    topic = topic_for(box, MessageKind.EVENTS)
    good = deposited(box, 1)
    bad = {
        b"{not json": "invalid_json",
        good.replace(b'"seq":1', b'"seq":"1"'): "wrong_type",
        good.replace(b'"carrier":"gls"', b'"carrier":"gls","extra":true'): "unknown_field",
        good.replace(b'"compartment":5', b'"compartment":63'): "unknown_compartment",
        good.replace(b'"compartment":5', b'"compartment":1'): "wrong_compartment_kind",
        good.replace(b'"P-box-044-1"', b'"P\\u0000"'): "nul_byte",
        good.replace(b'"box_id":"box-044"', b'"box_id":"box-045"'): "box_id_mismatch",
        b"x" * 9000: "payload_too_large",
    }
    for payload in bad:
        publish(client, topic, payload)
    publish(client, topic, good)
    close(client)
    wait_for(lambda: events_of(db, box) == [(1, "parcel.deposited")])
    rows = wait_rows(
        db, "SELECT error_code, payload, topic FROM dead_letters WHERE box_id = %s ORDER BY id", (box,), len(bad)
    )
    assert [r[0] for r in rows] == list(bad.values())
    assert [bytes(r[1]) for r in rows] == list(bad)
    assert all(r[2] == topic for r in rows)
    reason = scalar(
        db, "SELECT reason FROM dead_letters WHERE box_id = %s AND error_code = 'unknown_compartment'", (box,)
    )
    assert "no compartment 63" in reason


def test_telemetry_updates_latest_state_only_forward(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    api: httpx.Client,
    db: psycopg.Connection[Any],
) -> None:
    """Telemetry sets occupancy and red-box fill; an older reading arriving later does not overwrite it."""
    box = "box-046"
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.STATUS), birth(box, 1), retain=True)

    def reading(seq: int, ts: int, temp: float, occupied: set[int], waste: float) -> bytes:
        payload = Telemetry(
            power=PowerSource.MAINS,
            temperature_c=temp,
            compartments=[CompartmentReading(id=i, occupied=i in occupied) for i in range(3, 17)],
            red_boxes=[RedBoxReading(compartment=1, weight_kg=waste), RedBoxReading(compartment=2, weight_kg=0.0)],
        )
        return encode(make_event(box_id=box, seq=seq, session=1, ts_ms=ts, payload=payload))

    topic = topic_for(box, MessageKind.TELEMETRY)
    publish(client, topic, reading(2, T0 + 60_000, 21.5, {3, 7, 15}, 2.0))
    wait_for(lambda: scalar(db, "SELECT telemetry_seq FROM box_state WHERE box_id = %s", (box,)) == 2)
    publish(client, topic, reading(1, T0, 5.0, set(), 0.1))  # older, arrives late (e.g. replay)
    wait_for(lambda: scalar(db, "SELECT count(*) FROM telemetry WHERE box_id = %s", (box,)) == 2)
    close(client)
    detail = api.get(f"/api/v1/boxes/{box}").json()
    assert detail["temperature_c"] == 21.5
    # default layout: doors 1-2 red boxes, 3-6 size A, 7-12 size B, 13-16 size C
    assert detail["occupancy"]["A"] == {"total": 4, "occupied": 1, "out_of_service": 0, "free": 3}
    assert detail["occupancy"]["B"] == {"total": 6, "occupied": 1, "out_of_service": 0, "free": 5}
    assert detail["occupancy"]["C"] == {"total": 4, "occupied": 1, "out_of_service": 0, "free": 3}
    assert detail["red_boxes"][0] == {
        "compartment": 1,
        "weight_kg": 2.0,
        "capacity_kg": 4.0,
        "fill_ratio": 0.5,
        # no waste events for this box: nothing deposited since a collection (telemetry only)
        "deposited_kg": 0.0,
        "deposits": 0,
        "fractions_kg": {},
        "collected_ts": None,
    }
    assert detail["telemetry"]["seq"] == 2


def test_stale_last_will_never_overwrites_newer_birth(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """An offline status from an older session is ignored; one from the current session applies."""
    box = "box-047"
    client = box_client(broker, credentials, box)
    status_topic = topic_for(box, MessageKind.STATUS)

    def state() -> tuple[bool, int, str] | None:
        row = db.execute(
            "SELECT status_online, status_session, status_reason FROM box_state WHERE box_id = %s", (box,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    publish(client, status_topic, birth(box, 5), retain=True)
    wait_for(lambda: state() == (True, 5, "birth"))
    publish(client, status_topic, birth(box, 4, online=False, reason=StatusReason.CONNECTION_LOST), retain=True)
    publish(client, status_topic, birth(box, 3), retain=True)
    marker = deposited(box, 1)  # processed after the stale statuses: proves they were seen
    publish(client, topic_for(box, MessageKind.EVENTS), marker)
    wait_for(lambda: events_of(db, box))
    assert state() == (True, 5, "birth")
    publish(client, status_topic, birth(box, 5, online=False, reason=StatusReason.CONNECTION_LOST), retain=True)
    wait_for(lambda: state() == (False, 5, "connection_lost"))
    publish(client, status_topic, birth(box, 6), retain=True)
    wait_for(lambda: state() == (True, 6, "birth"))
    close(client)


def _status_story(prefix: str) -> list[tuple[str, bytes]]:
    """Statuses of three boxes, interleaved as a storm would deliver them: births, wills (current and
    stale), a repeated birth, a box first heard of by its will, a stale birth after a newer one."""
    a, b, c = f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"
    lost = StatusReason.CONNECTION_LOST
    return [
        (a, birth(a, 1)),
        (b, birth(b, 3, online=False, reason=lost)),
        (a, birth(a, 1, online=False, reason=lost)),
        (c, birth(c, 2)),
        (a, birth(a, 2)),
        (c, birth(c, 1)),
        (a, birth(a, 1, online=False, reason=lost)),
        (a, birth(a, 2)),
        (b, birth(b, 3)),
        (c, birth(c, 2, online=False, reason=StatusReason.SHUTDOWN)),
    ]


def test_a_batch_of_statuses_ends_as_the_same_statuses_one_batch_each(database_url: str) -> None:
    """The writer applies a batch's statuses with one statement for all of them; the box state,
    layouts and offline alerts they leave equal those of the same statuses written one batch each,
    the way the older one-status-at-a-time code applied them."""

    def story(prefix: str) -> list[Received]:
        return [  # received one second apart, at the same times in both stories
            Received(1, i, 1, topic_for(box, MessageKind.STATUS), raw, T0 / 1000 + i)
            for i, (box, raw) in enumerate(_status_story(prefix))
        ]

    def outcome(conn: psycopg.Connection[Any], prefix: str) -> list[tuple[Any, ...]]:
        rows = conn.execute(
            """SELECT substr(s.box_id, length(%(p)s) + 1), s.status_online, s.status_session, s.status_reason,
                      s.status_ts, extract(epoch FROM s.status_changed_at)::numeric(20, 3),
                      extract(epoch FROM s.last_received_at)::numeric(20, 3), x.firmware, x.layout IS NOT NULL,
                      (SELECT array_agg(a.raised_session || ':' || (a.cleared_at IS NULL) ORDER BY a.id)
                       FROM alerts a WHERE a.box_id = s.box_id AND a.kind = 'box_offline')
               FROM box_state s LEFT JOIN boxes x USING (box_id) WHERE s.box_id LIKE %(p)s || '%%'
               ORDER BY s.box_id""",
            {"p": prefix},
        ).fetchall()
        return [tuple(r) for r in rows]

    with psycopg.connect(database_url, autocommit=True) as conn:
        writer = BatchWriter(conn, "test-status-batch")
        together = writer.write(story("stb"))
        one_by_one = [writer.write([m]) for m in story("sts")]
        assert together.statuses == sum(r.statuses for r in one_by_one) == 10
        batched, single = outcome(conn, "stb"), outcome(conn, "sts")
    assert batched == single

    # Which message (its index in the story) set status_changed_at and last_received_at, and the
    # offline alerts as "raised_session:still open".
    def index(epoch: Any) -> int | None:
        return None if epoch is None else int(epoch - T0 // 1000)

    assert [(r[0], r[1], r[2], r[3], index(r[5]), index(r[6]), r[9]) for r in batched] == [
        ("-a", True, 2, "birth", 4, 4, ["1:false"]),  # the will's alert cleared by the newer session
        ("-b", False, 3, "connection_lost", 1, None, ["3:true"]),  # a birth of the will's own session is stale
        ("-c", False, 2, "shutdown", 9, 3, ["2:true"]),  # the stale birth of session 1 changed nothing
    ]


def test_heartbeat_timeout_shows_box_offline(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    api: httpx.Client,
    db: psycopg.Connection[Any],
) -> None:
    """A box online by its birth but silent past the heartbeat timeout is reported offline, then online again."""
    box = "box-048"
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.STATUS), birth(box, 1), retain=True)
    wait_for(lambda: api.get(f"/api/v1/boxes/{box}").json().get("online") is True)
    offline = wait_for(lambda: (b := api.get(f"/api/v1/boxes/{box}").json())["online"] is False and b, timeout=5)
    assert offline["status_reason"] == "heartbeat_timeout"
    publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, 1))
    wait_for(lambda: api.get(f"/api/v1/boxes/{box}").json()["online"] is True)
    close(client)


def test_ingest_killed_between_receive_and_commit_loses_nothing(
    broker: RunningBroker, credentials: Credentials, database_url: str, db: psycopg.Connection[Any]
) -> None:
    """SIGKILL of an ingest process holding uncommitted messages, then a restart: every event stored once."""
    box = "box-049"
    settings = settings_for(database_url, broker, credentials)
    env = {
        **os.environ,
        "MOLO_DATABASE_URL": database_url,
        "MOLO_MQTT_HOST": broker.host,
        "MOLO_MQTT_PORT": str(broker.port),
        "MOLO_MQTT_USERNAME": settings.mqtt_username,
        "MOLO_MQTT_PASSWORD": credentials.services[settings.mqtt_username],
        "MOLO_WORKER_ID": settings.worker_id,
        "MOLO_INGEST_BATCH_WAIT_MS": "20",
    }
    app_name = f"molo-ingest-{settings.worker_id}"

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "ingest"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    proc = spawn()
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    try:
        # Warm-up: proves the worker is subscribed (messages to a share group nobody is in are dropped).
        def warm() -> bool:
            publish(client, topic, deposited(box, 1))
            return events_of(db, box) == [(1, "parcel.deposited")]

        wait_for(warm, timeout=20, interval=0.5)

        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            for seq in range(2, 52):
                publish(client, topic, deposited(box, seq))
            wait_for(
                lambda: (
                    scalar(
                        db,
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'",
                        (app_name,),
                    )
                    == 1
                )
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            blocker.rollback()
        assert events_of(db, box) == [(1, "parcel.deposited")]  # nothing of the killed batch committed

        proc = spawn()
        wait_for(lambda: len(events_of(db, box)) == 51, timeout=30)
        time.sleep(0.3)
        assert [s for s, _ in events_of(db, box)] == list(range(1, 52))
    finally:
        close(client)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        # Retire the worker id so its session stops taking a share of later tests' messages.
        from backend.ingest.run import build_worker

        leaver = build_worker(
            settings_for(
                database_url, broker, credentials, worker_id=settings.worker_id, mqtt_username=settings.mqtt_username
            )
        )
        leaver.start()
        leaver.mqtt.subscribed.wait(10)
        leaver.retire(quiet_s=0.3)


def test_collected_and_waste_events_keep_their_typed_columns(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """Typed columns (carrier, fraction, weight) are filled from the payload for KPI queries."""
    box = "box-050"
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    publish(
        client,
        topic,
        encode(
            make_event(
                box_id=box,
                seq=1,
                session=1,
                ts_ms=T0,
                payload=WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=0.33),
            )
        ),
    )
    publish(
        client,
        topic,
        encode(
            make_event(
                box_id=box, seq=2, session=1, ts_ms=T0 + 1, payload=ParcelCollected(compartment=4, parcel_id="P-9")
            )
        ),
    )
    close(client)
    rows = wait_rows(
        db,
        "SELECT seq, fraction, weight_kg, parcel_id, compartment FROM events WHERE box_id = %s ORDER BY seq",
        (box,),
        2,
    )
    assert rows == [(1, "batteries", 0.33, None, 1), (2, None, None, "P-9", 4)]


def test_ingest_over_mqtt5_stores_events_and_retires(
    broker: RunningBroker,
    credentials: Credentials,
    start_ingest: Callable[..., IngestWorker],
    db: psycopg.Connection[Any],
) -> None:
    """The MQTT 5 ingest path (session expiry, receive maximum) stores events exactly like the default."""
    worker = start_ingest(mqtt_protocol="5")
    box = "box-051"
    client = box_client(broker, credentials, box)
    for seq in (1, 2, 2, 3):
        publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, seq))
    close(client)
    wait_for(lambda: [s for s, _ in events_of(db, box)] == [1, 2, 3])
    # The worker's in-memory totals move just after the commit that made the rows visible.
    wait_for(lambda: worker.totals.duplicates >= 1)
    assert worker.totals.duplicates == 1


def test_message_the_database_refuses_is_isolated_and_dead_lettered(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """A valid message the database refuses goes to dead_letters as storage_rejected; its batch-mates are stored."""
    box = "box-057"
    # A real refusal by PostgreSQL: a constraint this test adds (and removes) on the live table.
    db.execute("ALTER TABLE events ADD CONSTRAINT test_no_poison CHECK (parcel_id IS DISTINCT FROM 'P-box-057-3')")
    try:
        client = box_client(broker, credentials, box)
        for seq in range(1, 6):
            publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, seq))
        close(client)
        wait_for(lambda: [s for s, _ in events_of(db, box)] == [1, 2, 4, 5])
        rows = wait_rows(db, "SELECT error_code, reason, payload FROM dead_letters WHERE box_id = %s", (box,), 1)
    finally:
        db.execute("ALTER TABLE events DROP CONSTRAINT test_no_poison")
    code, reason, payload = rows[0]
    assert code == "storage_rejected"
    assert "test_no_poison" in reason
    assert bytes(payload) == deposited(box, 3)


def test_corrupt_stored_layout_does_not_stop_ingest(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """A hand-corrupted layout row is ignored (compartments unchecked) and the box's events still flow."""
    box = "box-058"
    db.execute("INSERT INTO boxes (box_id, layout) VALUES (%s, '{\"compartments\": []}')", (box,))
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, 1))
    close(client)
    wait_for(lambda: events_of(db, box) == [(1, "parcel.deposited")])


@contextmanager
def database_down(database: DatabaseUnderTest, worker: IngestWorker) -> Iterator[None]:
    """The test database refuses new connections and the worker's session is killed; restored on exit."""
    dbname = conninfo_to_dict(database.url)["dbname"]
    with psycopg.connect(database.admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                (dbname, f"molo-ingest-{worker.worker_id}"),
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')


def test_database_outage_loses_nothing(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    db: psycopg.Connection[Any],
    test_database: DatabaseUnderTest,
) -> None:
    """While the database refuses connections, ingest acks nothing and retries; then every event is stored once."""
    box = "box-059"
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    publish(client, topic, deposited(box, 1))
    wait_for(lambda: events_of(db, box) == [(1, "parcel.deposited")])
    with database_down(test_database, ingest):
        for seq in range(2, 21):
            publish(client, topic, deposited(box, seq))

        def retries() -> float:
            return ingest.registry.get_sample_value("molo_worker_database_errors_total") or 0.0

        wait_for(lambda: retries() >= 2, timeout=15)  # it retried, and the database is still refusing
        assert events_of(db, box) == [(1, "parcel.deposited")]
    close(client)
    wait_for(lambda: len(events_of(db, box)) == 20, timeout=40)
    assert [s for s, _ in events_of(db, box)] == list(range(1, 21))


def test_retire_during_database_outage_keeps_the_session(
    broker: RunningBroker,
    credentials: Credentials,
    start_ingest: Callable[..., IngestWorker],
    db: psycopg.Connection[Any],
    test_database: DatabaseUnderTest,
) -> None:
    """Retiring while messages cannot be committed refuses (returns False) and keeps the broker session,
    so a successor with the same worker id receives and stores every message."""
    worker = start_ingest()
    box = "box-060"
    # Retained statuses of earlier tests' boxes arrive on subscribe: let them be committed first.
    time.sleep(0.5)
    wait_for(lambda: worker.mqtt.outstanding == 0 and worker.mqtt.inbox.empty())
    client = box_client(broker, credentials, box)
    with database_down(test_database, worker):
        for seq in range(1, 6):
            publish(client, topic_for(box, MessageKind.EVENTS), deposited(box, seq))
        wait_for(lambda: worker.mqtt.outstanding == 5)
        assert worker.retire(quiet_s=0.2, timeout=2) is False
    close(client)
    assert events_of(db, box) == []
    successor = start_ingest(worker_id=worker.worker_id, mqtt_username=worker.mqtt.username)
    wait_for(lambda: [s for s, _ in events_of(db, box)] == [1, 2, 3, 4, 5], timeout=20)
    assert successor.retire(quiet_s=0.2) is True


def test_ack_for_an_unknown_command_is_dead_lettered(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """A command acknowledgement for a command the backend never sent is kept as unknown_command."""
    box = "box-045"
    stray = CommandAck(v=1, command_id=uuid.uuid4(), box_id=box, ts_ms=T0, result=CommandResult.SUCCEEDED)
    client = box_client(broker, credentials, box)
    publish(client, topic_for(box, MessageKind.COMMAND_ACK), encode(stray))
    close(client)
    rows = wait_rows(db, "SELECT error_code, reason FROM dead_letters WHERE box_id = %s", (box,), 1)
    assert rows[0][0] == "unknown_command"
    assert str(stray.command_id) in rows[0][1]


def test_payload_with_a_duplicate_key_is_dead_lettered_and_ingest_goes_on(
    broker: RunningBroker, credentials: Credentials, ingest: IngestWorker, db: psycopg.Connection[Any]
) -> None:
    """An event naming "seq" twice is kept as a duplicate_key dead letter with its raw bytes, stored as
    no event under either seq, and the next valid event is stored."""
    box = "box-040"
    client = box_client(broker, credentials, box)
    topic = topic_for(box, MessageKind.EVENTS)
    twice = deposited(box, 1).replace(b'"seq":1', b'"seq":1,"seq":2')
    assert twice.count(b'"seq"') == 2
    publish(client, topic, twice)
    publish(client, topic, deposited(box, 3))
    close(client)
    wait_for(lambda: events_of(db, box) == [(3, "parcel.deposited")])
    rows = wait_rows(db, "SELECT error_code, reason, payload, topic FROM dead_letters WHERE box_id = %s", (box,), 1)
    code, reason, payload, dead_topic = rows[0]
    assert code == "duplicate_key"
    assert "duplicate key 'seq' (given 1, 2)" in reason
    assert bytes(payload) == twice
    assert dead_topic == topic
    assert events_of(db, box) == [(3, "parcel.deposited")]
