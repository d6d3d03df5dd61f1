"""Applies the numbered SQL migrations in ``backend/migrations`` to a database.

Where it sits: before everything else in the backend; ``molo migrate`` runs it, and so does the main
job at start. Safe to run from several processes at once (a session advisory lock serialises them),
idempotent, and strict: an applied migration whose file has changed is an error, not a silent skip.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

from backend.settings import TimescaleMode

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(postgres|timescale))?\.sql$")
_LOCK_KEY = 0x6D6F6C6F  # "molo"
Flavour = Literal["postgres", "timescale"]
log = logging.getLogger(__name__)


#: How often a statement of a no-transaction file is tried when it loses a race with a concurrent
#: transaction (see :func:`_execute_retrying`), and the first pause between tries (doubling).
STATEMENT_TRIES = 6
RETRY_PAUSE_S = 0.05


class MigrationError(RuntimeError):
    """The database cannot be brought to the expected schema."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    variants: dict[str | None, Path]

    def file_for(self, flavour: Flavour) -> Path:
        path = self.variants.get(flavour) or self.variants.get(None)
        if path is None:
            raise MigrationError(f"migration {self.version:04d}_{self.name} has no {flavour} variant")
        return path


@dataclass
class MigrationReport:
    flavour: Flavour
    applied: list[int] = field(default_factory=list)
    current: int = 0


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, by version; refuses gaps, clashes and stray files."""
    found: dict[int, dict[str | None, Path]] = defaultdict(dict)
    names: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name[.postgres|.timescale].sql")
        version, name, variant = int(match[1]), match[2], match[3]
        if names.setdefault(version, name) != name or variant in found[version]:
            raise MigrationError(f"two migrations claim version {version:04d}")
        found[version][variant] = path
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1..N without gaps, found {versions}")
    return [Migration(v, names[v], found[v]) for v in versions]


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_statements(script: str) -> list[str]:
    """Split SQL on top-level semicolons, respecting quotes, dollar quotes and comments."""
    statements: list[str] = []
    buf: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if script.startswith("--", i):
            end = script.find("\n", i)
            end = n if end == -1 else end
            buf.append(script[i:end])
            i = end
        elif ch == "'":
            end = i + 1
            while end < n and not (script[end] == "'" and not script.startswith("''", end)):
                end += 2 if script.startswith("''", end) else 1
            buf.append(script[i : end + 1])
            i = end + 1
        elif ch == "$" and (m := re.match(r"\$[A-Za-z_]*\$", script[i:])):
            tag = m.group(0)
            end = script.find(tag, i + len(tag))
            end = n if end == -1 else end + len(tag)
            buf.append(script[i:end])
            i = end
        elif ch == ";":
            statements.append("".join(buf).strip())
            buf = []
            i += 1
        else:
            buf.append(ch)
            i += 1
    statements.append("".join(buf).strip())
    return [
        s
        for s in statements
        if s and not all(line.strip().startswith("--") or not line.strip() for line in s.splitlines())
    ]


def _preloaded(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Whether the server loads TimescaleDB at start (``shared_preload_libraries``), as it must."""
    row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    libraries = [lib.strip().strip('"') for lib in str(row[0] if row else "").split(",")]
    return any(lib.rsplit("/", 1)[-1].split("-", 1)[0] == "timescaledb" for lib in libraries)


