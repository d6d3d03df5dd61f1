"""All SQL the API runs. Async psycopg on a connection from the pool."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

Row = dict[str, Any]

_BOX_SELECT = """
    SELECT coalesce(b.box_id, s.box_id) AS box_id, b.name, b.latitude, b.longitude, b.layout, b.firmware,
           s.status_online, s.status_session, s.status_changed_at, s.status_reason,
           s.last_seq, s.last_seen_at, s.last_received_at,
           s.telemetry_ts, s.telemetry_seq, s.power, s.battery_pct, s.temperature_c, s.compartments, s.red_boxes
    FROM boxes b FULL OUTER JOIN box_state s ON s.box_id = b.box_id
"""


async def list_boxes(conn: AsyncConnection[Any]) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_BOX_SELECT + " ORDER BY 1")
        return await cur.fetchall()


async def get_box(conn: AsyncConnection[Any], box_id: str) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_BOX_SELECT + " WHERE coalesce(b.box_id, s.box_id) = %s", (box_id,))
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
