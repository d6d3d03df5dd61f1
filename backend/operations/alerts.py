"""Alerts raised and cleared from ingested data, inside the ingest batch transaction.

Where it sits in a message's journey: ingest -> **alerts** -> PostgreSQL (``alerts``) -> API and
live stream. :class:`AlertEngine.apply` runs in :class:`backend.ingest.writer.BatchWriter`'s
transaction after the latest state has been moved forward, so an alert is raised or cleared exactly
once with the rows that caused it (a rolled-back batch raises nothing; a redelivered one is a no-op).

Forward-only, like the rest of the writer:

- every alert remembers the position of the evidence that raised it in the box's own order (the
  event or telemetry ``seq``; the status ``session`` for ``box_offline``). A clearing message must
  be *newer*: a stale ``door.closed`` replayed after a newer ``door.left_open`` clears nothing;
- a raising event is ignored when a newer clearing event of the same subject is already stored
  (a late ``door.left_open`` after its ``door.closed``);
- measured alerts (temperature, red-box fill) are evaluated against the current stored state,
  which itself only moves forward;
- the writer's upsert of ``box_state`` row-locks every box in the batch before this runs, so two
  workers never evaluate the same box at once, and the second sees the first's committed rows;
- at most one open alert per (box, kind, subject): a partial unique index, and ``ON CONFLICT DO
  NOTHING`` on raising.

Kinds (``AlertKind``) and who raises / clears them are in docs/operations.md. Time-driven alerts
(missed heartbeats, parcels near expiry) are raised by :mod:`backend.operations.monitor`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from operator import itemgetter
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backend.operations.live import LiveEvent, notify, notify_many, status_data
from contract import BoxLayout
from contract.messages import (
    BoxEvent,
    CompartmentFault,
    DoorLeftOpen,
    FaultKind,
    ParcelCollected,
    ParcelExpired,
    WasteCollected,
    WasteDeposited,
)

log = logging.getLogger(__name__)
Row = dict[str, Any]


class AlertKind(StrEnum):
    BOX_OFFLINE = "box_offline"
    DOOR_LEFT_OPEN = "door_left_open"
    COMPARTMENT_FAULT = "compartment_fault"
    RED_BOX_NEAR_LIMIT = "red_box_near_limit"
    RED_BOX_AT_LIMIT = "red_box_at_limit"
    TEMPERATURE_OUT_OF_RANGE = "temperature_out_of_range"
    PARCEL_NEAR_EXPIRY = "parcel_near_expiry"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


#: The severity policy (docs/operations.md, "Severity"): what an operator must act on now is critical,
#: what needs watching is a warning; both colour the box on the dashboard and set its ``alert_level``.
#: Info is listed with the alerts but never colours a box: a parcel nearing the end of its pickup
#: window is routine, and the van takes it back on its next round.
SEVERITY: dict[AlertKind, Severity] = {
    AlertKind.BOX_OFFLINE: Severity.CRITICAL,
    AlertKind.DOOR_LEFT_OPEN: Severity.CRITICAL,
    AlertKind.COMPARTMENT_FAULT: Severity.CRITICAL,
    AlertKind.RED_BOX_AT_LIMIT: Severity.CRITICAL,
    AlertKind.TEMPERATURE_OUT_OF_RANGE: Severity.CRITICAL,
    AlertKind.RED_BOX_NEAR_LIMIT: Severity.WARNING,
    AlertKind.PARCEL_NEAR_EXPIRY: Severity.INFO,
}
#: The severities that colour a box.
AlertLevel = Literal["critical", "warning"]


def alert_level(severities: Iterable[str]) -> AlertLevel | None:
    """The highest severity among a box's open alerts that colours it (None: none does)."""
    present = set(severities)
    if Severity.CRITICAL.value in present:
        return "critical"
    if Severity.WARNING.value in present:
        return "warning"
    return None


