"""Storage over time, on a real server of each flavour: the aggregates equal the raw events for every
range that still has raw data, and on TimescaleDB every background policy does its work.

Each test has a database of its own (``storage_db``), loaded through the ingest's own writer
(``BatchWriter``, no broker): history that starts months ago, then new events, then late and
back-filled ones. On TimescaleDB the policies are run the way the scheduler runs them, one job at a
time with ``CALL run_job(id)``; plain PostgreSQL has no jobs (its aggregates are a view and a
trigger-kept table). Boxes sto-001 .. sto-005, in this module's own databases only.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from accounting.activity import COUNTED_TYPES
from backend.ingest.mqtt import Received
from backend.ingest.writer import BatchWriter
from backend.migrate import MIGRATIONS_DIR, migrate
from backend.settings import TimescaleMode
from contract import MessageKind, SizeClass, encode, make_event, topic_for
from contract.domain import WasteFraction
from contract.messages import DoorOpened, EventPayload, ParcelCollected, ParcelDeposited, WasteDeposited
from molo.postgres import create_database, drop_database
from tests.fixtures.database import FLAVOURS

BOXES = [f"sto-{n:03d}" for n in range(1, 6)]
#: Events per box and day: one every two hours, so every hour bucket of a loaded day is not the same.
PER_DAY = 12


@dataclass
class StorageDb:
    url: str
    flavour: str
    conn: psycopg.Connection[Any]
    writer: BatchWriter


def _unschedule(conn: psycopg.Connection[Any]) -> None:
    """Take the database's policies off the background scheduler (and wait out a run it has already
    started), so that the runs under test are the ones the test makes with ``run_job``. A policy run
    by hand while the scheduler runs the same one fails with a concurrent-refresh error."""
    conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs")
    deadline = time.monotonic() + 30
    while conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND backend_type <> 'client backend' "
        "AND backend_type NOT LIKE 'TimescaleDB Background Worker Scheduler'"
    ).fetchone():
        assert time.monotonic() < deadline, "a background job run did not end within 30 s"
        time.sleep(0.1)


@contextmanager
def _database(admin: str, flavour: str) -> Iterator[StorageDb]:
    url = create_database(admin, f"molo_test_storage_{flavour}")
    try:
        migrate(url, TimescaleMode.ON if flavour == "timescale" else TimescaleMode.OFF)
        with psycopg.connect(url, autocommit=True) as conn:
            if flavour == "timescale":
                _unschedule(conn)
            yield StorageDb(url, flavour, conn, BatchWriter(conn, "storage-test"))
    finally:
        drop_database(url, admin)


@pytest.fixture(params=FLAVOURS)
def storage_db(request: pytest.FixtureRequest, pg_admin_url: str) -> Iterator[StorageDb]:
    """A fresh, migrated database of this test alone, on each flavour, with an ingest writer."""
    flavour: str = request.param
    with _database(os.environ["MOLO_TEST_TIMESCALE_URL"] if flavour == "timescale" else pg_admin_url, flavour) as db:
        yield db


@pytest.fixture
def timescale_db(timescale_admin_url: str) -> Iterator[StorageDb]:
    """A fresh, migrated TimescaleDB database of this test alone, with an ingest writer."""
    with _database(timescale_admin_url, "timescale") as db:
        yield db


_seqs: dict[str, itertools.count[int]] = {}
_mids = itertools.count(1)


def _payload(n: int) -> EventPayload:
    """Events of every kind the aggregates treat differently: counted with a carrier and size class,
    counted with a weight, and not counted by activity_daily at all."""
    match n % 4:
        case 0:
            carrier = ("gls", "postnord")[n % 3 % 2]
            size = (SizeClass.A, SizeClass.B)[n % 5 % 2]
            return ParcelDeposited(compartment=5, size_class=size, parcel_id=f"P{n}", carrier=carrier)
        case 1:
            return WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=(0.25, 1.5)[n % 2])
        case 2:
            return DoorOpened(compartment=5)
        case _:
            return ParcelCollected(compartment=5, parcel_id=f"P{n - 3}")


def events(start: datetime, days: float, per_day: int = PER_DAY) -> list[Received]:
    """``per_day`` events a day for every box from ``start`` for ``days`` days, each box with the next
    sequence numbers of its own, as the boxes would send them."""
    out = []
    step = timedelta(days=1) / per_day
    for i in range(int(days * per_day)):
        ts = start + i * step
        for k, box in enumerate(BOXES):
            seq = next(_seqs.setdefault(box, itertools.count(1)))
            at = ts + timedelta(minutes=7 * k)
            event = make_event(box_id=box, seq=seq, session=1, ts_ms=int(at.timestamp() * 1000), payload=_payload(seq))
            out.append(Received(1, next(_mids), 1, topic_for(box, MessageKind.EVENTS), encode(event), time.time()))
    return out


def write(db: StorageDb, batch: list[Received]) -> int:
    """Store ``batch`` through the ingest writer in batches of 2,000; returns the events stored."""
    stored = 0
    for i in range(0, len(batch), 2000):
        stored += db.writer.write(batch[i : i + 2000]).events
    return stored


def run_every_policy(db: StorageDb) -> list[str]:
    """On TimescaleDB, run each of the database's policies once as the scheduler would
    (``CALL run_job``); returns their names. Plain PostgreSQL has none."""
    if db.flavour != "timescale":
        return []
    jobs = db.conn.execute(
        "SELECT job_id, proc_name FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL ORDER BY job_id"
    ).fetchall()
    for job_id, _ in jobs:
        db.conn.execute(f"CALL run_job({int(job_id)})")
    return sorted(str(name) for _, name in jobs)


_RAW_HOURLY = """SELECT date_trunc('hour', ts, 'UTC') AS bucket, box_id, type, count(*)::bigint AS events,
                        round(sum(weight_kg)::numeric, 6) AS weight_kg
                 FROM events GROUP BY 1, 2, 3"""
_VIEW_HOURLY = "SELECT bucket, box_id, type, events, round(weight_kg::numeric, 6) FROM events_hourly"
_RAW_DAILY = """SELECT date_trunc('day', ts, 'UTC') AS bucket, box_id, carrier, type, size_class, count(*)::bigint,
                       round(coalesce(sum(weight_kg), 0)::numeric, 6)
                FROM events WHERE type = ANY(%(types)s) GROUP BY 1, 2, 3, 4, 5"""
_VIEW_DAILY = (
    "SELECT bucket, box_id, carrier, type, size_class, events, round(weight_kg::numeric, 6) FROM activity_daily"
)


def differences(db: StorageDb, raw: str, view: str) -> list[tuple[Any, ...]]:
    """Rows in one of ``raw`` and ``view`` but not the other (as multisets): empty when they agree."""
    query = f"(({raw}) EXCEPT ALL ({view})) UNION ALL (({view}) EXCEPT ALL ({raw})) LIMIT 20"
    return db.conn.execute(query, {"types": list(COUNTED_TYPES)}).fetchall()


def assert_aggregates_equal_raw(db: StorageDb) -> None:
    assert differences(db, _RAW_HOURLY, _VIEW_HOURLY) == []
    assert differences(db, _RAW_DAILY, _VIEW_DAILY) == []


def value(db: StorageDb, query: str, params: tuple[Any, ...] = ()) -> Any:
    """The one value ``query`` returns."""
    row = db.conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def count_in(db: StorageDb, relation: str, since: datetime, until: datetime) -> int:
    """Events ``relation`` (events, events_hourly or activity_daily) counts in ``[since, until)``."""
    counted, at = ("count(*)", "ts") if relation == "events" else ("coalesce(sum(events), 0)", "bucket")
    return int(value(db, f"SELECT {counted} FROM {relation} WHERE {at} >= %s AND {at} < %s", (since, until)))


def test_the_aggregates_equal_the_raw_events_for_old_new_late_and_backfilled_history(storage_db: StorageDb) -> None:
    """Sixty days of history from five months ago, then new events, then late events into old
    (compressed) weeks and history older than all of it: after each step and each run of every policy,
    events_hourly and activity_daily hold exactly what counting the raw events gives, bucket by bucket."""
    db = storage_db
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old_start = now.replace(hour=0) - timedelta(days=150)  # whole UTC days: activity_daily's buckets
    old_end = old_start + timedelta(days=60)
    assert write(db, events(old_start, 60)) == 60 * PER_DAY * len(BOXES)
    assert_aggregates_equal_raw(db)  # before any refresh: real-time aggregation on TimescaleDB

    write(db, events(now - timedelta(days=2), 2 - 1 / 24))  # new data, up to an hour ago
    run_every_policy(db)
    old = count_in(db, "events", old_start, old_end)
    assert old == 60 * PER_DAY * len(BOXES)
    assert count_in(db, "events_hourly", old_start, old_end) == old  # the hole of issue 12: 0 here
    assert count_in(db, "activity_daily", old_start, old_end) == old * 3 // 4  # door.opened is not counted
    assert_aggregates_equal_raw(db)
    if db.flavour == "timescale":  # the policies did run: old weeks compressed, the hours materialised
        compressed = [c for *_, c in _chunks(db, "events") if c]
        assert len(compressed) >= 8

    late = events(now - timedelta(days=120), 3, per_day=4)  # late events into compressed weeks
    older = events(now - timedelta(days=300), 5, per_day=4)  # history older than everything stored
    assert write(db, late + older) == len(late) + len(older)
    assert write(db, late[:50]) == 0  # replayed: nothing stored twice, nothing counted twice
    assert differences(db, _RAW_DAILY, _VIEW_DAILY) == []  # activity_daily (the KPIs) at once
    run_every_policy(db)
    assert_aggregates_equal_raw(db)
    assert count_in(db, "events_hourly", now - timedelta(days=301), old_start) == len(older)


def _telemetry(db: StorageDb, since: datetime, until: datetime) -> int:
    """Hourly telemetry of sto-001 over ``[since, until)`` (straight into the table: only its age matters
    here); returns the rows stored."""
    cur = db.conn.execute(
        """INSERT INTO telemetry (ts, received_at, box_id, seq, session, power, battery_pct, temperature_c,
                                  occupied, compartments, red_boxes)
           SELECT t, t, 'sto-001', row_number() OVER (ORDER BY t), 1, 'mains', NULL, 18.5, 3, '[]', '[]'
           FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 second', interval '1 hour') t""",
        (since, until),
    )
    return cur.rowcount


