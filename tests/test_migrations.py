"""The migration runner against a real PostgreSQL: both flavours' files, idempotence, strictness."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from backend.migrate import MigrationError, discover, migrate, split_statements
from backend.operations.alerts import SEVERITY, AlertKind
from backend.settings import TimescaleMode
from molo.postgres import create_database, drop_database


def test_discovered_migrations_have_both_flavours_where_needed() -> None:
    """Every version has a common file or both a postgres and a timescale variant."""
    for migration in discover():
        assert None in migration.variants or {"postgres", "timescale"} <= set(migration.variants)


def test_split_statements_respects_quotes_and_dollar_blocks() -> None:
    """Semicolons inside strings, comments and $$ bodies do not split statements."""
    script = "SELECT ';'; -- a; comment\nDO $x$ BEGIN PERFORM 1; END $x$;\nSELECT 'it''s';"
    assert split_statements(script) == [
        "SELECT ';'",
        "-- a; comment\nDO $x$ BEGIN PERFORM 1; END $x$",
        "SELECT 'it''s'",
    ]


def test_migrate_is_idempotent_and_builds_partitioned_tables(blank_database: str) -> None:
    """A second run applies nothing; events and telemetry are partitioned on plain PostgreSQL."""
    first = migrate(blank_database, TimescaleMode.OFF)
    assert first.flavour == "postgres"
    assert first.applied == [m.version for m in discover()]
    assert migrate(blank_database, TimescaleMode.OFF).applied == []
    with psycopg.connect(blank_database) as conn:
        parts = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
            ).fetchall()
        }
        assert parts == {"events", "telemetry"}
        made = conn.execute("SELECT molo_ensure_partitions('events', '2025-11-20', '2026-01-03')").fetchone()
        assert made == (3,)
        again = conn.execute("SELECT molo_ensure_partitions('events', '2025-11-20', '2026-01-03')").fetchone()
        assert again == (0,)


def test_changed_applied_migration_is_an_error(blank_database: str, tmp_path: Path) -> None:
    """Editing a migration after it was applied is refused, not silently skipped."""
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (x int);")
    migrate(blank_database, TimescaleMode.OFF, directory=tmp_path)
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (x bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(blank_database, TimescaleMode.OFF, directory=tmp_path)


def test_failed_migration_leaves_nothing_behind(blank_database: str, tmp_path: Path) -> None:
    """A migration that fails half-way is rolled back whole and not recorded."""
    (tmp_path / "0001_bad.sql").write_text("CREATE TABLE half (x int); SELECT no_such_function();")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(blank_database, TimescaleMode.OFF, directory=tmp_path)
    with psycopg.connect(blank_database) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (0,)


def test_gaps_in_versions_are_refused(tmp_path: Path) -> None:
    """Versions must run 1..N: a missing number is a packaging mistake."""
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        discover(tmp_path)


def _timescale_situation(url: str) -> str:
    """What this server offers: ``absent`` (no extension files), ``not_preloaded`` (files, but the
    library is not in shared_preload_libraries: CREATE EXTENSION answers FATAL) or ``preloaded``."""
    with psycopg.connect(url) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            return "absent"
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    return "preloaded" if row and "timescaledb" in str(row[0]) else "not_preloaded"


def test_timescale_on_fails_with_what_is_wrong_and_how_to_fix_it(blank_database: str) -> None:
    """MOLO_TIMESCALE=on where TimescaleDB cannot be created fails with one message naming the cause (not
    available, or not preloaded with the shared_preload_libraries fix) and applies nothing."""
    situation = _timescale_situation(blank_database)
    if situation == "preloaded":
        assert migrate(blank_database, TimescaleMode.ON).flavour == "timescale"
        return
    expected = "not available" if situation == "absent" else "not preloaded.*shared_preload_libraries.*restart"
    with pytest.raises(MigrationError, match=expected):
        migrate(blank_database, TimescaleMode.ON)
    with psycopg.connect(blank_database) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('events')").fetchone() == (None,)


def test_timescale_auto_falls_back_to_plain_postgres_where_it_cannot_be_created(
    blank_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MOLO_TIMESCALE=auto migrates fully on plain PostgreSQL where the extension is missing or not preloaded
    (the FATAL of CREATE EXTENSION does not cost the migration its connection), and on TimescaleDB where it is."""
    situation = _timescale_situation(blank_database)
    report = migrate(blank_database, TimescaleMode.AUTO)
    assert report.flavour == ("timescale" if situation == "preloaded" else "postgres")
    assert report.applied == [m.version for m in discover()]
    assert migrate(blank_database, TimescaleMode.AUTO).applied == []
    if situation == "not_preloaded":
        assert any("using plain PostgreSQL" in r.getMessage() for r in caplog.records)
    with psycopg.connect(blank_database) as conn:
        flavours = conn.execute("SELECT DISTINCT flavour FROM schema_migrations").fetchall()
        assert flavours == [(report.flavour,)]