@dataclass(frozen=True)
class AlertRules:
    """Thresholds (from :class:`backend.settings.Settings`; defaults and reasons there)."""

    temperature_max_c: float = 45.0
    temperature_min_c: float = -20.0
    temperature_hysteresis_c: float = 2.0
    red_box_near_ratio: float = 0.8
    heartbeat_timeout_s: float = 90.0
    pickup_window_h: float = 72.0
    expiry_margin_h: float = 12.0

    @classmethod
    def from_settings(cls, settings: Any) -> AlertRules:
        return cls(
            temperature_max_c=settings.alert_temperature_max_c,
            temperature_min_c=settings.alert_temperature_min_c,
            temperature_hysteresis_c=settings.alert_temperature_hysteresis_c,
            red_box_near_ratio=settings.alert_red_box_near_ratio,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            pickup_window_h=settings.parcel_pickup_window_h,
            expiry_margin_h=settings.alert_parcel_expiry_margin_h,
        )


ALERT_COLUMNS = (
    "id, box_id, kind, subject, compartment, severity, message, details, raised_at, raised_ts, raised_by, "
    "raised_seq, raised_session, cleared_at, cleared_ts, cleared_by, cleared_seq, acknowledged_at, acknowledged_by"
)


def alert_data(row: Row) -> dict[str, Any]:
    """An alert row as the API and the live stream show it."""
    return {
        "id": row["id"],
        "box_id": row["box_id"],
        "kind": row["kind"],
        "subject": row["subject"],
        "compartment": row["compartment"],
        "severity": row["severity"],
        "message": row["message"],
        "details": row["details"],
        "open": row["cleared_at"] is None,
        "raised_at": row["raised_at"],
        "raised_ts": row["raised_ts"],
        "raised_by": row["raised_by"],
        "cleared_at": row["cleared_at"],
        "cleared_ts": row["cleared_ts"],
        "cleared_by": row["cleared_by"],
        "acknowledged_at": row["acknowledged_at"],
        "acknowledged_by": row["acknowledged_by"],
    }


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def raise_alert(
    conn: psycopg.Connection[Any],
    *,
    box_id: str,
    kind: AlertKind,
    subject: str = "",
    compartment: int | None = None,
    severity: Severity | None = None,
    message: str,
    details: Mapping[str, Any] | None = None,
    raised_by: str,
    raised_ts: datetime | None = None,
    raised_seq: int | None = None,
    raised_session: int | None = None,
    unless_newer: tuple[Sequence[str], int | None] | None = None,
) -> Row | None:
    """Open an alert (and notify ``alert.raised``) unless one is open for (box, kind, subject).
    ``severity``: the kind's by the policy (:data:`SEVERITY`) unless given.

    ``unless_newer=(types, compartment)``: do nothing if an event of one of ``types`` (for that
    compartment) with a seq above ``raised_seq`` is already stored: the evidence is stale.
    """
    guard = "TRUE"
    params: dict[str, Any] = {
        "box": box_id,
        "kind": kind.value,
        "subject": subject,
        "compartment": compartment,
        "severity": (severity or SEVERITY[kind]).value,
        "message": message,
        "details": Jsonb(dict(details or {})),
        "by": raised_by,
        "ts": raised_ts,
        "seq": raised_seq,
        "session": raised_session,
    }
    if unless_newer is not None and raised_seq is not None:
        types, cid = unless_newer
        guard = (
            "NOT EXISTS (SELECT 1 FROM events e WHERE e.box_id = %(box)s AND e.seq > %(seq)s "
            "AND e.type = ANY(%(types)s) AND e.compartment IS NOT DISTINCT FROM %(guard_c)s)"
        )
        params["types"] = list(types)
        params["guard_c"] = cid
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""INSERT INTO alerts (box_id, kind, subject, compartment, severity, message, details, raised_by,
                                    raised_ts, raised_seq, raised_session)
                SELECT %(box)s, %(kind)s, %(subject)s, %(compartment)s, %(severity)s, %(message)s, %(details)s,
                       %(by)s, %(ts)s, %(seq)s, %(session)s
                WHERE {guard}
                ON CONFLICT (box_id, kind, subject) WHERE cleared_at IS NULL DO NOTHING
                RETURNING {ALERT_COLUMNS}""",
            params,
        )
        row = cur.fetchone()
    if row is not None:
        notify(conn, LiveEvent.ALERT_RAISED, alert_data(row))
    return row


def clear_alerts(
    conn: psycopg.Connection[Any],
    *,
    box_id: str,
    kind: AlertKind,
    subject: str | None = "",
    cleared_by: str,
    cleared_ts: datetime | None = None,
    cleared_seq: int | None = None,
    before_session: int | None = None,
    reason: str | None = None,
) -> list[Row]:
    """Clear the open alert(s) of (box, kind[, subject]) (notifying ``alert.cleared`` for each).

    With ``cleared_seq``, only alerts raised by older evidence (``raised_seq < cleared_seq``, or raised
    without a seq) are cleared; with ``before_session`` only those raised in an older session (or by
    the sweep in no session); with ``reason`` only those whose ``details.reason`` is that.
    """
    where = ["box_id = %(box)s", "kind = %(kind)s", "cleared_at IS NULL"]
    params: dict[str, Any] = {
        "box": box_id,
        "kind": kind.value,
        "by": cleared_by,
        "ts": cleared_ts,
        "seq": cleared_seq,
    }
    if subject is not None:
        where.append("subject = %(subject)s")
        params["subject"] = subject
    if cleared_seq is not None:
        where.append("(raised_seq IS NULL OR raised_seq < %(seq)s)")
    if before_session is not None:
        where.append("(raised_session IS NULL OR raised_session < %(session)s)")
        params["session"] = before_session
    if reason is not None:
        where.append("details->>'reason' = %(reason)s")
        params["reason"] = reason
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE alerts SET cleared_at = now(), cleared_by = %(by)s, cleared_ts = %(ts)s,
                       cleared_seq = %(seq)s
                WHERE {" AND ".join(where)}
                RETURNING {ALERT_COLUMNS}""",
            params,
        )
        rows = cur.fetchall()
    for row in rows:
        notify(conn, LiveEvent.ALERT_CLEARED, alert_data(row))
    return rows


