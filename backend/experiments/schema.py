"""Procrastinate's own schema (the job queue's tables and functions), installed and upgraded by
``molo migrate``.

Where it sits: called by :func:`backend.migrate.migrate` after the project's numbered migrations,
on the same connection and under the same advisory lock, so it is serialised with them and safe to
run from several processes at once. Idempotent: the schema is installed once (the library's
``schema.sql``, the same text ``procrastinate schema --apply`` runs), and the library migration it
corresponds to is recorded in ``queue_schema``. After a procrastinate upgrade, the library's own
migration files newer than the recorded one are applied in order (each in a transaction), which is
how procrastinate documents upgrading. A database whose recorded version is newer than the
installed library is refused, as is a procrastinate schema that something else installed without
recording its version (there is no safe way to tell which version it is).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from backend.migrate import MigrationError

__all__ = ["LIBRARY", "QueueSchemaError", "QueueSchemaReport", "ensure_queue_schema", "library_migrations"]

log = logging.getLogger(__name__)
LIBRARY = "procrastinate"


class QueueSchemaError(MigrationError):
    """The queue's schema cannot be brought to what the installed library expects."""


@dataclass(frozen=True)
class QueueSchemaReport:
    #: The library migration the database's queue schema now corresponds to.
    version: str
    #: What this call did: ``installed``, ``upgraded`` (with the migrations applied) or ``current``.
    action: str
    applied: tuple[str, ...] = ()


def _sql_dir() -> Path:
    # Located without importing procrastinate (which pulls in its whole app machinery).
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        raise QueueSchemaError("procrastinate is not installed; it is a dependency of molo-hubs (uv sync)")
    return Path(spec.origin).parent / "sql"


def library_migrations() -> list[Path]:
    """The installed library's migration files, oldest first (names sort by version)."""
    return sorted((_sql_dir() / "migrations").glob("*.sql"))


def _latest() -> str:
    migrations = library_migrations()
    if not migrations:
        raise QueueSchemaError(f"no procrastinate migrations found under {_sql_dir()}")
    return migrations[-1].stem


def ensure_queue_schema(conn: psycopg.Connection[Any]) -> QueueSchemaReport:
    """Install or upgrade procrastinate's schema on ``conn`` (autocommit; the caller holds the
    migration lock)."""
    conn.execute(
        """CREATE TABLE IF NOT EXISTS queue_schema (
               library text PRIMARY KEY, version text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    latest = _latest()
    row = conn.execute("SELECT version FROM queue_schema WHERE library = %s", (LIBRARY,)).fetchone()
    if row is None:
        present = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
        if present and present[0]:
            raise QueueSchemaError(
                "procrastinate_jobs exists but queue_schema does not say which procrastinate version made it; "
                f"if it is the installed one, record it: INSERT INTO queue_schema (library, version) "
                f"VALUES ('{LIBRARY}', '{latest}')"
            )
        script = (_sql_dir() / "schema.sql").read_text(encoding="utf-8")
        with conn.transaction():
            conn.execute(sql.SQL(script))  # the library's own file, no input
            conn.execute("INSERT INTO queue_schema (library, version) VALUES (%s, %s)", (LIBRARY, latest))
        log.info("installed the procrastinate schema (%s)", latest)
        return QueueSchemaReport(version=latest, action="installed")
    recorded = str(row[0])
    if recorded == latest:
        return QueueSchemaReport(version=latest, action="current")
    if recorded > latest:
        raise QueueSchemaError(
            f"the database's procrastinate schema is at {recorded}, newer than the installed library ({latest}); "
            "upgrade the code"
        )
    applied: list[str] = []
    for path in library_migrations():
        if path.stem <= recorded:
            continue
        with conn.transaction():
            conn.execute(sql.SQL(path.read_text(encoding="utf-8")))
            conn.execute(
                "UPDATE queue_schema SET version = %s, applied_at = now() WHERE library = %s", (path.stem, LIBRARY)
            )
        applied.append(path.stem)
        log.info("applied procrastinate migration %s", path.name)
    return QueueSchemaReport(version=latest, action="upgraded", applied=tuple(applied))
