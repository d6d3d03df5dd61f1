"""The box's one SQLite file: what survives a reboot or a power cut.

Where it sits in a message's journey (see ``shared/DESIGN.md``): inside the box, between the
moment an event happens and the broker's PUBACK. Three things live here, all in
``<state_dir>/box.sqlite3``:

``outbox``       events and telemetry not yet acknowledged by the broker (:mod:`.outbox`);
``meta``         the counters ``next_seq`` and ``session``, which must never go backwards;
``commands``     the journal of executed command ids and their acks (:mod:`.commands`), so a
                 redelivered command is answered, not re-executed.

Durability: WAL journal with ``synchronous=FULL`` by default. In WAL mode ``NORMAL`` survives a
crash of the process but not of the machine: after a power cut the last commits can be lost. Here
that would roll ``next_seq`` back and the box would reuse a sequence number the backend has already
stored -- the backend stores each ``(box_id, seq)`` once, so the new event would be silently taken
for a duplicate. ``FULL`` syncs the WAL at every commit (about a millisecond on an SSD); a real box
emits an event every few minutes. Simulations that run many boxes in one process and only ever
"kill" them as processes (never the machine) may pass ``synchronous="NORMAL"``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

from firmware_stub.errors import FirmwareError

__all__ = ["DB_FILE", "SCHEMA_VERSION", "Synchronous", "open_db"]

DB_FILE = "box.sqlite3"
#: Bump with a migration when a table changes (stored in ``PRAGMA user_version``).
SCHEMA_VERSION = 1
Synchronous = Literal["FULL", "NORMAL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,   -- the envelope's seq: per box, from 1, never reused
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,      -- the exact bytes published (and re-published on replay)
    qos        INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    created    INTEGER NOT NULL       -- wall-clock ms when stored (diagnostics only)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key        TEXT PRIMARY KEY,
    value      INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('session', 0);
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,      -- UUID, canonical lower-case form
    state      TEXT NOT NULL CHECK (state IN ('executing', 'done')),
    ack        BLOB,                  -- the exact ack bytes sent; NULL while executing
    received   INTEGER NOT NULL       -- wall-clock ms (diagnostics and pruning order)
);
"""


def open_db(path: Path, *, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """Open (creating if needed) the box database at ``path``, schema included.

    The connection is in autocommit mode (``isolation_level=None``): callers group statements with
    explicit ``BEGIN IMMEDIATE`` / ``COMMIT``. It may be used from several threads, but only under
    the caller's own lock.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        (found,) = conn.execute("PRAGMA user_version").fetchone()
        if found > SCHEMA_VERSION:
            raise FirmwareError(f"{path} has schema version {found}; this firmware knows {SCHEMA_VERSION}")
        # One transaction: two processes opening the same fresh file cannot both half-create it.
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn
