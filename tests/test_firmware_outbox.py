"""Unit tests of the firmware's persistent outbox (SQLite): seq and session counters, order, acks,
concurrency. No broker: these run in milliseconds."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from firmware_stub.db import DB_FILE
from firmware_stub.errors import OutboxClosedError
from firmware_stub.outbox import Outbox

TOPIC = "molo/v1/boxes/box-001/events"


def payload_of(seq: int) -> bytes:
    return f'{{"seq":{seq}}}'.encode()


# --------------------------------------------------------------------------- outbox


def test_seq_strictly_increases_across_reopen(tmp_path: Path) -> None:
    """seq numbers continue after closing and reopening the file, even when every row was acked."""
    db = tmp_path / DB_FILE
    with Outbox(db) as outbox:
        first = [outbox.enqueue(TOPIC, payload_of) for _ in range(3)]
        for seq in first:
            outbox.ack(seq)
        assert len(outbox) == 0
    with Outbox(db) as outbox:
        second = [outbox.enqueue(TOPIC, payload_of) for _ in range(2)]
    assert first == [1, 2, 3]
    assert second == [4, 5]


def test_session_increments_across_reopen(tmp_path: Path) -> None:
    """next_session() counts boots: 1, 2, ... and the counter survives reopening."""
    db = tmp_path / DB_FILE
    with Outbox(db) as outbox:
        assert outbox.session == 0
        assert outbox.next_session() == 1
    with Outbox(db) as outbox:
        assert outbox.next_session() == 2
        assert outbox.session == 2


def test_pending_returns_rows_in_seq_order_after_a_seq(tmp_path: Path) -> None:
    """pending() yields stored rows in seq order, from after_seq, at most limit of them."""
    with Outbox(tmp_path / DB_FILE) as outbox:
        for _ in range(5):
            outbox.enqueue(TOPIC, payload_of)
        outbox.ack(2)
        rows = outbox.pending()
        assert [r.seq for r in rows] == [1, 3, 4, 5]
        assert rows[0].payload == payload_of(1)
        assert rows[0].topic == TOPIC
        assert rows[0].qos == 1
        assert [r.seq for r in outbox.pending(after_seq=3, limit=1)] == [4]


def test_ack_deletes_only_that_row(tmp_path: Path) -> None:
    """ack(seq) deletes the row and reports whether it existed; others stay."""
    with Outbox(tmp_path / DB_FILE) as outbox:
        for _ in range(3):
            outbox.enqueue(TOPIC, payload_of)
        assert outbox.ack(2) is True
        assert outbox.ack(2) is False
        assert len(outbox) == 2
        assert outbox.ack_many([1, 3, 99]) == 2
        assert len(outbox) == 0


def test_failed_build_stores_nothing_and_uses_no_seq(tmp_path: Path) -> None:
    """If building the payload raises, nothing is stored and the seq is not used up (no gaps)."""

    def broken(seq: int) -> bytes:
        raise ValueError("does not validate")

    with Outbox(tmp_path / DB_FILE) as outbox:
        with pytest.raises(ValueError, match="does not validate"):
            outbox.enqueue(TOPIC, broken)
        assert len(outbox) == 0
        assert outbox.enqueue(TOPIC, payload_of) == 1


def test_payload_is_built_with_its_own_seq(tmp_path: Path) -> None:
    """The build callback receives the seq the row is stored under."""
    with Outbox(tmp_path / DB_FILE) as outbox:
        outbox.enqueue(TOPIC, payload_of)
        seq = outbox.enqueue(TOPIC, payload_of)
        (row,) = outbox.pending(after_seq=1)
    assert row.seq == seq == 2
    assert row.payload == payload_of(2)


def test_concurrent_enqueue_gives_unique_gap_free_seqs(tmp_path: Path) -> None:
    """Eight threads enqueueing at once get seqs 1..N, each exactly once, each row with its own seq."""
    threads_n, per_thread = 8, 50
    results: list[list[int]] = [[] for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    with Outbox(tmp_path / DB_FILE, synchronous="NORMAL") as outbox:

        def work(i: int) -> None:
            barrier.wait()
            for _ in range(per_thread):
                results[i].append(outbox.enqueue(TOPIC, payload_of))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = outbox.pending(limit=10_000)
    seqs = sorted(s for r in results for s in r)
    assert seqs == list(range(1, threads_n * per_thread + 1))
    assert all(r.payload == payload_of(r.seq) for r in rows)
    assert all(r == sorted(r) for r in results)  # each thread saw its own seqs increase


def test_next_seq_never_below_stored_rows(tmp_path: Path) -> None:
    """A meta counter behind the stored rows (hand-edited or restored file) is moved past them on open."""
    db = tmp_path / DB_FILE
    with Outbox(db) as outbox:
        for _ in range(3):
            outbox.enqueue(TOPIC, payload_of)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'next_seq'")
    conn.commit()
    conn.close()
    with Outbox(db) as outbox:
        assert outbox.next_seq == 4
        assert outbox.enqueue(TOPIC, payload_of) == 4


def test_closed_outbox_refuses_use(tmp_path: Path) -> None:
    """After close() every operation raises OutboxClosedError (a FirmwareError)."""
    outbox = Outbox(tmp_path / DB_FILE)
    outbox.close()
    outbox.close()  # idempotent
    with pytest.raises(OutboxClosedError):
        outbox.enqueue(TOPIC, payload_of)
    with pytest.raises(OutboxClosedError):
        len(outbox)


def test_outbox_uses_wal_and_full_sync_by_default(tmp_path: Path) -> None:
    """The database is in WAL mode with synchronous=FULL (2), so a power cut cannot roll seq back."""
    with Outbox(tmp_path / DB_FILE) as outbox:
        conn = outbox._require()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
