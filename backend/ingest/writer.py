"""Validates a batch of received messages and commits it in one transaction.

Exactly-once storage on top of at-least-once delivery:

- events and telemetry are COPYed into a session-temporary staging table, then moved with one
  ``INSERT ... SELECT`` that skips any ``(box_id, seq)`` already stored (whatever its timestamp)
  and any repeat inside the batch. Only rows with ``seq <= box_state.last_seq`` need the existence
  probe: a box's seq only grows, so anything above the newest committed seq is new by construction.
- latest state in ``box_state`` only moves forward: newest seq, newest device time, telemetry only if
  newer than what is stored, status only from an equal-or-newer session (a stale Last Will from an
  older session never overwrites a newer birth).
- anything that fails validation is written to ``dead_letters`` with its code, reason, topic and raw
  bytes; a message the database itself refuses is isolated by retrying the batch one message at a
  time and dead-lettered with code ``storage_rejected``.
- per-worker counters are updated in the same transaction, so they are exact.
- alerts are raised and cleared in the same transaction too (:mod:`backend.operations.alerts`), and
  status changes and alerts are NOTIFYed to the API's live stream on commit. Alerting runs in a
  savepoint: a fault there is logged and skips that batch's alerts, never its data.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from backend.ingest.mqtt import Received
from backend.operations.alerts import AlertEngine, AppliedStatus, OpsBatch
from contract import BoxLayout, ContractError, ErrorCode, MessageKind, TopicInfo, parse_topic
from contract.messages import (
    BoxEvent,
    CommandAck,
    Status,
    StatusReason,
    Telemetry,
    check_layout,
    decode_command_ack,
    decode_event,
    decode_status,
)

log = logging.getLogger(__name__)

#: Seconds a worker trusts a cached box layout, and a cached "no layout known yet".
LAYOUT_TTL_S = 60.0
UNKNOWN_LAYOUT_TTL_S = 2.0

EVENT_COLUMNS = (
    "ts",
    "received_at",
    "box_id",
    "seq",
    "session",
    "type",
    "compartment",
    "parcel_id",
    "carrier",
    "size_class",
    "fraction",
    "weight_kg",
    "payload",
)
TELEMETRY_COLUMNS = (
    "ts",
    "received_at",
    "box_id",
    "seq",
    "session",
    "power",
    "battery_pct",
    "temperature_c",
    "occupied",
    "compartments",
    "red_boxes",
)


@dataclass
class BatchResult:
    messages: int = 0
    events: int = 0
    telemetry: int = 0
    statuses: int = 0
    command_acks: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    dead_letter_codes: dict[str, int] = field(default_factory=dict)
    alert_errors: int = 0
    seconds: float = 0.0
    lag_seconds: float = 0.0
    #: Box id -> seqs of its events and telemetry that this batch committed (stored now, already
    #: stored, or kept as dead letters with a reason): what the boxes' receipts say.
    receipts: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Decoded:
    events: list[tuple[Received, BoxEvent]] = field(default_factory=list)
    telemetry: list[tuple[Received, BoxEvent]] = field(default_factory=list)
    statuses: list[tuple[Received, Status]] = field(default_factory=list)
    acks: list[tuple[Received, CommandAck]] = field(default_factory=list)
    dead: list[tuple[Received, str, str, str | None]] = field(default_factory=list)  # msg, code, reason, box


class _StatusRow(NamedTuple):
    """A box's status columns in ``box_state``, as locked or as a batch's statuses leave them."""

    online: bool
    session: int
    ts: datetime | None
    changed_at: datetime | None
    reason: str | None
    last_received_at: datetime | None


@functools.lru_cache(maxsize=65_536)
def _parse_topic(topic: str) -> TopicInfo:
    return parse_topic(topic)  # cached: a box publishes on the same few topics all its life


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _wall(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


class BatchWriter:
    """Writes batches on one connection (owned by one ingest worker thread)."""

    def __init__(self, conn: psycopg.Connection[Any], worker_id: str, alerts: AlertEngine | None = None) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self.alerts = alerts or AlertEngine()
        self._layouts: dict[str, tuple[BoxLayout | None, float]] = {}  # box -> (layout, good until)
        self._months: set[tuple[str, datetime]] = set()
        self._partitioned = bool(
            conn.execute(
                "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = 'events'"
            ).fetchone()
        )
        with conn.transaction():
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS staging_events "
                "(LIKE events INCLUDING DEFAULTS, idx integer NOT NULL) ON COMMIT DELETE ROWS"
            )
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS staging_telemetry "
                "(LIKE telemetry INCLUDING DEFAULTS, idx integer NOT NULL) ON COMMIT DELETE ROWS"
            )
            conn.execute(
                "INSERT INTO ingest_workers (worker_id, started_at, updated_at) VALUES (%s, now(), now()) "
                "ON CONFLICT (worker_id) DO UPDATE SET started_at = now(), updated_at = now()",
                (worker_id,),
            )

    # ------------------------------------------------------------------ decode

    def _decode(self, batch: Sequence[Received]) -> _Decoded:
        out = _Decoded()
        for msg in batch:
            box_id: str | None = None
            try:
                info = _parse_topic(msg.topic)
                box_id = info.box_id
                if info.kind is MessageKind.STATUS:
                    out.statuses.append((msg, decode_status(msg.payload, topic_box_id=box_id)))
                elif info.kind is MessageKind.COMMAND_ACK:
                    out.acks.append((msg, decode_command_ack(msg.payload, topic_box_id=box_id)))
                elif info.kind in (MessageKind.EVENTS, MessageKind.TELEMETRY):
                    event = decode_event(msg.payload, topic_box_id=box_id)
                    is_telemetry = isinstance(event.payload, Telemetry)
                    if is_telemetry != (info.kind is MessageKind.TELEMETRY):
                        raise ContractError(
                            ErrorCode.WRONG_TOPIC,
                            f"{event.type} message on the {info.kind.value} topic "
                            f"(telemetry goes on .../telemetry, everything else on .../events)",
                        )
                    (out.telemetry if is_telemetry else out.events).append((msg, event))
                else:
                    raise ContractError(ErrorCode.UNKNOWN_TOPIC, f"ingest does not take {info.kind.value} messages")
            except ContractError as exc:
                out.dead.append((msg, exc.code.value, exc.detail, box_id))
        return out

    def _check_layouts(self, decoded: _Decoded) -> None:
        now = time.monotonic()
        for _, status in decoded.statuses:
            if status.layout is not None:
                self._layouts[status.box_id] = (status.layout, now + LAYOUT_TTL_S)
        boxes = {e.box_id for _, e in decoded.events + decoded.telemetry}
        # Re-read layouts after a while (another worker may have seen a newer birth), and never
        # trust "no layout yet" for long (the birth may be in another worker's batch).
        missing = [b for b in boxes if b not in self._layouts or self._layouts[b][1] <= now]
        if missing:
            rows = self.conn.execute("SELECT box_id, layout FROM boxes WHERE box_id = ANY(%s)", (missing,)).fetchall()
            found: dict[str, BoxLayout] = {}
            for box_id, stored in rows:
                if stored is None:
                    continue
                try:
                    found[box_id] = BoxLayout.model_validate(stored)
                except ValueError as exc:  # a hand-edited or corrupt row must not stop ingest
                    log.warning("stored layout of %s is invalid (%s); compartments not checked", box_id, exc)
            for b in missing:
                # Unknown layout (no birth seen yet): accept, since the compartment cannot be checked.
                layout = found.get(b)
                self._layouts[b] = (layout, now + (LAYOUT_TTL_S if layout is not None else UNKNOWN_LAYOUT_TTL_S))
        for name in ("events", "telemetry"):
            kept: list[tuple[Received, BoxEvent]] = []
            for msg, event in getattr(decoded, name):
                layout = self._layouts[event.box_id][0]
                try:
                    if layout is not None:
                        check_layout(event, layout)
                    kept.append((msg, event))
                except ContractError as exc:
                    decoded.dead.append((msg, exc.code.value, exc.detail, event.box_id))
            setattr(decoded, name, kept)

    # ------------------------------------------------------------------ write

    def _write(self, batch: Sequence[Received]) -> BatchResult:
        decoded = self._decode(batch)
        receipts: dict[str, list[int]] = {}
        for _, event in decoded.events + decoded.telemetry:  # before the layout check: kept either way
            receipts.setdefault(event.box_id, []).append(event.seq)
        self._check_layouts(decoded)
        position = {id(msg): i for i, msg in enumerate(batch)}
        decoded.dead.sort(key=lambda item: position[id(item[0])])  # keep arrival order
        self._ensure_partitions(decoded)
        result = self._commit(decoded, len(batch))
        result.receipts = receipts
        return result

    def write(self, batch: Sequence[Received]) -> BatchResult:
        """Validate and commit ``batch``.

        Raises only when the database connection is in trouble (then nothing is committed and the
        caller retries). Any other failure is about the batch's content: the batch is retried one
        message at a time, and a message that fails on its own is dead-lettered with the reason
        (``storage_rejected`` when the database refused it, ``ingest_error`` for anything else).
        """
        started = time.perf_counter()
        try:
            result = self._write(batch)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except Exception as exc:  # poison-message isolation must catch everything else
            if len(batch) == 1:
                msg = batch[0]
                code = ErrorCode.STORAGE_REJECTED if isinstance(exc, psycopg.Error) else ErrorCode.INGEST_ERROR
                log.error(
                    "message on %s could not be stored (%s: %s); dead-lettered", msg.topic, type(exc).__name__, exc
                )
                reason = f"{type(exc).__name__}: {exc}"[:500]
                result = self._commit(_Decoded(dead=[(msg, code.value, reason, _box(msg.topic))]), 1)
            else:
                log.warning(
                    "batch of %d failed (%s: %s); isolating the bad message", len(batch), type(exc).__name__, exc
                )
                result = BatchResult()
                for msg in batch:
                    merge_results(result, self.write([msg]))
        result.seconds = time.perf_counter() - started
        result.lag_seconds = time.time() - min((m.received_at for m in batch), default=time.time())
        return result

    def _ensure_partitions(self, decoded: _Decoded) -> None:
        if not self._partitioned:
            return
        wanted: set[tuple[str, datetime]] = set()
        for table, items in (("events", decoded.events), ("telemetry", decoded.telemetry)):
            # One datetime per distinct day, not per event.
            for day in {e.ts_ms // 86_400_000 for _, e in items}:
                t = _ts(day * 86_400_000)
                wanted.add((table, datetime(t.year, t.month, 1, tzinfo=UTC)))
        for table, month in sorted(wanted - self._months):
            with self.conn.transaction():
                self.conn.execute("SELECT molo_ensure_partitions(%s, %s, %s)", (table, month, month))
            self._months.add((table, month))

    def _commit(self, d: _Decoded, n_messages: int) -> BatchResult:
        conn = self.conn
        r = BatchResult(messages=n_messages)
        with conn.transaction():
            conflicts: list[tuple[Received, BoxEvent, str]] = []
            if d.events:
                rows = [_event_row(i, m, e) for i, (m, e) in enumerate(d.events)]
                r.events, clashes = self._insert_series("events", EVENT_COLUMNS, rows)
                conflicts += [(*d.events[i], stored) for i, stored in clashes]
            if d.telemetry:
                rows = [_telemetry_row(i, m, e) for i, (m, e) in enumerate(d.telemetry)]
                r.telemetry, clashes = self._insert_series("telemetry", TELEMETRY_COLUMNS, rows)
                conflicts += [(*d.telemetry[i], stored) for i, stored in clashes]
            for msg, event, stored in conflicts:
                d.dead.append(
                    (
                        msg,
                        ErrorCode.SEQ_CONFLICT.value,
                        f"seq {event.seq} of box {event.box_id} is already stored with other content "
                        f"(stored: {stored}); a box must never reuse a sequence number",
                        event.box_id,
                    )
                )
            r.duplicates = len(d.events) + len(d.telemetry) - r.events - r.telemetry - len(conflicts)
            applied = self._update_box_state(d)
            r.statuses = len(d.statuses)
            r.command_acks = self._apply_command_acks(d.acks, d.dead)
            try:
                with conn.transaction():  # a savepoint: a fault in alerting never costs a batch its data
                    self.alerts.apply(
                        conn,
                        OpsBatch(
                            events=[e for _, e in d.events],
                            telemetry_boxes={e.box_id for _, e in d.telemetry},
                            heard_boxes={e.box_id for _, e in d.events + d.telemetry},
                            statuses=applied,
                            acked_commands=sorted({a.command_id for _, a in d.acks}),  # unknown ones: no row
                            layouts={b: entry[0] for b, entry in self._layouts.items()},
                        ),
                    )
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception:  # logged loudly; the rows are stored, this batch's alerts are skipped
                log.exception(
                    "alert evaluation failed for a batch of %d messages; data stored, alerts skipped", n_messages
                )
                r.alert_errors += 1
            if d.dead:
                with conn.cursor().copy(
                    "COPY dead_letters (received_at, topic, box_id, error_code, reason, payload, worker_id) FROM STDIN"
                ) as copy:
                    for msg, code, reason, box_id in d.dead:
                        copy.write_row(
                            (_wall(msg.received_at), msg.topic, box_id, code, reason, msg.payload, self.worker_id)
                        )
                        r.dead_letter_codes[code] = r.dead_letter_codes.get(code, 0) + 1
            r.dead_letters = len(d.dead)
            conn.execute(
                """UPDATE ingest_workers SET updated_at = now(), messages = messages + %s, events = events + %s,
                       telemetry = telemetry + %s, statuses = statuses + %s, command_acks = command_acks + %s,
                       duplicates = duplicates + %s, dead_letters = dead_letters + %s, batches = batches + 1
                   WHERE worker_id = %s""",
                (
                    n_messages,
                    r.events,
                    r.telemetry,
                    r.statuses,
                    r.command_acks,
                    r.duplicates,
                    r.dead_letters,
                    self.worker_id,
                ),
            )
        return r

    def record_timing(self, seconds: float, lag_seconds: float) -> None:
        """Store the last batch's duration and lag (outside the batch transaction, best effort)."""
        self.conn.execute(
            "UPDATE ingest_workers SET batch_seconds_sum = batch_seconds_sum + %s, last_batch_seconds = %s, "
            "last_lag_seconds = %s WHERE worker_id = %s",
            (seconds, seconds, lag_seconds, self.worker_id),
        )

    def _insert_series(
        self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> tuple[int, list[tuple[int, str]]]:
        """Insert the rows that are new; return how many, and the staging positions of rows whose
        ``(box_id, seq)`` is already stored with *different* content (with the stored ts and type)."""
        cols = ", ".join(columns)
        picked = ", ".join(f"s.{c}" for c in columns)
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY staging_{table} (idx, {cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                f"""INSERT INTO {table} ({cols})
                    SELECT DISTINCT ON (s.box_id, s.seq) {picked}
                    FROM staging_{table} s LEFT JOIN box_state b ON b.box_id = s.box_id
                    WHERE s.seq > coalesce(b.last_seq, 0)
                       OR NOT EXISTS (SELECT 1 FROM {table} t WHERE t.box_id = s.box_id AND t.seq = s.seq)
                    ORDER BY s.box_id, s.seq, s.idx
                    ON CONFLICT DO NOTHING"""
            )
            inserted = cur.rowcount
            if inserted == len(rows):
                return inserted, []
            # Not inserted = a repeat (same bytes replayed: harmless) or a conflict (the box reused a
            # seq for something else, e.g. after its storage was wiped): the latter is kept as a dead
            # letter, never silently dropped. Only rows that were skipped are compared.
            stored_kind = "t.type" if table == "events" else "'telemetry'"
            cur.execute(
                f"""SELECT DISTINCT ON (s.idx) s.idx, t.ts::text || ' ' || {stored_kind}
                    FROM staging_{table} s JOIN {table} t ON t.box_id = s.box_id AND t.seq = s.seq
                    WHERE (to_jsonb(s) - 'idx' - 'received_at') <> (to_jsonb(t) - 'received_at')
                    ORDER BY s.idx"""
            )
            return inserted, [(int(row[0]), str(row[1])) for row in cur.fetchall()]

    def _update_box_state(self, d: _Decoded) -> list[AppliedStatus]:
        seen: dict[str, tuple[int, int, float]] = {}  # box -> (max seq, max ts_ms, max received)
        newest_telemetry: dict[str, tuple[Received, BoxEvent]] = {}
        for msg, e in d.events + d.telemetry:
            s, t, rcv = seen.get(e.box_id, (0, 0, 0.0))
            seen[e.box_id] = (max(s, e.seq), max(t, e.ts_ms), max(rcv, msg.received_at))
        for msg, e in d.telemetry:
            current = newest_telemetry.get(e.box_id)
            if current is None or (e.ts_ms, e.seq) > (current[1].ts_ms, current[1].seq):
                newest_telemetry[e.box_id] = (msg, e)
        applied: list[AppliedStatus] = []
        with self.conn.cursor() as cur:
            if d.statuses:
                applied = self._apply_statuses(cur, d.statuses)
            # One statement per batch for all its boxes (arrays unnested in PostgreSQL), in box order
            # so that two workers lock rows in the same order: a statement per box made small batches
            # cost ~0.1 ms of round trip and planning per box (docs/benchmarks.md, end-to-end latency).
            if seen:
                boxes = sorted(seen)
                cur.execute(
                    """INSERT INTO box_state AS b (box_id, last_seq, last_seen_at, last_received_at)
                       SELECT * FROM unnest(%s::text[], %s::bigint[], %s::timestamptz[], %s::timestamptz[])
                       ON CONFLICT (box_id) DO UPDATE SET
                           last_seq = greatest(b.last_seq, excluded.last_seq),
                           last_seen_at = greatest(b.last_seen_at, excluded.last_seen_at),
                           last_received_at = greatest(b.last_received_at, excluded.last_received_at),
                           updated_at = now()""",
                    (
                        boxes,
                        [seen[b][0] for b in boxes],
                        [_ts(seen[b][1]) for b in boxes],
                        [_wall(seen[b][2]) for b in boxes],
                    ),
                )
            if newest_telemetry:
                columns: list[list[Any]] = [[] for _ in range(8)]
                for box, (_, e) in sorted(newest_telemetry.items()):
                    p = _telemetry(e)
                    for column, value in zip(
                        columns,
                        (
                            box,
                            _ts(e.ts_ms),
                            e.seq,
                            p.power.value,
                            p.battery_pct,
                            p.temperature_c,
                            Jsonb([c.model_dump(mode="json") for c in p.compartments]),
                            Jsonb([r.model_dump(mode="json") for r in p.red_boxes]),
                        ),
                        strict=True,
                    ):
                        column.append(value)
                cur.execute(
                    """UPDATE box_state b SET telemetry_ts = u.ts, telemetry_seq = u.seq, power = u.power,
                           battery_pct = u.battery_pct, temperature_c = u.temperature_c,
                           compartments = u.compartments, red_boxes = u.red_boxes, updated_at = now()
                       FROM unnest(%s::text[], %s::timestamptz[], %s::bigint[], %s::text[], %s::real[],
                                   %s::real[], %s::jsonb[], %s::jsonb[])
                            AS u(box_id, ts, seq, power, battery_pct, temperature_c, compartments, red_boxes)
                       WHERE b.box_id = u.box_id
                         AND (b.telemetry_ts IS NULL OR (b.telemetry_ts, b.telemetry_seq) < (u.ts, u.seq))""",
                    columns,
                )
        return applied

    def _apply_statuses(self, cur: psycopg.Cursor[Any], statuses: list[tuple[Received, Status]]) -> list[AppliedStatus]:
        """Apply a batch's statuses, each only if it is newer (see the module docstring); what moved.

        Three statements for the whole batch, not three per status (a reconnect storm is thousands of
        births): make sure every box has a row, lock the rows in box order (two workers then lock in
        the same order), fold the statuses in arrival order in Python, write each box's outcome.
        """
        boxes = sorted({status.box_id for _, status in statuses})
        created = {
            row[0]
            for row in cur.execute(
                "INSERT INTO box_state (box_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING box_id",
                (boxes,),
            ).fetchall()
        }
        state: dict[str, _StatusRow | None] = dict.fromkeys(created)
        for box, online, session, status_ts, changed, reason, received in cur.execute(
            """SELECT box_id, status_online, status_session, status_ts, status_changed_at, status_reason,
                      last_received_at
               FROM box_state WHERE box_id = ANY(%s) ORDER BY box_id FOR UPDATE""",
            (boxes,),
        ).fetchall():
            if box not in created:
                state[box] = _StatusRow(online, session, status_ts, changed, reason, received)
        applied: list[AppliedStatus] = []
        for msg, status in statuses:
            before = state[status.box_id]
            if before is not None and not (
                status.session > before.session or (status.session == before.session and not status.online)
            ):
                continue  # stale: an older session, or a repeated birth of the current one
            reason = (
                status.reason.value
                if status.reason
                else (StatusReason.BIRTH.value if status.online else StatusReason.CONNECTION_LOST.value)
            )
            ts = _ts(status.ts_ms) if status.ts_ms is not None else None
            received = _wall(msg.received_at)
            if before is None or before.online != status.online or before.changed_at is None:
                changed_at: datetime | None = received
            else:
                changed_at = before.changed_at
            last_received = before.last_received_at if before is not None else None
            if status.online and (last_received is None or received > last_received):
                last_received = received
            state[status.box_id] = _StatusRow(status.online, status.session, ts, changed_at, reason, last_received)
            applied.append(
                AppliedStatus(
                    box_id=status.box_id,
                    online=status.online,
                    was_online=None if before is None else before.online,
                    reason=reason,
                    session=status.session,
                    changed_at=changed_at,
                    ts=ts,
                )
            )
        final = {a.box_id: state[a.box_id] for a in applied}
        moved = sorted(final)
        if moved:
            rows = [row for box in moved if (row := final[box]) is not None]  # all are: each moved
            cur.execute(
                """UPDATE box_state b SET status_online = u.online, status_session = u.session, status_ts = u.ts,
                       status_changed_at = u.changed_at, status_reason = u.reason,
                       last_received_at = u.last_received, updated_at = now()
                   FROM unnest(%s::text[], %s::boolean[], %s::bigint[], %s::timestamptz[], %s::timestamptz[],
                               %s::text[], %s::timestamptz[])
                        AS u(box_id, online, session, ts, changed_at, reason, last_received)
                   WHERE b.box_id = u.box_id""",
                (moved, *(list(column) for column in zip(*rows, strict=True))),
            )
        # The box's layout and firmware, as it announced them (whether or not the status was newer):
        # per box the last one given in the batch wins, as one upsert per status in order would.
        described: dict[str, tuple[Any, str | None]] = {}
        for _, status in statuses:
            if status.layout is not None or status.firmware is not None:
                layout, firmware = described.get(status.box_id, (None, None))
                if status.layout is not None:
                    layout = Jsonb(status.layout.model_dump(mode="json"))
                described[status.box_id] = (layout, status.firmware if status.firmware is not None else firmware)
        if described:
            ids = sorted(described)
            cur.execute(
                """INSERT INTO boxes AS x (box_id, layout, firmware)
                   SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::text[])
                   ON CONFLICT (box_id) DO UPDATE SET layout = coalesce(excluded.layout, x.layout),
                       firmware = coalesce(excluded.firmware, x.firmware), updated_at = now()""",
                (ids, [described[b][0] for b in ids], [described[b][1] for b in ids]),
            )
        return applied

    def _apply_command_acks(self, acks: list[tuple[Received, CommandAck]], dead: list[Any]) -> int:
        """Record each ack on its command (the first ack wins; a repeat is harmless). The box's word
        is the truth: an ack also overrides ``timed_out`` and a ``failed`` the backend set itself
        (no ack yet), as paho may deliver a command after its publish was given up on. An ack for a
        command the backend never sent is kept as an ``unknown_command`` dead letter."""
        if not acks:
            return 0
        ids = [a.command_id for _, a in acks]
        known = {
            row[0]
            for row in self.conn.execute(
                "SELECT command_id FROM commands WHERE command_id = ANY(%s)", (ids,)
            ).fetchall()
        }
        for msg, ack in acks:
            if ack.command_id not in known:
                dead.append(
                    (
                        msg,
                        ErrorCode.UNKNOWN_COMMAND.value,
                        f"ack for command {ack.command_id} of box {ack.box_id}, which the backend never sent",
                        ack.box_id,
                    )
                )
        acks = [(m, a) for m, a in acks if a.command_id in known]
        if not acks:
            return 0
        with self.conn.cursor() as cur:
            cur.executemany(
                """UPDATE commands SET status = %s, detail = %s, ack_ts = %s, acked_at = %s
                   WHERE command_id = %s AND box_id = %s
                     AND (status IN ('pending', 'sent', 'timed_out') OR (status = 'failed' AND acked_at IS NULL))""",
                [
                    (a.result.value, a.detail, _ts(a.ts_ms), _wall(m.received_at), a.command_id, a.box_id)
                    for m, a in acks
                ],
            )
        return len(acks)


def _envelope(idx: int, msg: Received, e: BoxEvent) -> tuple[Any, ...]:
    """The leading columns every series row shares: staging index, ts, received_at, box, seq, session."""
    return (idx, _ts(e.ts_ms), _wall(msg.received_at), e.box_id, e.seq, e.session)


def _event_row(idx: int, msg: Received, e: BoxEvent) -> tuple[Any, ...]:
    p = e.payload
    get = p.__dict__.get
    size = get("size_class")
    fraction = get("fraction")
    return (
        *_envelope(idx, msg, e),
        e.type,
        get("compartment"),
        get("parcel_id"),
        get("carrier"),
        size.value if size is not None else None,
        fraction.value if fraction is not None else None,
        get("weight_kg"),
        p.model_dump_json(exclude_none=True),
    )


def _telemetry_row(idx: int, msg: Received, e: BoxEvent) -> tuple[Any, ...]:
    p = _telemetry(e)
    return (
        *_envelope(idx, msg, e),
        p.power.value,
        p.battery_pct,
        p.temperature_c,
        sum(1 for c in p.compartments if c.occupied),
        _json_list(p.compartments),
        _json_list(p.red_boxes),
    )


def _telemetry(event: BoxEvent) -> Telemetry:
    if not isinstance(event.payload, Telemetry):  # the decoder sorted events by payload type
        raise TypeError(f"{event.type} is not telemetry")
    return event.payload


def _json_list(items: Sequence[BaseModel]) -> str:
    return "[" + ",".join(item.model_dump_json() for item in items) + "]"


def _box(topic: str) -> str | None:
    try:
        return parse_topic(topic).box_id
    except ContractError:
        return None


def merge_results(total: BatchResult, part: BatchResult) -> None:
    """Add the counts of ``part`` to ``total``."""
    for name in (
        "messages",
        "events",
        "telemetry",
        "statuses",
        "command_acks",
        "duplicates",
        "dead_letters",
        "alert_errors",
    ):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for code, n in part.dead_letter_codes.items():
        total.dead_letter_codes[code] = total.dead_letter_codes.get(code, 0) + n
    for box_id, seqs in part.receipts.items():
        total.receipts.setdefault(box_id, []).extend(seqs)
