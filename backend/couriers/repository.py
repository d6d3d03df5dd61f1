"""All SQL of the courier side: the free-capacity search, holds (reservations) and red-box pickups.

Async psycopg on a connection from the API's pool (autocommit; transactions are explicit).
"""

from __future__ import annotations

import weakref
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.rows import dict_row

Row = dict[str, Any]

# Great-circle distance from the point (%(lat)s, %(lon)s), metres (haversine, mean Earth radius).
_DISTANCE = """
    2 * 6371008.8 * asin(least(1.0, sqrt(
        power(sin(radians(b.latitude - %(lat)s) / 2), 2)
        + cos(radians(%(lat)s)) * cos(radians(b.latitude)) * power(sin(radians(b.longitude - %(lon)s) / 2), 2))))
"""

# A box is offered only when it is online by the API's rule (newest status online and heard from
# within the heartbeat timeout; backend/api/service.py) and not in maintenance.
_AVAILABLE = """
    s.status_online AND s.last_received_at > now() - make_interval(secs => %(timeout)s) AND NOT s.maintenance
"""

# Free parcel compartments per size class of one box (alias c: layout, readings, box_id): in
# service, not occupied by the latest reading, and not held by an unexpired active reservation.
_FREE_BY_SIZE = """
    SELECT d.size_class, count(*)::int AS n
    FROM jsonb_to_recordset(c.layout -> 'compartments') AS d(id int, kind text, size_class text)
    LEFT JOIN jsonb_to_recordset(coalesce(c.readings, '[]'::jsonb)) AS r(id int, occupied boolean, in_service boolean)
           ON r.id = d.id
    WHERE d.kind = 'parcel' AND coalesce(r.in_service, true) AND NOT coalesce(r.occupied, false)
      AND NOT EXISTS (SELECT 1 FROM reservations h
                      WHERE h.box_id = c.box_id AND h.compartment = d.id
                        AND h.status = 'active' AND h.expires_at > now())
    GROUP BY d.size_class
"""

# Candidates (box id and distance only, from the latitude/longitude index) are ordered by distance
# first; each one's state and free count (the costly part: layout and readings unpacked from jsonb)
# is then evaluated in that order through nested loops, so the LIMIT stops after the nearest boxes
# that fit and far boxes inside the radius are never unpacked.
_CAPACITY = f"""
    WITH near AS MATERIALIZED (
        SELECT b.box_id, {_DISTANCE} AS distance_m
        FROM boxes b
        WHERE b.latitude BETWEEN %(lat_min)s AND %(lat_max)s
          AND b.longitude BETWEEN %(lon_min)s AND %(lon_max)s
    )
    SELECT b.box_id, b.name, b.latitude, b.longitude, n.distance_m, f.free_by_size, f.fitting
    FROM (SELECT * FROM near WHERE distance_m <= %(radius)s ORDER BY distance_m, box_id) n
    JOIN LATERAL (SELECT * FROM boxes WHERE boxes.box_id = n.box_id) b ON b.layout IS NOT NULL
    JOIN LATERAL (SELECT * FROM box_state WHERE box_state.box_id = n.box_id) s ON {_AVAILABLE}
    CROSS JOIN LATERAL (SELECT b.box_id, b.layout, s.compartments AS readings) c
    CROSS JOIN LATERAL (
        SELECT coalesce(jsonb_object_agg(per.size_class, per.n), '{{}}'::jsonb) AS free_by_size,
               coalesce(sum(per.n) FILTER (WHERE per.size_class = ANY(%(sizes)s)), 0)::int AS fitting
        FROM ({_FREE_BY_SIZE}) per
    ) f
    WHERE f.fitting > 0
    ORDER BY n.distance_m, n.box_id
    LIMIT %(limit)s
"""


async def free_capacity_near(
    conn: AsyncConnection[Any],
    *,
    lat: float,
    lon: float,
    radius_m: float,
    bbox: tuple[float, float, float, float],
    sizes: list[str],
    timeout_s: float,
    limit: int,
) -> list[Row]:
    """Available boxes within ``radius_m`` of the point with at least one free compartment of a
    size in ``sizes``, nearest first: free counts per size class and the fitting total."""
    params = {
        "lat": round(lat, 7),  # 1 cm; also keeps subnormal floats out of the trigonometry (PostgreSQL
        "lon": round(lon, 7),  # raises "value out of range: underflow" on them: found by tests/test_api_fuzz.py)
        "radius": radius_m,
        "lat_min": bbox[0],
        "lat_max": bbox[1],
        "lon_min": bbox[2],
        "lon_max": bbox[3],
        "sizes": sizes,
        "timeout": timeout_s,
        "limit": limit,
    }
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_CAPACITY, params)
        return await cur.fetchall()