@pytest.mark.timescale
def test_timescale_auto_uses_timescaledb_where_it_is_preloaded(timescale_admin_url: str) -> None:
    """MOLO_TIMESCALE=auto on a server that preloads TimescaleDB creates the extension and builds hypertables."""
    url = create_database(timescale_admin_url, "molo_ts_auto")
    try:
        assert migrate(url, TimescaleMode.AUTO).flavour == "timescale"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM timescaledb_information.hypertables").fetchone() == (2,)
    finally:
        drop_database(url, timescale_admin_url)


@pytest.mark.timescale
def test_timescale_path_builds_hypertables_and_aggregate(timescale_admin_url: str) -> None:
    """On TimescaleDB: hypertables, policies and the continuous aggregate answer the same query."""
    url = create_database(timescale_admin_url, "molo_ts")
    try:
        report = migrate(url, TimescaleMode.ON)
        assert report.flavour == "timescale"
        with psycopg.connect(url, autocommit=True) as conn:
            hypertables = {
                r[0] for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables").fetchall()
            }
            assert {"events", "telemetry"} <= hypertables
            jobs = {r[0] for r in conn.execute("SELECT proc_name FROM timescaledb_information.jobs").fetchall()}
            assert {"policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"} <= jobs
            _insert_two_events(conn)
            rows = conn.execute("SELECT box_id, type, events FROM events_hourly ORDER BY 1").fetchall()
            assert rows == [("aal-001", "waste.deposited", 2)]
    finally:
        drop_database(url, timescale_admin_url)


def _insert_two_events(conn: psycopg.Connection[Any]) -> None:
    for seq in (1, 2):
        conn.execute(
            "INSERT INTO events (ts, received_at, box_id, seq, session, type, compartment, fraction, weight_kg, "
            "payload) VALUES (now() - interval '2 hours', now(), 'aal-001', %s, 1, 'waste.deposited', 1, "
            "'batteries', 0.3, '{}')",
            (seq,),
        )


def test_plain_path_answers_the_same_aggregate_query(blank_database: str) -> None:
    """events_hourly has the same columns and answer on plain PostgreSQL as on TimescaleDB."""
    migrate(blank_database, TimescaleMode.OFF)
    with psycopg.connect(blank_database, autocommit=True) as conn:
        conn.execute("SELECT molo_ensure_partitions('events', now() - interval '1 day', now())")
        _insert_two_events(conn)
        rows = conn.execute("SELECT box_id, type, events FROM events_hourly ORDER BY 1").fetchall()
        assert rows == [("aal-001", "waste.deposited", 2)]
        # Buckets are UTC hours whatever the session's time zone (as TimescaleDB's time_bucket).
        conn.execute("SELECT molo_ensure_partitions('events', '2026-01-01', '2026-01-02')")
        conn.execute(
            "INSERT INTO events (ts, received_at, box_id, seq, session, type, payload) "
            "VALUES ('2026-01-01 10:40:00+00', now(), 'aal-002', 1, 1, 'door.opened', '{}')"
        )
        conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        bucket = conn.execute("SELECT bucket FROM events_hourly WHERE box_id = 'aal-002'").fetchone()
        assert bucket is not None
        assert bucket[0].astimezone(UTC) == datetime(2026, 1, 1, 10, tzinfo=UTC)


def test_fresh_database_helper_creates_and_drops(pg_admin_url: str) -> None:
    """create_database gives a usable empty database; drop_database removes it."""
    url = create_database(pg_admin_url, "molo_tmp")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    drop_database(url, pg_admin_url)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url).close()


