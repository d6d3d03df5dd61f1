"""The persistent outbox: every event waits here, on disk, until the broker has acknowledged it.

Where it sits in a message's journey (see ``shared/DESIGN.md``)::

    simulator -> BoxFirmware.emit -> [Outbox] -> paho (QoS 1) -> Mosquitto -> ingest -> PostgreSQL
                                       ^ row deleted on the ingest's receipt  <-----------'

A row is written *before* the message is handed to the MQTT client, and deleted only when the
ingest's receipt says it is committed (or, in the firmware's ``confirm="puback"`` mode, when the
broker's PUBACK arrives). A crash, a power cut or a broker outage in between leaves the row on disk,
and the next start replays it, in ``seq`` order. That makes delivery at-least-once; the backend
stores each ``(box_id, seq)`` once, which makes it exactly-once in the database.

``seq`` numbers are allocated here, in the same transaction that stores the row, from the
``next_seq`` counter in the ``meta`` table: it never goes backwards, survives restarts and has no
gaps. ``session`` counts the firmware's MQTT sessions -- one per start and one per reconnect (see
:mod:`firmware_stub.box` for why); birth and Last Will carry it, and so does every event.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from firmware_stub.db import DB_FILE, Synchronous, open_db
from firmware_stub.errors import OutboxClosedError

__all__ = ["Outbox", "OutboxRow"]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One stored message: the exact bytes to publish and where."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    created_ms: int


class Outbox:
    """A thread-safe, persistent FIFO of messages keyed by ``seq`` (SQLite, WAL).

    ``path`` is the database file, or a directory in which ``box.sqlite3`` is used. One
    connection guarded by one lock: every method is a short transaction, so contention is
    negligible next to the network.
    """

    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL") -> None:
        self.path = path / DB_FILE if path.is_dir() else path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = open_db(self.path, synchronous=synchronous)
        with self._lock:
            conn = self._require()
            # Belt and braces: next_seq is always moved in the same transaction as the insert,
            # but a hand-edited or restored file must still never make a seq repeat.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "UPDATE meta SET value = max(value, (SELECT coalesce(max(seq), 0) + 1 FROM outbox))"
                    " WHERE key = 'next_seq'"
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the database. Idempotent; every later call raises :class:`OutboxClosedError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxClosedError(f"outbox {self.path} is closed")
        return self._conn

    # ------------------------------------------------------------------ counters

    def _meta(self, conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`enqueue` will get."""
        with self._lock:
            return self._meta(self._require(), "next_seq")

    @property
    def session(self) -> int:
        """The current session (0 before the first :meth:`next_session`)."""
        with self._lock:
            return self._meta(self._require(), "session")

    def next_session(self) -> int:
        """Increment the session counter and return the new value (1 the first time)."""
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'session'")
                session = self._meta(conn, "session")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return session

    # ------------------------------------------------------------------ rows

    def enqueue(self, topic: str, build: Callable[[int], bytes], *, qos: int = 1) -> int:
        """Allocate the next seq, call ``build(seq)`` for the payload, store it; return the seq.

        Allocation and insert are one transaction: if ``build`` raises (e.g. the event does not
        validate), nothing is stored and the seq is not used up, so seqs stay gap-free.
        ``build`` runs under the outbox lock: keep it quick and do not call back into the outbox.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta(conn, "next_seq")
                payload = build(seq)
                conn.execute(
                    "INSERT INTO outbox (seq, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?)",
                    (seq, topic, payload, qos, time.time_ns() // 1_000_000),
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return seq

    def pending(self, after_seq: int = 0, limit: int = 1000) -> list[OutboxRow]:
        """Up to ``limit`` stored rows with ``seq > after_seq``, in seq order."""
        with self._lock:
            rows = (
                self._require()
                .execute(
                    "SELECT seq, topic, payload, qos, created FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
                .fetchall()
            )
        return [OutboxRow(seq, topic, bytes(payload), qos, created) for seq, topic, payload, qos, created in rows]

    def rows(self, seqs: Iterable[int]) -> list[OutboxRow]:
        """The stored rows among ``seqs``, in seq order (rows already deleted are left out)."""
        wanted = sorted(set(seqs))
        found: list[OutboxRow] = []
        with self._lock:
            conn = self._require()
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found += [
                    OutboxRow(seq, topic, bytes(payload), qos, created)
                    for seq, topic, payload, qos, created in conn.execute(
                        f"SELECT seq, topic, payload, qos, created FROM outbox WHERE seq IN ({marks}) ORDER BY seq",
                        chunk,
                    )
                ]
        return found

    def ack(self, seq: int) -> bool:
        """Delete the row ``seq`` (the broker has it). False if there was no such row."""
        return self.ack_many((seq,)) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several rows in one transaction; returns how many existed."""
        batch = [(seq,) for seq in seqs]
        if not batch:
            return 0
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany("DELETE FROM outbox WHERE seq = ?", batch)
                deleted = conn.total_changes - before
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return deleted

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._require().execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Outbox {self.path} ({state})>"