async def lock_box(conn: AsyncConnection[Any], box_id: str) -> None:
    """Serialise holds on one box until the transaction ends (a transaction-level advisory lock:
    ingest's updates of the box's state are not blocked)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('molo.reservations'), hashtext(%s))", (box_id,))


#: Connections that took a session-level advisory lock since they left the pool: the API's pool
#: drops any such lock left over (a cancelled request) when one of these returns, and only then, so
#: other requests cost no extra query (backend/api/app.py).
SESSION_LOCKED: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()


async def lock_box_session(conn: AsyncConnection[Any], box_id: str) -> None:
    """The same lock as :func:`lock_box`, held across autocommit statements until
    :func:`unlock_box_session` (the API's pool also drops any left over when a connection returns)."""
    SESSION_LOCKED.add(conn)
    await conn.execute("SELECT pg_advisory_lock(hashtext('molo.reservations'), hashtext(%s))", (box_id,))


async def unlock_box_session(conn: AsyncConnection[Any], box_id: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock(hashtext('molo.reservations'), hashtext(%s))", (box_id,))


async def try_sweep_lock(conn: AsyncConnection[Any], key: int) -> bool:
    """Take the sweep's transaction-level advisory lock if it is free (one sweep at a time)."""
    cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def try_session_lock(conn: AsyncConnection[Any], key: int) -> bool:
    """Take a session-level advisory lock if it is free; give it back with :func:`unlock_session`."""
    SESSION_LOCKED.add(conn)
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def unlock_session(conn: AsyncConnection[Any], key: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


async def box_for_hold(conn: AsyncConnection[Any], box_id: str) -> Row | None:
    """The box's layout, latest readings and availability inputs (None if no such box)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """SELECT b.box_id, b.layout, s.compartments AS readings, s.status_online, s.status_session,
                      s.status_reason, s.status_changed_at, s.last_received_at,
                      coalesce(s.maintenance, false) AS maintenance
               FROM boxes b LEFT JOIN box_state s ON s.box_id = b.box_id WHERE b.box_id = %s""",
            (box_id,),
        )
        return await cur.fetchone()


async def held_compartments(conn: AsyncConnection[Any], box_id: str) -> set[int]:
    """Doors with an ``active`` hold: what the partial unique index sees. Call it under the box's
    lock after :func:`end_expired` for the box, so an overdue hold is ended rather than counted."""
    async with conn.cursor() as cur:
        await cur.execute("SELECT compartment FROM reservations WHERE box_id = %s AND status = 'active'", (box_id,))
        return {int(r[0]) for r in await cur.fetchall()}


_RESERVATION_COLUMNS = """r.reservation_id, r.box_id, r.compartment, r.size_class, r.carrier, r.parcel_id,
    r.height_mm, r.width_mm, r.depth_mm,
    CASE WHEN r.status = 'active' AND r.expires_at <= now() THEN 'expired' ELSE r.status END AS status,
    r.created_by, r.created_at, r.expires_at, r.ended_at, r.command_id, r.release_command_id,
    c.status AS command_status, rc.status AS release_command_status"""
_RESERVATION_FROM = """reservations r
    LEFT JOIN commands c ON c.command_id = r.command_id
    LEFT JOIN commands rc ON rc.command_id = r.release_command_id"""


async def end_expired(conn: AsyncConnection[Any], box_id: str | None = None) -> list[Row]:
    """Mark overdue active holds ``expired`` (of one box, or all); returns the rows ended now. Rows
    are locked in reservation-id order, so a box's hold transaction and the sweep never lock the same
    rows in opposite orders."""
    where = "status = 'active' AND expires_at <= now()" + (" AND box_id = %(box)s" if box_id else "")
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""WITH due AS (SELECT reservation_id FROM reservations WHERE {where}
                             ORDER BY reservation_id FOR UPDATE)
                UPDATE reservations r SET status = 'expired', ended_at = r.expires_at FROM due
                WHERE r.reservation_id = due.reservation_id AND r.status = 'active'
                RETURNING r.reservation_id, r.box_id, r.compartment""",
            {"box": box_id},
        )
        return await cur.fetchall()


# A newer hold was taken on the ended hold r's door: r's release would free the door the newer one has.
_SUPERSEDED = """EXISTS (SELECT 1 FROM reservations n
                         WHERE n.box_id = r.box_id AND n.compartment = r.compartment
                           AND n.reservation_id <> r.reservation_id
                           AND (n.status = 'active' OR n.created_at > r.created_at))"""


async def releases_due(conn: AsyncConnection[Any], *, max_attempts: int, limit: int) -> list[Row]:
    """Ended holds (expired or cancelled, in the last day) whose release_compartment command is
    missing, failed or timed out, with attempts left, their retry time reached and no newer hold on
    the door; oldest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""SELECT r.reservation_id, r.box_id, r.compartment, r.status, r.release_attempts
               FROM reservations r LEFT JOIN commands rc ON rc.command_id = r.release_command_id
               WHERE r.status IN ('expired', 'cancelled')
                 AND (r.release_command_id IS NULL OR rc.status IN ('failed', 'timed_out'))
                 AND r.release_attempts < %(max)s AND r.ended_at > now() - interval '1 day'
                 AND (r.release_retry_at IS NULL OR r.release_retry_at <= now())
                 AND NOT {_SUPERSEDED}
               ORDER BY r.ended_at, r.reservation_id
               LIMIT %(limit)s""",
            {"max": max_attempts, "limit": limit},
        )
        return await cur.fetchall()


async def superseded(conn: AsyncConnection[Any], reservation_id: UUID) -> bool:
    """Whether a newer hold was taken on this ended hold's door (its release would free that one)."""
    cur = await conn.execute(f"SELECT {_SUPERSEDED} FROM reservations r WHERE r.reservation_id = %s", (reservation_id,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def claim_release(conn: AsyncConnection[Any], reservation_id: UUID, attempts: int, retry_s: float) -> bool:
    """Count one more release attempt and set the next retry time (``retry_s * 2**attempts`` from
    now), unless another sweeper claimed it first or a newer hold was taken on the door since (its
    release would free the door the newer hold has); True if this caller should send it."""
    cur = await conn.execute(
        f"""UPDATE reservations r SET release_attempts = r.release_attempts + 1,
                   release_retry_at = now() + make_interval(secs => %(retry)s * power(2, r.release_attempts))
            WHERE r.reservation_id = %(id)s AND r.release_attempts = %(seen)s AND NOT {_SUPERSEDED}""",
        {"id": reservation_id, "seen": attempts, "retry": retry_s},
    )
    return cur.rowcount == 1


async def end_fulfilled(conn: AsyncConnection[Any]) -> int:
    """Mark active holds ``fulfilled`` whose parcel the box has reported deposited (a
    ``parcel.deposited`` event of the same box, carrier and parcel, not older than the hold less
    ten minutes of device clock skew). The box ended the hold itself when the parcel went in."""
    cur = await conn.execute(
        """UPDATE reservations r SET status = 'fulfilled', ended_at = e.ts
           FROM events e
           WHERE r.status = 'active' AND e.box_id = r.box_id AND e.type = 'parcel.deposited'
             AND e.parcel_id = r.parcel_id AND e.carrier = r.carrier
             AND e.ts >= r.created_at - interval '10 minutes'"""
    )
    return cur.rowcount


async def end_rejected(conn: AsyncConnection[Any]) -> int:
    """Mark active holds ``rejected`` whose box refused the reserve_compartment command (the door
    was taken or broke between our reading and the box's; the box holds nothing, so no release)."""
    cur = await conn.execute(
        """UPDATE reservations r SET status = 'rejected', ended_at = coalesce(c.acked_at, now())
           FROM commands c
           WHERE r.status = 'active' AND c.command_id = r.command_id AND c.status = 'rejected'"""
    )
    return cur.rowcount


async def insert_reservation(
    conn: AsyncConnection[Any],
    *,
    reservation_id: UUID,
    box_id: str,
    compartment: int,
    size_class: str,
    carrier: str,
    parcel_id: str,
    dimensions: tuple[int, int, int] | None,
    created_by: str,
    hold_s: float,
) -> None:
    h, w, d = dimensions if dimensions else (None, None, None)
    await conn.execute(
        """INSERT INTO reservations (reservation_id, box_id, compartment, size_class, carrier, parcel_id,
                                     height_mm, width_mm, depth_mm, created_by, expires_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))""",
        (reservation_id, box_id, compartment, size_class, carrier, parcel_id, h, w, d, created_by, hold_s),
    )


async def active_for_parcel(conn: AsyncConnection[Any], carrier: str, parcel_id: str) -> UUID | None:
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT reservation_id FROM reservations WHERE carrier = %s AND parcel_id = %s AND status = 'active'",
            (carrier, parcel_id),
        )
        row = await cur.fetchone()
        return None if row is None else UUID(str(row[0]))


async def set_command(conn: AsyncConnection[Any], reservation_id: UUID, column: str, command_id: UUID) -> None:
    if column not in ("command_id", "release_command_id"):
        raise ValueError(column)
    await conn.execute(f"UPDATE reservations SET {column} = %s WHERE reservation_id = %s", (command_id, reservation_id))


async def get_reservation(conn: AsyncConnection[Any], reservation_id: UUID) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM {_RESERVATION_FROM} WHERE r.reservation_id = %s", (reservation_id,)
        )
        return await cur.fetchone()


async def list_reservations(
    conn: AsyncConnection[Any], *, carrier: str | None, status: str | None, box_id: str | None, limit: int
) -> list[Row]:
    where = ["true"]
    params: dict[str, Any] = {"limit": limit}
    if carrier is not None:
        where.append("r.carrier = %(carrier)s")
        params["carrier"] = carrier
    if box_id is not None:
        where.append("r.box_id = %(box)s")
        params["box"] = box_id
    if status == "active":
        where.append("r.status = 'active' AND r.expires_at > now()")
    elif status == "expired":
        where.append("(r.status = 'expired' OR (r.status = 'active' AND r.expires_at <= now()))")
    elif status is not None:
        where.append("r.status = %(status)s")
        params["status"] = status
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM {_RESERVATION_FROM} WHERE {' AND '.join(where)}"
            " ORDER BY r.created_at DESC, r.reservation_id LIMIT %(limit)s",
            params,
        )
        return await cur.fetchall()


