"""KPIs from ingested events: the method (``accounting``) applied to the ``activity_daily`` counts.

Where it sits: between the KPI endpoints (``backend/api/kpis.py``) and the database. Box positions
come from the ``boxes`` table (registered from the network file), depots and recycling stations from
the network file in force (``MOLO_NETWORK_FILE``, by default the bundled Aalborg one): the same
geography the simulator measures with. Counts for a box without a known position, or for a carrier
without a known depot, cannot be placed; they are left out and listed in the result, never guessed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from accounting import BoxDay, Geography, Method, Point, assess, summarize
from backend.impact import repository
from simulator.network import load_network


@lru_cache(maxsize=4)
def sites(network_file: Path | None) -> Geography:
    """Depots, recycling stations and the boxes of the network file (positions the database lacks)."""
    network = load_network(network_file)
    return Geography(
        boxes={b.id: Point(b.lat, b.lon) for b in network.boxes},
        depots={k: Point(s.lat, s.lon) for k, s in network.depots.items()},
        recycling_stations=[Point(s.lat, s.lon) for s in network.recycling_stations],
    )


async def geography(conn: AsyncConnection[Any], network_file: Path | None) -> Geography:
    base = sites(network_file)
    boxes = dict(base.boxes)
    boxes.update({box: Point(lat, lon) for box, (lat, lon) in (await repository.box_positions(conn)).items()})
    return replace(base, boxes=boxes)


def placeable(days: list[BoxDay], geo: Geography, method: Method) -> tuple[list[BoxDay], dict[str, list[str]]]:
    """The counts the method can place, and what it cannot (box ids without a position, carriers
    without a depot), so a result says what it left out."""
    no_box: set[str] = set()
    no_depot: set[str] = set()
    kept: list[BoxDay] = []
    for d in days:
        if d.box_id not in geo.boxes:
            no_box.add(d.box_id)
        elif d.carrier is not None and d.carrier not in geo.depots and d.van_visit:
            no_depot.add(d.carrier)
        else:
            kept.append(d)
    return kept, {"boxes_without_position": sorted(no_box), "carriers_without_depot": sorted(no_depot)}


async def kpis(
    conn: AsyncConnection[Any],
    *,
    since: date,
    until: date,
    method: Method,
    group_by: list[str],
    boxes: list[str] | None,
    network_file: Path | None,
) -> dict[str, Any]:
    """The method's summary of UTC days ``[since, until)``."""
    days = await repository.activity(conn, since, until, boxes)
    geo = await geography(conn, network_file)
    kept, excluded = placeable(days, geo, method)
    result = summarize(assess(kept, geo, method), group_by)
    return {"period": {"since": since.isoformat(), "until": until.isoformat()}, **result, "excluded": excluded}
