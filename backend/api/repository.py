"""All SQL the API runs. Async psycopg on a connection from the pool."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from backend.operations.alerts import ALERT_COLUMNS, COMMAND_COLUMNS, alert_data
from backend.operations.live import CHANNEL, LiveEvent
from backend.operations.live import encode as encode_live

Row = dict[str, Any]

# The layout comes as JSON text (``layout``), not decoded: most boxes share a layout, and
# backend/api/service.py parses each distinct text once (at 5,000 boxes, decoding and validating
# every layout was most of the box list's time).
_BOX_COLUMNS = """
    SELECT coalesce(b.box_id, s.box_id) AS box_id, b.name, b.latitude, b.longitude, b.layout::text AS layout,
           b.firmware, s.status_online, s.status_session, s.status_ts, s.status_changed_at, s.status_reason,
           s.last_seq, s.last_seen_at, s.last_received_at,
           s.telemetry_ts, s.telemetry_seq, s.power, s.battery_pct, s.temperature_c, s.compartments, s.red_boxes,
           coalesce(s.maintenance, false) AS maintenance, s.maintenance_since
"""


async def list_boxes(conn: AsyncConnection[Any], *, after: str | None = None, limit: int | None = None) -> list[Row]:
    """Every box registered or heard from, by id; with ``after``, only ids after it, and at most
    ``limit`` of them (keyset pages). The ids are chosen and sorted first and the wide rows joined in
    that order (sorting 5,000 wide rows spilled to disk)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            _BOX_COLUMNS
            + """
            FROM (SELECT box_id FROM boxes WHERE %(after)s::text IS NULL OR box_id > %(after)s
                  UNION
                  SELECT box_id FROM box_state WHERE %(after)s::text IS NULL OR box_id > %(after)s
                  ORDER BY 1 LIMIT %(limit)s) k
            LEFT JOIN boxes b ON b.box_id = k.box_id
            LEFT JOIN box_state s ON s.box_id = k.box_id
            ORDER BY k.box_id
            """,
            {"after": after, "limit": limit},
        )
        return await cur.fetchall()


#: The columns :func:`box_statuses` returns, in order.
STATUS_COLUMNS = (
    "box_id",
    "status_online",
    "status_session",
    "status_ts",
    "status_changed_at",
    "status_reason",
    "last_seq",
    "last_seen_at",
    "last_received_at",
    "maintenance",
    "severities",
)


async def box_statuses(conn: AsyncConnection[Any], *, online_stored: bool | None = None) -> list[tuple[Any, ...]]:
    """Every box's status columns (:data:`STATUS_COLUMNS`, as tuples: thousands of rows) and its open
    alerts' severities, by id: the narrow columns only (no layout, no compartment readings), the
    alerts aggregated in the same query. ``online_stored`` keeps only boxes whose stored status is
    (or is not) online."""
    async with conn.cursor() as cur:
        await cur.execute(
            """
            SELECT k.box_id, s.status_online, s.status_session, s.status_ts, s.status_changed_at, s.status_reason,
                   s.last_seq, s.last_seen_at, s.last_received_at, coalesce(s.maintenance, false) AS maintenance,
                   coalesce(a.severities, '{}') AS severities
            FROM (SELECT box_id FROM boxes UNION SELECT box_id FROM box_state ORDER BY 1) k
            LEFT JOIN box_state s ON s.box_id = k.box_id
            LEFT JOIN (SELECT box_id, array_agg(severity) AS severities FROM alerts
                       WHERE cleared_at IS NULL GROUP BY box_id) a ON a.box_id = k.box_id
            WHERE %(online)s::boolean IS NULL OR coalesce(s.status_online, false) = %(online)s::boolean
            ORDER BY k.box_id
            """,
            {"online": online_stored},
        )
        return await cur.fetchall()