async def cancel(conn: AsyncConnection[Any], reservation_id: UUID) -> Row | None:
    """End an unexpired active hold as ``cancelled``; None if it was not active."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """UPDATE reservations SET status = 'cancelled', ended_at = now()
               WHERE reservation_id = %s AND status = 'active' AND expires_at > now()
               RETURNING reservation_id, box_id, compartment""",
            (reservation_id,),
        )
        return await cur.fetchone()


async def waste_pickups(
    conn: AsyncConnection[Any],
    *,
    lat: float,
    lon: float,
    radius_m: float,
    bbox: tuple[float, float, float, float],
    timeout_s: float,
    limit: int,
) -> list[Row]:
    """Red boxes holding waste since their last collection, at available boxes near the point:
    contents from ``red_box_fill`` (kept by ingest from waste.deposited / waste.collected events),
    the latest weighed reading from telemetry, nearest first."""
    params = {
        "lat": round(lat, 7),  # 1 cm; also keeps subnormal floats out of the trigonometry (PostgreSQL
        "lon": round(lon, 7),  # raises "value out of range: underflow" on them: found by tests/test_api_fuzz.py)
        "radius": radius_m,
        "lat_min": bbox[0],
        "lat_max": bbox[1],
        "lon_min": bbox[2],
        "lon_max": bbox[3],
        "timeout": timeout_s,
        "limit": limit,
    }
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""WITH c AS (
                    SELECT b.box_id, b.name, b.latitude, b.longitude, b.layout, s.red_boxes, s.telemetry_ts,
                           {_DISTANCE} AS distance_m
                    FROM boxes b JOIN box_state s ON s.box_id = b.box_id
                    WHERE b.latitude BETWEEN %(lat_min)s AND %(lat_max)s
                      AND b.longitude BETWEEN %(lon_min)s AND %(lon_max)s AND {_AVAILABLE}
                )
                SELECT c.box_id, c.name, c.latitude, c.longitude, c.distance_m, c.layout,
                       f.compartment, f.deposited_kg, f.deposits, f.fractions, f.collected_ts, f.updated_at,
                       (SELECT (rb ->> 'weight_kg')::float FROM jsonb_array_elements(c.red_boxes) rb
                        WHERE (rb ->> 'compartment')::int = f.compartment) AS weighed_kg,
                       c.telemetry_ts
                FROM c JOIN red_box_fill f ON f.box_id = c.box_id
                WHERE c.distance_m <= %(radius)s AND f.deposits > 0
                ORDER BY c.distance_m, c.box_id, f.compartment
                LIMIT %(limit)s""",
            params,
        )
        return await cur.fetchall()
