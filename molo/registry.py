"""Registering where boxes stand: name, position and households of each box, into the ``boxes`` table.

Where it sits in a message's journey: beside it, before the first message. A box announces its doors
and firmware in its birth message, but not where it stands; that comes from the network file (the
simulator's ``Box``), as a municipality's site register would provide it. The dashboard's plan and the
couriers' distance queries read these columns. Only these columns are written: the layout and firmware
stay what the boxes announced.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from network import Box


def register_boxes(database_url: str, boxes: Iterable[Box]) -> int:
    """Insert or update the name, latitude, longitude and households of ``boxes``; returns how many."""
    rows = [(b.id, b.name, b.lat, b.lon, b.households) for b in boxes]
    with psycopg.connect(database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO boxes AS x (box_id, name, latitude, longitude, households) VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (box_id) DO UPDATE SET name = excluded.name, latitude = excluded.latitude,
                   longitude = excluded.longitude, households = excluded.households, updated_at = now()""",
            rows,
        )
    return len(rows)