async def get_box(conn: AsyncConnection[Any], box_id: str) -> Row | None:
    """One box by id (both tables by their primary keys), or None."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            _BOX_COLUMNS
            + """
            FROM (SELECT %s::text AS box_id) k
            LEFT JOIN boxes b ON b.box_id = k.box_id
            LEFT JOIN box_state s ON s.box_id = k.box_id
            WHERE b.box_id IS NOT NULL OR s.box_id IS NOT NULL
            """,
            (box_id,),
        )
        return await cur.fetchone()


async def box_events(
    conn: AsyncConnection[Any],
    box_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    types: list[str] | None,
    after: tuple[datetime, int] | None,
    limit: int,
    descending: bool,
) -> list[Row]:
    """Events of one box in ``[since, until)``, keyset-paginated on ``(ts, seq)``."""
    where = ["box_id = %(box)s"]
    params: dict[str, Any] = {"box": box_id, "limit": limit}
    if since is not None:
        where.append("ts >= %(since)s")
        params["since"] = since
    if until is not None:
        where.append("ts < %(until)s")
        params["until"] = until
    if types:
        where.append("type = ANY(%(types)s)")
        params["types"] = types
    if after is not None:
        where.append("(ts, seq) < (%(a_ts)s, %(a_seq)s)" if descending else "(ts, seq) > (%(a_ts)s, %(a_seq)s)")
        params["a_ts"], params["a_seq"] = after
    order = "DESC" if descending else "ASC"
    query = (
        f"SELECT box_id, seq, session, ts, received_at, type, payload FROM events "
        f"WHERE {' AND '.join(where)} ORDER BY ts {order}, seq {order} LIMIT %(limit)s"
    )
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)  # query composed only from constants above
        return await cur.fetchall()


async def schema_state(conn: AsyncConnection[Any]) -> tuple[int, str] | None:
    async with conn.cursor() as cur:
        await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            return None
        await cur.execute("SELECT max(version), min(flavour) FROM schema_migrations")
        result = await cur.fetchone()
        if result is None or result[0] is None:
            return None
        return int(result[0]), str(result[1])


async def metrics_snapshot(conn: AsyncConnection[Any]) -> dict[str, list[Row]]:
    """What /metrics reports: per-worker ingest counters, dead letters by code, box counts."""
    out: dict[str, list[Row]] = {}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM ingest_workers ORDER BY worker_id")
        out["workers"] = await cur.fetchall()
        await cur.execute("SELECT error_code, count(*) AS n FROM dead_letters GROUP BY 1 ORDER BY 1")
        out["dead_letters"] = await cur.fetchall()
        await cur.execute("SELECT box_id, status_online, last_received_at FROM box_state ORDER BY box_id")
        out["boxes"] = await cur.fetchall()
    return out


# --------------------------------------------------------------------------- operations (issue 5)


#: The first and last box id of a page of the box list (both included).
Span = tuple[str, str]


async def red_box_fills(
    conn: AsyncConnection[Any], box_id: str | None = None, *, span: Span | None = None
) -> dict[tuple[str, int], Row]:
    """What each red box holds since its last collection, by (box, compartment): of one box, of the
    boxes whose ids are within ``span``, or of all."""
    lo, hi = span or (None, None)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT box_id, compartment, deposited_kg, deposits, fractions, collected_ts FROM red_box_fill "
            "WHERE (%(box)s::text IS NULL OR box_id = %(box)s)"
            " AND (%(lo)s::text IS NULL OR box_id BETWEEN %(lo)s AND %(hi)s)",
            {"box": box_id, "lo": lo, "hi": hi},
        )
        return {(r["box_id"], int(r["compartment"])): r for r in await cur.fetchall()}


async def open_alerts_by_box(
    conn: AsyncConnection[Any], *, span: Span | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Kind and severity of every box's open alerts (one entry per alert); only of the boxes whose
    ids are within ``span`` if given."""
    lo, hi = span or (None, None)
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT box_id, kind, severity FROM alerts WHERE cleared_at IS NULL"
            " AND (%(lo)s::text IS NULL OR box_id BETWEEN %(lo)s AND %(hi)s) ORDER BY box_id, raised_at",
            {"lo": lo, "hi": hi},
        )
        out: dict[str, list[tuple[str, str]]] = {}
        for box_id, kind, severity in await cur.fetchall():
            out.setdefault(box_id, []).append((kind, severity))
        return out


