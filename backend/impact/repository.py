"""All SQL of the KPIs: the daily activity counts the method reads, and where the boxes stand.

Where it sits: the backend's end of a message's journey. ``activity_daily`` is a rollup table kept
by a trigger on ``events`` in the inserting transaction, on both flavours (migration 0004 on plain
PostgreSQL; 0008 replaced TimescaleDB's continuous aggregate with it), so its counts are exact at
once, late events included; this query pivots it into one row per (day, box, carrier), the columns
of ``accounting.BoxDay``.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from psycopg import AsyncConnection

from accounting import BoxDay

_ACTIVITY = """
    SELECT (bucket AT TIME ZONE 'UTC')::date AS day, box_id, carrier,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.deposited' AND size_class = 'A'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.deposited' AND size_class = 'B'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.deposited'
                                          AND size_class IS DISTINCT FROM 'A'
                                          AND size_class IS DISTINCT FROM 'B'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.collected'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.expired'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.dropped_off'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'parcel.picked_up'), 0)::bigint,
           coalesce(sum(events) FILTER (WHERE type = 'waste.deposited'), 0)::bigint,
           coalesce(sum(weight_kg) FILTER (WHERE type = 'waste.deposited'), 0)::double precision,
           coalesce(sum(events) FILTER (WHERE type = 'waste.collected'), 0)::bigint,
           coalesce(sum(weight_kg) FILTER (WHERE type = 'waste.collected'), 0)::double precision
    FROM activity_daily
    WHERE {where}
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3 NULLS FIRST
"""
_RANGE = """bucket >= (%(since)s::date)::timestamp AT TIME ZONE 'UTC'
            AND bucket < (%(until)s::date)::timestamp AT TIME ZONE 'UTC'"""
_DAYS = "bucket = ANY(ARRAY(SELECT d::timestamp AT TIME ZONE 'UTC' FROM unnest(%(days)s::date[]) AS d))"
_BOXES = " AND box_id = ANY(%(boxes)s)"


async def activity(conn: AsyncConnection[Any], since: date, until: date) -> list[BoxDay]:
    """The counted events of every box on UTC days ``[since, until)`` (a box's share of a shared
    round depends on the other boxes of the round, so the method always sees them all)."""
    query = _ACTIVITY.format(where=_RANGE)
    async with conn.cursor() as cur:
        await cur.execute(query, {"since": since, "until": until})
        rows = await cur.fetchall()
    return [BoxDay(*r) for r in rows]


async def activity_of_days(conn: AsyncConnection[Any], days: list[date]) -> list[BoxDay]:
    """The counted events of every box on the UTC ``days`` listed."""
    query = _ACTIVITY.format(where=_DAYS)
    async with conn.cursor() as cur:
        await cur.execute(query, {"days": days})
        rows = await cur.fetchall()
    return [BoxDay(*r) for r in rows]


async def day_fingerprints(
    conn: AsyncConnection[Any], since: date, until: date, boxes: list[str] | None
) -> dict[date, tuple[int, int, float]]:
    """Per UTC day in ``[since, until)`` with counted events: (rows, events, kg). Counts only ever
    grow (events are never deleted), so a day whose fingerprint is unchanged has unchanged counts."""
    query = f"""SELECT (bucket AT TIME ZONE 'UTC')::date, count(*), sum(events)::bigint, sum(weight_kg)
                FROM activity_daily WHERE {_RANGE}{_BOXES if boxes else ""} GROUP BY 1 ORDER BY 1"""
    async with conn.cursor() as cur:
        await cur.execute(query, {"since": since, "until": until, "boxes": boxes})
        return {d: (int(n), int(e), float(kg)) for d, n, e, kg in await cur.fetchall()}


async def activity_span(conn: AsyncConnection[Any], boxes: list[str] | None = None) -> tuple[date, date] | None:
    """The first and last UTC day with counted events (of ``boxes``, if given), or None if none."""
    where = "WHERE box_id = ANY(%(boxes)s)" if boxes else ""
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT (min(bucket) AT TIME ZONE 'UTC')::date, (max(bucket) AT TIME ZONE 'UTC')::date"
            f" FROM activity_daily {where}",
            {"boxes": boxes},
        )
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    return row[0], row[1]


async def box_positions_fingerprint(conn: AsyncConnection[Any]) -> str:
    """A digest of the registered box positions, computed in the database (a few ms at 5,000 boxes;
    fetching them all and hashing them in Python was most of a KPI request's time)."""
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT count(*) || ':' || coalesce(md5(string_agg("
            "box_id || '@' || latitude::text || ',' || longitude::text, ';' ORDER BY box_id)), '') FROM boxes"
            " WHERE latitude IS NOT NULL AND longitude IS NOT NULL"
        )
        row = await cur.fetchone()
    return str(row[0]) if row else ""


async def box_positions(conn: AsyncConnection[Any]) -> dict[str, tuple[float, float]]:
    """Registered box positions (``molo`` registers them from the network file)."""
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT box_id, latitude, longitude FROM boxes WHERE latitude IS NOT NULL AND longitude IS NOT NULL"
        )
        return {box: (lat, lon) for box, lat, lon in await cur.fetchall()}
