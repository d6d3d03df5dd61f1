"""The monitor sweep: the alerts and outcomes that come from time passing rather than from a message.

Where it sits in a message's journey: beside ingest. Every ingest worker runs :func:`sweep` between
batches, every ``MOLO_MONITOR_INTERVAL_S`` (default 5 s); a transaction-level advisory lock lets one
worker at a time do it, so several workers do not race and no extra process is needed. It does:

- **missed heartbeats**: a box whose newest status says online but from which nothing has been
  received for ``heartbeat_timeout_s`` (wall clock) gets a ``box_offline`` alert with reason
  ``heartbeat_timeout`` and a ``box.status`` offline notification. Anything heard from the box again
  clears it (ingest, :mod:`backend.operations.alerts`); so does a birth of a newer session.
- **parcels near expiry**: a ``parcel.deposited`` with no later ``parcel.collected`` /
  ``parcel.expired`` in its compartment, older than ``pickup_window_h - expiry_margin_h`` by the
  *box's* clock (its newest device timestamp, ``box_state.last_seen_at``): in live simulation device
  time is simulated time, and the pickup window is a device-time rule. Cleared by ingest when the
  parcel is collected or expires.
- **command timeouts**: a command still ``pending``/``sent`` after its ``expires_at`` becomes
  ``timed_out`` (``command.updated``). A late acknowledgement still records what the box did.

Each box is row-locked (``SKIP LOCKED``) before an alert is raised for it, so a sweep never raises
against a batch that ingest is committing for the same box; that box is looked at next sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.operations.alerts import (
    COMMAND_COLUMNS,
    AlertKind,
    AlertRules,
    command_data,
    raise_alert,
)
from backend.operations.live import LiveEvent, notify, status_data

log = logging.getLogger(__name__)
_LOCK_KEY = 0x6D6F6C6F  # "molo": one sweeper at a time


@dataclass
class SweepResult:
    ran: bool = False
    offline: int = 0
    near_expiry: int = 0
    timed_out: int = 0


def _locked(conn: psycopg.Connection[Any], box_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM box_state WHERE box_id = %s FOR UPDATE SKIP LOCKED", (box_id,)).fetchone()
    return row is not None


def sweep(conn: psycopg.Connection[Any], rules: AlertRules) -> SweepResult:
    """One sweep in one transaction (``conn`` in autocommit mode outside it)."""
    result = SweepResult()
    with conn.transaction():
        got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,)).fetchone()
        if not got or not got[0]:
            return result
        result.ran = True
        result.offline = _heartbeats(conn, rules)
        result.near_expiry = _near_expiry(conn, rules)
        result.timed_out = expire_commands(conn)
    return result


def _heartbeats(conn: psycopg.Connection[Any], rules: AlertRules) -> int:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT s.box_id, s.status_session, s.last_received_at,
                      COALESCE(s.last_seen_at, s.status_ts) AS last_seen_at,
                      s.last_received_at + make_interval(secs => %(t)s) AS since
               FROM box_state s
               WHERE s.status_online AND s.last_received_at < now() - make_interval(secs => %(t)s)
                 AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.box_id = s.box_id AND a.kind = 'box_offline'
                                 AND a.cleared_at IS NULL)""",
            {"t": rules.heartbeat_timeout_s},
        )
        candidates = cur.fetchall()
    raised = 0
    for c in candidates:
        if not _locked(conn, c["box_id"]):
            continue
        # Re-check under the lock: a batch may have committed since the candidates were read.
        still = conn.execute(
            "SELECT 1 FROM box_state WHERE box_id = %s AND status_online "
            "AND last_received_at < now() - make_interval(secs => %s)",
            (c["box_id"], rules.heartbeat_timeout_s),
        ).fetchone()
        if still is None:
            continue
        row = raise_alert(
            conn,
            box_id=c["box_id"],
            kind=AlertKind.BOX_OFFLINE,
            message=f"box {c['box_id']} silent for over {rules.heartbeat_timeout_s:g} s (missed heartbeats)",
            details={"reason": "heartbeat_timeout", "last_received_at": c["last_received_at"].isoformat()},
            raised_by=f"sweep: nothing received since {c['last_received_at'].isoformat()}",
            raised_ts=c["last_seen_at"],  # by the box's clock: when it was last heard
            raised_session=c["status_session"],
        )
        if row is not None:
            raised += 1
            notify(
                conn,
                LiveEvent.BOX_STATUS,
                status_data(c["box_id"], False, "heartbeat_timeout", c["status_session"], c["since"]),
            )
    return raised


def _near_expiry(conn: psycopg.Connection[Any], rules: AlertRules) -> int:
    age_s = max(0.0, rules.pickup_window_h - rules.expiry_margin_h) * 3600
    lookback_s = 2 * rules.pickup_window_h * 3600
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT d.box_id, d.parcel_id, d.compartment, d.carrier, d.ts, d.seq, s.last_seen_at
               FROM box_state s
               JOIN events d ON d.box_id = s.box_id AND d.type = 'parcel.deposited'
                    AND d.ts > s.last_seen_at - make_interval(secs => %(lookback)s)
                    AND d.ts <= s.last_seen_at - make_interval(secs => %(age)s)
               WHERE s.last_seen_at IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM events x WHERE x.box_id = d.box_id AND x.seq > d.seq
                                 AND x.compartment = d.compartment
                                 AND x.type IN ('parcel.collected', 'parcel.expired'))
                 AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.box_id = d.box_id AND a.kind = 'parcel_near_expiry'
                                 AND a.subject = d.parcel_id AND a.raised_seq >= d.seq)
               ORDER BY d.box_id, d.seq""",
            {"age": age_s, "lookback": lookback_s},
        )
        candidates = cur.fetchall()
    raised = 0
    for c in candidates:
        if not _locked(conn, c["box_id"]):
            continue
        waited_h = (c["last_seen_at"] - c["ts"]).total_seconds() / 3600
        left_h = rules.pickup_window_h - waited_h
        row = raise_alert(
            conn,
            box_id=c["box_id"],
            kind=AlertKind.PARCEL_NEAR_EXPIRY,
            subject=c["parcel_id"],
            compartment=c["compartment"],
            message=f"parcel {c['parcel_id']} in compartment {c['compartment']} of box {c['box_id']} "
            f"expires in {max(left_h, 0):.1f} h",
            details={
                "parcel_id": c["parcel_id"],
                "carrier": c["carrier"],
                "deposited_ts": c["ts"].isoformat(),
                "expires_ts_estimate_h": round(left_h, 2),
            },
            raised_by=f"sweep: deposited (seq {c['seq']}) {waited_h:.1f} h ago by the box's clock",
            raised_ts=c["ts"],
            raised_seq=c["seq"],
            unless_newer=(("parcel.collected", "parcel.expired"), c["compartment"]),
        )
        raised += row is not None
    return raised


def expire_commands(conn: psycopg.Connection[Any], box_id: str | None = None) -> int:
    """Mark commands with no acknowledgement by their ``expires_at`` ``timed_out``; how many."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE commands SET status = 'timed_out',
                       detail = 'no acknowledgement from the box by ' || to_char(expires_at AT TIME ZONE 'UTC',
                                                                             'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                WHERE status IN ('pending', 'sent') AND expires_at < now()
                  AND (%(box)s::text IS NULL OR box_id = %(box)s)
                RETURNING {COMMAND_COLUMNS}""",
            {"box": box_id},
        )
        rows = cur.fetchall()
    for row in rows:
        notify(conn, LiveEvent.COMMAND_UPDATED, command_data(row))
    return len(rows)