def _chunks(db: StorageDb, hypertable: str) -> list[tuple[datetime, datetime, bool]]:
    rows = db.conn.execute(
        "SELECT range_start, range_end, is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s ORDER BY range_start",
        (hypertable,),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _fingerprint(db: StorageDb, table: str) -> tuple[Any, ...]:
    row = db.conn.execute(
        f"SELECT count(*), sum(seq), min(ts), max(ts), "
        f"md5(string_agg(box_id || seq || ts::text, ',' ORDER BY box_id, seq)) FROM {table}"
    ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.timescale
def test_every_policy_run_through_run_job_does_its_work(timescale_db: StorageDb) -> None:
    """Each TimescaleDB policy, run once through CALL run_job as the scheduler runs it, does what it is
    there for: event chunks past 30 days and telemetry chunks past 7 compressed (and read back the same),
    telemetry past 400 days dropped, events_hourly materialised up to an hour ago and equal to the raw events."""
    db = timescale_db
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    write(db, events(now - timedelta(days=60), 60 - 1 / 12, per_day=6))
    _telemetry(db, now - timedelta(days=420), now)
    events_before, telemetry_before = _fingerprint(db, "events"), _fingerprint(db, "telemetry")
    assert not any(c for *_, c in _chunks(db, "events") + _chunks(db, "telemetry"))
    jobs = db.conn.execute(
        "SELECT job_id, proc_name, hypertable_name FROM timescaledb_information.jobs "
        "WHERE hypertable_name IS NOT NULL ORDER BY job_id"
    ).fetchall()
    assert sorted((str(p), str(h)) for _, p, h in jobs) == [
        ("policy_compression", "events"),
        ("policy_compression", "telemetry"),
        ("policy_refresh_continuous_aggregate", "events_hourly"),
        ("policy_retention", "telemetry"),
    ]
    by_name = {(str(p), str(h)): int(j) for j, p, h in jobs}

    db.conn.execute(f"CALL run_job({by_name['policy_compression', 'events']})")
    chunks = _chunks(db, "events")
    assert [c for start, end, c in chunks if end <= now - timedelta(days=30)] == [True] * len(
        [1 for _, end, _ in chunks if end <= now - timedelta(days=30)]
    )
    assert any(compressed for *_, compressed in chunks)
    assert not any(compressed for start, _, compressed in chunks if start >= now - timedelta(days=30))
    assert _fingerprint(db, "events") == events_before  # compressed rows read back the same

    db.conn.execute(f"CALL run_job({by_name['policy_retention', 'telemetry']})")
    oldest = value(db, "SELECT min(ts) FROM telemetry")
    assert now - timedelta(days=401) <= oldest < now - timedelta(days=399)
    recent = db.conn.execute("SELECT count(*) FROM telemetry WHERE ts >= %s", (now - timedelta(days=399),))
    assert recent.fetchone() == (399 * 24,)  # only what is past retention went
    telemetry_kept = _fingerprint(db, "telemetry")
    assert telemetry_kept[0] < telemetry_before[0]

    db.conn.execute(f"CALL run_job({by_name['policy_compression', 'telemetry']})")
    tele = _chunks(db, "telemetry")
    assert all(compressed for _, end, compressed in tele if end <= now - timedelta(days=7))
    assert not any(compressed for start, _, compressed in tele if start >= now - timedelta(days=7))
    assert _fingerprint(db, "telemetry") == telemetry_kept

    mat = value(
        db,
        "SELECT format('%%I.%%I', materialization_hypertable_schema, materialization_hypertable_name) "
        "FROM timescaledb_information.continuous_aggregates WHERE view_name = 'events_hourly'",
    )
    assert value(db, f"SELECT count(*) FROM {mat}") == 0
    db.conn.execute(f"CALL run_job({by_name['policy_refresh_continuous_aggregate', 'events_hourly']})")
    watermark = value(
        db,
        "SELECT _timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark(mat_hypertable_id)) "
        "FROM _timescaledb_catalog.continuous_agg WHERE user_view_name = 'events_hourly'",
    )
    assert value(db, "SELECT max(ts) FROM events") < watermark <= now  # every hour up to an hour ago
    assert value(db, f"SELECT sum(events) FROM {mat}") == events_before[0]
    assert differences(db, _RAW_HOURLY, _VIEW_HOURLY) == []


@pytest.mark.timescale
def test_migration_0008_gives_back_the_history_the_old_refresh_window_left_out(
    timescale_admin_url: str, tmp_path: Path
) -> None:
    """A database made by migrations 0001-0007 with history older than the old 30-day refresh window,
    after one run of that policy (its events_hourly shows none of it: issue 12), shows all of it again
    once migrated to the newest version, and its KPI counts match the raw events."""
    for path in MIGRATIONS_DIR.glob("000[1-7]_*.sql"):
        shutil.copy(path, tmp_path / path.name)
    url = create_database(timescale_admin_url, "molo_test_storage_upgrade")
    try:
        assert migrate(url, TimescaleMode.ON, directory=tmp_path).current == 7
        with psycopg.connect(url, autocommit=True) as conn:
            _unschedule(conn)
            db = StorageDb(url, "timescale", conn, BatchWriter(conn, "storage-test"))
            now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            old_start = now - timedelta(days=120)
            write(db, events(old_start, 20, per_day=6) + events(now - timedelta(days=1), 0.5, per_day=6))
            run_every_policy(db)
            old = count_in(db, "events", old_start, old_start + timedelta(days=20))
            assert old == 20 * 6 * len(BOXES)
            assert count_in(db, "events_hourly", old_start, old_start + timedelta(days=20)) == 0  # the hole

            assert migrate(url, TimescaleMode.ON).applied[0] == 8
            assert count_in(db, "events_hourly", old_start, old_start + timedelta(days=20)) == old
            assert_aggregates_equal_raw(db)
            open_start = "config ? 'start_offset' AND config->>'start_offset' IS NULL"  # refreshes from the start
            jobs = "timescaledb_information.jobs WHERE hypertable_name = 'events_hourly'"
            assert value(db, f"SELECT {open_start} FROM {jobs}") is True
    finally:
        drop_database(url, timescale_admin_url)