# --------------------------------------------------------------------------- what the writer hands over


@dataclass(frozen=True)
class AppliedStatus:
    """A status message that moved ``box_state`` (it was newer than what was stored)."""

    box_id: str
    online: bool
    was_online: bool | None  # None: the box had no state yet
    reason: str
    session: int
    changed_at: datetime | None
    ts: datetime | None


@dataclass
class OpsBatch:
    """What one committed batch changed, for the alert engine."""

    events: list[BoxEvent] = field(default_factory=list)
    telemetry_boxes: set[str] = field(default_factory=set)
    heard_boxes: set[str] = field(default_factory=set)
    statuses: list[AppliedStatus] = field(default_factory=list)
    acked_commands: list[UUID] = field(default_factory=list)
    layouts: Mapping[str, BoxLayout | None] = field(default_factory=dict)


_DOOR = (AlertKind.DOOR_LEFT_OPEN, ("door.closed",))
_FAULT = (AlertKind.COMPARTMENT_FAULT, ("compartment.restored",))
#: Events that end an open alert of their compartment: event type -> alert kind.
_CLEARED_BY = {event: kind for kind, events in (_DOOR, _FAULT) for event in events}


class AlertEngine:
    """Evaluates the event-driven alerts of one batch (see the module docstring)."""

    def __init__(self, rules: AlertRules | None = None) -> None:
        self.rules = rules or AlertRules()

    def apply(self, conn: psycopg.Connection[Any], batch: OpsBatch) -> None:
        self._statuses(conn, batch.statuses)
        self._heard(conn, batch)
        red_boxes: set[tuple[str, int]] = set()
        for event in sorted(batch.events, key=lambda e: (e.box_id, e.seq)):
            self._event(conn, event)
            if isinstance(event.payload, WasteDeposited | WasteCollected):
                red_boxes.add((event.box_id, event.payload.compartment))
        self._refill(conn, batch.events, red_boxes)
        boxes = batch.telemetry_boxes | {b for b, _ in red_boxes}
        if boxes:
            self._measured(conn, sorted(boxes), batch.telemetry_boxes, batch.layouts)
        if batch.acked_commands:
            self._acks(conn, batch.acked_commands)

    # ------------------------------------------------------------------ status and heartbeats

    def _statuses(self, conn: psycopg.Connection[Any], statuses: list[AppliedStatus]) -> None:
        """A box's births clear its offline alert. A reconnect storm is thousands of boxes each with one
        birth in a batch: those go together, in two statements; a box with several statuses in the
        batch (or an offline one) has them applied one at a time, in order."""
        per_box = Counter(s.box_id for s in statuses)
        births: list[AppliedStatus] = []
        for s in statuses:
            if s.online and per_box[s.box_id] == 1:
                births.append(s)
            else:
                self._status(conn, s)
        if not births:
            return
        notify_many(
            conn,
            [
                (LiveEvent.BOX_STATUS, status_data(s.box_id, s.online, s.reason, s.session, s.changed_at))
                for s in births
                if s.was_online is not True
            ],
        )
        with conn.cursor(row_factory=dict_row) as cur:
            cleared = cur.execute(
                f"""UPDATE alerts a SET cleared_at = now(), cleared_by = u.cleared_by, cleared_ts = u.ts,
                           cleared_seq = NULL
                    FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::timestamptz[])
                         AS u(box_id, session, cleared_by, ts)
                    WHERE a.box_id = u.box_id AND a.kind = %s AND a.subject = '' AND a.cleared_at IS NULL
                      AND (a.raised_session IS NULL OR a.raised_session < u.session)
                    RETURNING {", ".join(f"a.{c}" for c in ALERT_COLUMNS.split(", "))}""",
                (
                    [s.box_id for s in births],
                    [s.session for s in births],
                    [f"status {s.reason} session {s.session}" for s in births],
                    [s.ts for s in births],
                    AlertKind.BOX_OFFLINE.value,
                ),
            ).fetchall()
        notify_many(conn, [(LiveEvent.ALERT_CLEARED, alert_data(row)) for row in sorted(cleared, key=itemgetter("id"))])

    def _status(self, conn: psycopg.Connection[Any], s: AppliedStatus) -> None:
        if s.was_online is None or s.was_online != s.online:
            notify(conn, LiveEvent.BOX_STATUS, status_data(s.box_id, s.online, s.reason, s.session, s.changed_at))
        by = f"status {s.reason} session {s.session}"
        if s.online:
            clear_alerts(
                conn,
                box_id=s.box_id,
                kind=AlertKind.BOX_OFFLINE,
                cleared_by=by,
                cleared_ts=s.ts,
                before_session=s.session,
            )
            return
        what = "went offline (connection lost: Last Will)" if s.reason == "connection_lost" else "shut down"
        ts = s.ts
        if ts is None:  # a Last Will carries no time: date it, as the status, by the box's last message
            row = conn.execute(
                "SELECT COALESCE(last_seen_at, status_ts) FROM box_state WHERE box_id = %s", (s.box_id,)
            ).fetchone()
            ts = row[0] if row else None
        raise_alert(
            conn,
            box_id=s.box_id,
            kind=AlertKind.BOX_OFFLINE,
            message=f"box {s.box_id} {what}",
            details={"reason": s.reason, "session": s.session},
            raised_by=by,
            raised_ts=ts,
            raised_session=s.session,
        )

    def _heard(self, conn: psycopg.Connection[Any], batch: OpsBatch) -> None:
        """A box heard from again after the sweep declared it silent: clear that alert."""
        if not batch.heard_boxes:
            return
        rows = conn.execute(
            """SELECT a.box_id, s.status_session, s.status_changed_at, s.status_reason FROM alerts a
               JOIN box_state s ON s.box_id = a.box_id AND s.status_online
               WHERE a.box_id = ANY(%s) AND a.kind = 'box_offline' AND a.cleared_at IS NULL
                 AND a.details->>'reason' = 'heartbeat_timeout'""",
            (sorted(batch.heard_boxes),),
        ).fetchall()
        for box_id, session, changed_at, status_reason in rows:
            cleared = clear_alerts(
                conn,
                box_id=box_id,
                kind=AlertKind.BOX_OFFLINE,
                cleared_by="heard from again",
                reason="heartbeat_timeout",
            )
            if cleared:
                reason = status_reason or "birth"
                notify(conn, LiveEvent.BOX_STATUS, status_data(box_id, True, reason, session, changed_at))

    # ------------------------------------------------------------------ discrete events

    def _event(self, conn: psycopg.Connection[Any], e: BoxEvent) -> None:
        p = e.payload
        ts = _ts(e.ts_ms)
        by = f"event {e.type} seq {e.seq}"
        if isinstance(p, DoorLeftOpen):
            raise_alert(
                conn,
                box_id=e.box_id,
                kind=AlertKind.DOOR_LEFT_OPEN,
                subject=str(p.compartment),
                compartment=p.compartment,
                message=f"door {p.compartment} of box {e.box_id} left open ({p.open_s:.0f} s)",
                details={"open_s": p.open_s},
                raised_by=by,
                raised_ts=ts,
                raised_seq=e.seq,
                unless_newer=(_DOOR[1], p.compartment),
            )
        elif e.type in _CLEARED_BY:  # door.closed, compartment.restored: the compartment's alert ends
            clear_alerts(
                conn,
                box_id=e.box_id,
                kind=_CLEARED_BY[e.type],
                subject=str(getattr(p, "compartment", None)),
                cleared_by=by,
                cleared_ts=ts,
                cleared_seq=e.seq,
            )
        elif isinstance(p, CompartmentFault):
            deliberate = p.fault is FaultKind.OUT_OF_SERVICE
            raise_alert(
                conn,
                box_id=e.box_id,
                kind=AlertKind.COMPARTMENT_FAULT,
                subject=str(p.compartment),
                compartment=p.compartment,
                # Taken out of service on purpose (an operator's command) is not a fault to act on.
                severity=Severity.INFO if deliberate else None,
                message=f"compartment {p.compartment} of box {e.box_id}: {p.fault.value}"
                + (f" ({p.detail})" if p.detail else ""),
                details={"fault": p.fault.value, "detail": p.detail},
                raised_by=by,
                raised_ts=ts,
                raised_seq=e.seq,
                unless_newer=(_FAULT[1], p.compartment),
            )
        elif isinstance(p, ParcelCollected | ParcelExpired):
            clear_alerts(
                conn,
                box_id=e.box_id,
                kind=AlertKind.PARCEL_NEAR_EXPIRY,
                subject=p.parcel_id,
                cleared_by=by,
                cleared_ts=ts,
                cleared_seq=e.seq,
            )

    # ------------------------------------------------------------------ red boxes and temperature

    def _refill(self, conn: psycopg.Connection[Any], events: Iterable[BoxEvent], touched: set[tuple[str, int]]) -> None:
        """Recompute what is in each touched red box from the stored events (idempotent)."""
        if not touched:
            return
        collected: dict[tuple[str, int], tuple[int, int]] = {}
        for e in events:
            if isinstance(e.payload, WasteCollected):
                key = (e.box_id, e.payload.compartment)
                if key not in collected or e.seq > collected[key][0]:
                    collected[key] = (e.seq, e.ts_ms)
        with conn.cursor() as cur:
            for box_id, cid in sorted(touched):
                seq, ts_ms = collected.get((box_id, cid), (0, None))
                cur.execute(
                    """INSERT INTO red_box_fill AS f (box_id, compartment, collected_seq, collected_ts)
                       VALUES (%s, %s, %s, %s)
                       ON CONFLICT (box_id, compartment) DO UPDATE SET
                           collected_seq = greatest(f.collected_seq, excluded.collected_seq),
                           collected_ts = CASE WHEN excluded.collected_seq > f.collected_seq
                                               THEN excluded.collected_ts ELSE f.collected_ts END""",
                    (box_id, cid, seq, _ts(ts_ms)),
                )
                cur.execute(
                    """WITH d AS (
                           SELECT e.fraction, sum(e.weight_kg) AS kg, count(*) AS n, max(e.seq) AS last
                           FROM events e JOIN red_box_fill f ON f.box_id = e.box_id AND f.compartment = e.compartment
                           WHERE f.box_id = %(box)s AND f.compartment = %(c)s AND e.box_id = %(box)s
                             AND e.seq > f.collected_seq AND e.type = 'waste.deposited'
                           GROUP BY e.fraction)
                       UPDATE red_box_fill SET
                           deposited_kg = coalesce((SELECT sum(kg) FROM d), 0),
                           deposits = coalesce((SELECT sum(n) FROM d), 0),
                           fractions = coalesce((SELECT jsonb_object_agg(fraction, round(kg::numeric, 3)) FROM d),
                                                '{}'::jsonb),
                           last_seq = greatest(last_seq, coalesce((SELECT max(last) FROM d), 0)),
                           updated_at = now()
                       WHERE box_id = %(box)s AND compartment = %(c)s""",
                    {"box": box_id, "c": cid},
                )

    def _measured(
        self,
        conn: psycopg.Connection[Any],
        boxes: list[str],
        with_telemetry: set[str],
        layouts: Mapping[str, BoxLayout | None],
    ) -> None:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                """SELECT box_id, temperature_c, telemetry_seq, telemetry_ts, red_boxes FROM box_state
                   WHERE box_id = ANY(%s)""",
                (boxes,),
            )
            states = {r["box_id"]: r for r in cur.fetchall()}
            cur.execute(
                "SELECT box_id, compartment, deposited_kg, collected_seq, last_seq FROM red_box_fill "
                "WHERE box_id = ANY(%s)",
                (boxes,),
            )
            fills: dict[tuple[str, int], Row] = {(r["box_id"], r["compartment"]): r for r in cur.fetchall()}
            cur.execute(
                "SELECT box_id, kind, subject FROM alerts WHERE box_id = ANY(%s) AND cleared_at IS NULL "
                "AND kind IN ('temperature_out_of_range', 'red_box_near_limit', 'red_box_at_limit')",
                (boxes,),
            )
            open_now = {(r["box_id"], r["kind"], r["subject"]) for r in cur.fetchall()}
        for box_id in boxes:
            state = states.get(box_id)
            if state is None:
                continue
            if box_id in with_telemetry:
                self._temperature(conn, state, open_now)
            self._red_boxes(conn, state, fills, layouts.get(box_id), open_now)

    def _temperature(self, conn: psycopg.Connection[Any], state: Row, open_now: set[tuple[str, str, str]]) -> None:
        t = state["temperature_c"]
        if t is None or state["telemetry_seq"] is None:
            return
        r = self.rules
        box_id, seq = state["box_id"], int(state["telemetry_seq"])
        is_open = (box_id, AlertKind.TEMPERATURE_OUT_OF_RANGE.value, "") in open_now
        by = f"telemetry seq {seq}"
        if t > r.temperature_max_c or t < r.temperature_min_c:
            if not is_open:
                hot = t > r.temperature_max_c
                raise_alert(
                    conn,
                    box_id=box_id,
                    kind=AlertKind.TEMPERATURE_OUT_OF_RANGE,
                    message=f"box {box_id} is at {t:.1f} °C, "
                    + (f"above {r.temperature_max_c:g} °C (aerosols)" if hot else f"below {r.temperature_min_c:g} °C"),
                    details={
                        "temperature_c": t,
                        "min_c": r.temperature_min_c,
                        "max_c": r.temperature_max_c,
                        "direction": "high" if hot else "low",
                    },
                    raised_by=by,
                    raised_ts=state["telemetry_ts"],
                    raised_seq=seq,
                )
        elif is_open and (
            r.temperature_min_c + r.temperature_hysteresis_c <= t <= r.temperature_max_c - r.temperature_hysteresis_c
        ):
            clear_alerts(
                conn,
                box_id=box_id,
                kind=AlertKind.TEMPERATURE_OUT_OF_RANGE,
                cleared_by=by,
                cleared_ts=state["telemetry_ts"],
                cleared_seq=seq,
            )

    def _red_boxes(
        self,
        conn: psycopg.Connection[Any],
        state: Row,
        fills: Mapping[tuple[str, int], Row],
        layout: BoxLayout | None,
        open_now: set[tuple[str, str, str]],
    ) -> None:
        box_id = state["box_id"]
        readings = {int(r["compartment"]): float(r["weight_kg"]) for r in (state["red_boxes"] or [])}
        telemetry_seq = int(state["telemetry_seq"] or 0)
        compartments = [c.id for c in layout.red_boxes] if layout is not None else sorted(readings)
        capacity = {c.id: c.red_box_capacity_kg for c in layout.red_boxes} if layout is not None else {}
        for cid in compartments:
            fill = fills.get((box_id, cid))
            collected_seq = int(fill["collected_seq"]) if fill else 0
            deposited = float(fill["deposited_kg"]) if fill else 0.0
            # The scale's reading counts only if taken after the last collection; deposits since the
            # collection count always. The larger of the two: this is a safety limit.
            weight = deposited
            position = max(collected_seq, int(fill["last_seq"]) if fill else 0)
            if cid in readings and telemetry_seq > collected_seq:
                weight = max(weight, readings[cid])
                position = max(position, telemetry_seq)
            cap = capacity.get(cid, 4.0)
            ratio = weight / cap
            details = {"weight_kg": round(weight, 3), "capacity_kg": cap, "fill_ratio": round(ratio, 4)}
            by = f"fill {weight:.2f} kg at seq {position}"
            for kind, limit, words in (
                (AlertKind.RED_BOX_NEAR_LIMIT, self.rules.red_box_near_ratio, "near its limit"),
                (AlertKind.RED_BOX_AT_LIMIT, 1.0, "at its limit"),
            ):
                is_open = (box_id, kind.value, str(cid)) in open_now
                if ratio >= limit and not is_open:
                    raise_alert(
                        conn,
                        box_id=box_id,
                        kind=kind,
                        subject=str(cid),
                        compartment=cid,
                        message=f"red box {cid} of box {box_id} is {words}: {weight:.2f} of {cap:g} kg",
                        details=details,
                        raised_by=by,
                        raised_seq=position,
                    )
                elif ratio < limit and is_open:
                    clear_alerts(
                        conn,
                        box_id=box_id,
                        kind=kind,
                        subject=str(cid),
                        cleared_by=by + (" (collected)" if collected_seq == position else ""),
                        cleared_seq=position,
                    )

    # ------------------------------------------------------------------ command acknowledgements

    def _acks(self, conn: psycopg.Connection[Any], ids: list[UUID]) -> None:
        """Notify ``command.updated``; a succeeded ``set_maintenance`` moves the box's maintenance flag
        (the newest command wins, whatever order the acks come in)."""
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ANY(%s)", (ids,))
            rows = cur.fetchall()
        for row in rows:
            notify(conn, LiveEvent.COMMAND_UPDATED, command_data(row))
            if row["action"] == "set_maintenance" and row["status"] == "succeeded" and row["enabled"] is not None:
                conn.execute(
                    """UPDATE box_state SET maintenance = %(on)s, maintenance_command_at = %(at)s,
                           maintenance_since = CASE WHEN maintenance IS DISTINCT FROM %(on)s THEN now()
                                                    ELSE maintenance_since END
                       WHERE box_id = %(box)s
                         AND (maintenance_command_at IS NULL OR maintenance_command_at < %(at)s)""",
                    {"on": row["enabled"], "at": row["created_at"], "box": row["box_id"]},
                )


COMMAND_COLUMNS = (
    "command_id, box_id, action, compartment, enabled, status, detail, requested_by, created_at, sent_at, "
    "acked_at, ack_ts, expires_at"
)


def command_data(row: Row) -> dict[str, Any]:
    """A command row as the API and the live stream show it."""
    return {name: row[name] for name in COMMAND_COLUMNS.split(", ")}