def test_migrate_can_register_where_the_boxes_stand(blank_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``molo migrate --register-boxes`` (the compose migrate service) applies the migrations and
    registers every box of the bundled network with its name and position."""
    from molo.cli import main

    assert main(["migrate", "--database-url", blank_database, "--register-boxes"]) == 0
    assert "registered where 50 boxes stand" in capsys.readouterr().out
    with psycopg.connect(blank_database) as conn:
        rows = conn.execute("SELECT count(*), count(latitude), count(name) FROM boxes").fetchone()
    assert rows == (50, 50, 50)


@pytest.mark.timescale
def test_timescale_upgrade_survives_the_policy_running_meanwhile(timescale_admin_url: str, tmp_path: Path) -> None:
    """Upgrading past 0008 while TimescaleDB runs activity_daily's refresh policy (as its scheduler does
    on a fresh database, seconds after 0004 made the policy): the catalogue race it can lose ("tuple
    concurrently deleted" on the DROP of the aggregate) is retried, and the upgrade completes with the
    events counted once. Caused here by running the job in a loop on a second connection."""
    for migration in discover():
        if migration.version < 8:
            for variant in migration.variants.values():
                (tmp_path / variant.name).write_text(variant.read_text())
    for _ in range(5):  # the race is lost about every second time without the retry
        _upgrade_while_the_policy_runs(timescale_admin_url, tmp_path)


def _upgrade_while_the_policy_runs(timescale_admin_url: str, tmp_path: Path) -> None:
    url = create_database(timescale_admin_url, "molo_ts_race")
    try:
        migrate(url, TimescaleMode.ON, directory=tmp_path)  # up to 0007: activity_daily is an aggregate
        with psycopg.connect(url, autocommit=True) as conn:
            _insert_two_events(conn)
            job = conn.execute(
                "SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name = 'activity_daily'"
                " AND proc_name = 'policy_refresh_continuous_aggregate'"
            ).fetchone()
        assert job is not None
        stop = threading.Event()
        runs: list[str] = []

        def run_the_policy() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                while not stop.is_set():
                    try:
                        conn.execute("CALL run_job(%s)", job)
                        runs.append("ok")
                    except psycopg.Error as exc:  # once 0008 has dropped the aggregate, its job is gone
                        runs.append(type(exc).__name__)
                        stop.wait(0.01)

        runner = threading.Thread(target=run_the_policy, daemon=True)
        runner.start()
        try:
            while "ok" not in runs:
                time.sleep(0.01)
            report = migrate(url, TimescaleMode.ON)
        finally:
            stop.set()
            runner.join(10)
        assert report.applied == [m.version for m in discover() if m.version >= 8]
        with psycopg.connect(url) as conn:
            kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'activity_daily'").fetchone()
            assert kind == ("r",)  # the rollup table now, not the aggregate's view
            total = conn.execute("SELECT sum(events) FROM activity_daily WHERE type = 'waste.deposited'").fetchone()
            assert total == (2,)
    finally:
        drop_database(url, timescale_admin_url)


def test_0010_brings_old_alerts_in_line_with_the_severity_policy(blank_database: str, tmp_path: Path) -> None:
    """Alerts stored before the severity policy (0001-0009, severities of the time) carry the policy's
    after 0010, open or cleared; a door an operator took out of service stays info."""
    for migration in discover():
        if migration.version < 10:
            for variant in migration.variants.values():
                (tmp_path / variant.name).write_text(variant.read_text())
    migrate(blank_database, TimescaleMode.OFF, directory=tmp_path)
    old = [
        ("box_offline", "", "warning", {"reason": "shutdown"}, False),
        ("door_left_open", "5", "warning", {}, True),
        ("compartment_fault", "3", "warning", {"fault": "jammed_door"}, False),
        ("compartment_fault", "4", "info", {"fault": "out_of_service"}, False),
        ("temperature_out_of_range", "", "warning", {}, True),
        ("red_box_near_limit", "1", "warning", {}, False),
        ("red_box_at_limit", "1", "critical", {}, False),
        ("parcel_near_expiry", "NX-9", "warning", {}, False),
    ]
    with psycopg.connect(blank_database, autocommit=True) as conn:
        for kind, subject, severity, details, cleared in old:
            conn.execute(
                "INSERT INTO alerts (box_id, kind, subject, severity, message, details, raised_by, cleared_at,"
                " cleared_by) VALUES ('box-001', %s, %s, %s, 'old', %s, 'test', %s, %s)",
                (
                    kind,
                    subject,
                    severity,
                    Jsonb(details),
                    datetime.now(UTC) if cleared else None,
                    "test" if cleared else None,
                ),
            )
    migrate(blank_database, TimescaleMode.OFF)
    with psycopg.connect(blank_database) as conn:
        now: dict[str, str] = dict(conn.execute("SELECT kind || ':' || subject, severity FROM alerts").fetchall())
    expected = {f"{kind}:{subject}": SEVERITY[AlertKind(kind)].value for kind, subject, *_ in old}
    expected["compartment_fault:4"] = "info"
    assert now == expected