async def list_alerts(
    conn: AsyncConnection[Any],
    *,
    box_id: str | None = None,
    kinds: list[str] | None = None,
    state: str = "all",
    acknowledged: bool | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[Row]:
    """Alerts newest first (by id), filtered; keyset-paginated with ``before``."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if box_id is not None:
        where.append("box_id = %(box)s")
        params["box"] = box_id
    if kinds:
        where.append("kind = ANY(%(kinds)s)")
        params["kinds"] = kinds
    if state == "open":
        where.append("cleared_at IS NULL")
    elif state == "cleared":
        where.append("cleared_at IS NOT NULL")
    if acknowledged is not None:
        where.append("acknowledged_at IS NOT NULL" if acknowledged else "acknowledged_at IS NULL")
    if before is not None:
        where.append("id < %(before)s")
        params["before"] = before
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {ALERT_COLUMNS} FROM alerts WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %(limit)s",
            params,  # the query is composed only from the constants above
        )
        return await cur.fetchall()


async def get_alert(conn: AsyncConnection[Any], alert_id: int) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {ALERT_COLUMNS} FROM alerts WHERE id = %s", (alert_id,))
        return await cur.fetchone()


async def acknowledge_alert(conn: AsyncConnection[Any], alert_id: int, by: str) -> Row | None:
    """Acknowledge an unacknowledged alert (and notify ``alert.acknowledged``); None if there is no
    such unacknowledged alert."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE alerts SET acknowledged_at = now(), acknowledged_by = %s
                WHERE id = %s AND acknowledged_at IS NULL RETURNING {ALERT_COLUMNS}""",
            (by, alert_id),
        )
        row = await cur.fetchone()
        if row is not None:
            await cur.execute(
                "SELECT pg_notify(%s, %s)", (CHANNEL, encode_live(LiveEvent.ALERT_ACKNOWLEDGED, alert_data(row)))
            )
        return row


async def expire_commands(conn: AsyncConnection[Any], box_id: str | None = None) -> None:
    """Mark this box's unanswered commands past their expiry ``timed_out`` now, so a read is exact
    even between two monitor sweeps (the sweep does the same for all boxes)."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE commands SET status = 'timed_out',
                       detail = 'no acknowledgement from the box by ' || to_char(expires_at AT TIME ZONE 'UTC',
                                                                             'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                WHERE status IN ('pending', 'sent') AND expires_at < now()
                  AND (%(box)s::text IS NULL OR box_id = %(box)s)
                RETURNING {COMMAND_COLUMNS}""",
            {"box": box_id},
        )
        for row in await cur.fetchall():
            await cur.execute(
                "SELECT pg_notify(%s, %s)",
                (CHANNEL, encode_live(LiveEvent.COMMAND_UPDATED, {k: row[k] for k in COMMAND_COLUMNS.split(", ")})),
            )


async def list_commands(conn: AsyncConnection[Any], box_id: str, limit: int) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE box_id = %s ORDER BY created_at DESC LIMIT %s",
            (box_id, limit),
        )
        return await cur.fetchall()


async def box_history(
    conn: AsyncConnection[Any], box_id: str, *, since: datetime, until: datetime, bucket: timedelta
) -> list[Row]:
    """A box's telemetry in ``bucket``-wide buckets from ``since`` (date_bin: the same query on the
    plain partitions and on the TimescaleDB hypertable, where it reads only the range's chunks)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """SELECT date_bin(%(bucket)s, ts, %(since)s) AS start, count(*) AS readings,
                      avg(occupied)::float8 AS occupied_mean, max(occupied)::int AS occupied_max,
                      max(red.kg)::float8 AS red_box_max_kg,
                      avg(temperature_c)::float8 AS temperature_mean_c, min(temperature_c)::float8 AS temperature_min_c,
                      max(temperature_c)::float8 AS temperature_max_c
               FROM telemetry t
               LEFT JOIN LATERAL (SELECT max((r->>'weight_kg')::float8) AS kg
                                  FROM jsonb_array_elements(t.red_boxes) r) red ON true
               WHERE box_id = %(box)s AND ts >= %(since)s AND ts < %(until)s
               GROUP BY 1 ORDER BY 1""",
            {"box": box_id, "since": since, "until": until, "bucket": bucket},
        )
        return await cur.fetchall()