def _config_file(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """The server's postgresql.conf, where the caller may read it (superuser or pg_read_all_settings)."""
    try:
        row = conn.execute("SELECT current_setting('config_file')").fetchone()
    except psycopg.Error:
        return "postgresql.conf"
    return str(row[0]) if row else "postgresql.conf"


def _not_preloaded_message(conn: psycopg.Connection[tuple[object, ...]], cause: object) -> str:
    return (
        "TimescaleDB requested (MOLO_TIMESCALE=on): the extension is installed on this server but not "
        f"preloaded, so CREATE EXTENSION timescaledb fails ({cause}). Add timescaledb to "
        f"shared_preload_libraries in {_config_file(conn)} (shared_preload_libraries = 'timescaledb') and "
        "restart PostgreSQL, or set MOLO_TIMESCALE=auto or off to use plain PostgreSQL"
    )


def _create_extension(conninfo: str) -> psycopg.Error | None:
    """``CREATE EXTENSION timescaledb`` on a connection of its own; the error if it failed.

    A server that has the extension's files but does not preload the library answers FATAL and
    closes the connection, so the attempt must not be made on the migration's own connection.
    """
    try:
        with psycopg.connect(conninfo, autocommit=True) as probe:
            probe.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        return exc
    return None


def detect_flavour(conn: psycopg.Connection[tuple[object, ...]], mode: TimescaleMode, conninfo: str) -> Flavour:
    """``timescale`` if the extension is (or can be) installed and ``mode`` allows it.

    ``auto`` falls back to plain PostgreSQL where the extension is missing, not preloaded or cannot be
    created; ``on`` refuses each of those with a message that says what to change.
    """
    if mode is TimescaleMode.OFF:
        return "postgres"
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return "timescale"
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if not available:
        if mode is TimescaleMode.ON:
            raise MigrationError("TimescaleDB requested (MOLO_TIMESCALE=on) but the extension is not available")
        return "postgres"
    preloaded = _preloaded(conn)
    error = _create_extension(conninfo)
    if error is None:
        return "timescale"
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if mode is TimescaleMode.ON:
        if not preloaded or "preload" in str(error):
            raise MigrationError(_not_preloaded_message(conn, cause)) from error
        message = f"TimescaleDB requested (MOLO_TIMESCALE=on) but CREATE EXTENSION failed: {cause}"
        raise MigrationError(message) from error
    log.warning("timescaledb is installed but cannot be created (%s); using plain PostgreSQL", cause)
    return "postgres"


def migrate(
    conninfo: str, mode: TimescaleMode = TimescaleMode.AUTO, directory: Path = MIGRATIONS_DIR
) -> MigrationReport:
    """Bring the database at ``conninfo`` up to the newest migration (with the project's migrations,
    also the job queue's schema: :mod:`backend.experiments.schema`)."""
    migrations = discover(directory)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            report = _migrate_locked(conn, migrations, mode, conninfo)
            if directory == MIGRATIONS_DIR:
                # The experiment job queue's own schema (procrastinate's), under the same lock.
                from backend.experiments.schema import ensure_queue_schema  # noqa: PLC0415

                ensure_queue_schema(conn)
            return report
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _migrate_locked(
    conn: psycopg.Connection[tuple[object, ...]], migrations: list[Migration], mode: TimescaleMode, conninfo: str
) -> MigrationReport:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL, flavour text NOT NULL,
               checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    applied = {
        int(str(r[0])): (str(r[1]), str(r[2]))
        for r in conn.execute("SELECT version, flavour, checksum FROM schema_migrations").fetchall()
    }
    flavours = {f for f, _ in applied.values()}
    if len(flavours) > 1:
        raise MigrationError(f"schema_migrations mixes flavours {sorted(flavours)}")
    flavour: Flavour = (
        "timescale" if flavours == {"timescale"} else ("postgres" if flavours else detect_flavour(conn, mode, conninfo))
    )
    report = MigrationReport(flavour=flavour)
    known = {m.version for m in migrations}
    if unknown := sorted(set(applied) - known):
        raise MigrationError(f"database has migrations {unknown} that this code does not know; upgrade the code")
    for migration in migrations:
        path = migration.file_for(flavour)
        checksum = _checksum(path)
        if migration.version in applied:
            if applied[migration.version][1] != checksum:
                raise MigrationError(f"{path.name} changed after it was applied; add a new migration instead")
            continue
        _apply(conn, migration, path, flavour, checksum)
        report.applied.append(migration.version)
        log.info("applied migration %s (%s)", path.name, flavour)
    report.current = migrations[-1].version if migrations else 0
    return report


def _apply(
    conn: psycopg.Connection[tuple[object, ...]], migration: Migration, path: Path, flavour: Flavour, checksum: str
) -> None:
    script = path.read_text()
    record = sql.SQL("INSERT INTO schema_migrations (version, name, flavour, checksum) VALUES ({}, {}, {}, {})").format(
        migration.version, migration.name, flavour, checksum
    )
    if script.startswith("-- molo:no-transaction"):
        conn.execute("SELECT set_config('molo.flavour', %s, false)", (flavour,))
        for statement in split_statements(script):
            _execute_retrying(conn, statement, path.name)
        conn.execute(record)
        return
    with conn.transaction():
        conn.execute("SELECT set_config('molo.flavour', %s, true)", (flavour,))
        conn.execute(sql.SQL(script))
        conn.execute(record)


def _transient(exc: psycopg.Error) -> bool:
    """A race with a concurrent transaction that the same statement wins when tried again: deadlock,
    serialization failure, or a catalogue row changed under it ("tuple concurrently updated" or
    "deleted", SQLSTATE XX000: e.g. TimescaleDB's scheduler running a policy of the aggregate that
    0008 drops, seconds after 0004 made it on a fresh database)."""
    if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure):
        return True
    return isinstance(exc, psycopg.errors.InternalError_) and "concurrently" in str(exc)


def _execute_retrying(conn: psycopg.Connection[tuple[object, ...]], statement: str, file: str) -> None:
    """One statement of a no-transaction file, tried again when it loses a race (it runs in its own
    transaction and rolls back whole, and every such statement is written to be repeatable)."""
    for attempt in range(1, STATEMENT_TRIES + 1):
        try:
            conn.execute(sql.SQL(statement))  # trusted file from the repo
            return
        except psycopg.Error as exc:
            if attempt == STATEMENT_TRIES or not _transient(exc):
                raise
            pause = RETRY_PAUSE_S * 2 ** (attempt - 1)
            log.warning("%s: %s; trying the statement again in %.2f s", file, str(exc).splitlines()[0], pause)
            time.sleep(pause)
