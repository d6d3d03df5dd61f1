"""Which storage flavour a benchmark runs on, and the server that has it.

``postgres``: plain PostgreSQL at ``MOLO_BENCH_DATABASE_URL`` (an admin URL; default the local server on
5432). ``timescale``: a server that preloads TimescaleDB at ``MOLO_BENCH_TIMESCALE_URL`` (default a
second local cluster on 5433). Each benchmark makes a fresh database there and migrates it on that
flavour, so the figures of the two flavours come from the same code and the same load.
"""

from __future__ import annotations

import os

import psycopg

from backend.settings import TimescaleMode

FLAVOURS = ("postgres", "timescale")


def admin_url(flavour: str) -> str:
    """The admin URL of the server for ``flavour``."""
    if flavour == "timescale":
        return os.environ.get("MOLO_BENCH_TIMESCALE_URL", "postgresql://postgres@127.0.0.1:5433/postgres")
    return os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def mode(flavour: str) -> TimescaleMode:
    """The migration mode that gives ``flavour`` (and fails if the server cannot)."""
    return TimescaleMode.ON if flavour == "timescale" else TimescaleMode.OFF


def describe(url: str) -> str:
    """The server's PostgreSQL version and, where installed in the database, TimescaleDB's."""
    with psycopg.connect(url) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
        ts = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        if ts is None:  # an admin database: the version a new database would get, if the server preloads it
            ts = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb' "
                "AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'"
            ).fetchone()
    return f"PostgreSQL {pg[0] if pg else '?'}" + (f", TimescaleDB {ts[0]}" if ts else " (plain)")
