"""KPIs from ingested events: the method (``accounting``) applied to the ``activity_daily`` counts.

Where it sits: between the KPI endpoints (``backend/api/kpis.py``) and the database. Box positions
come from the ``boxes`` table (registered from the network file), depots and recycling stations from
the network file in force (``MOLO_NETWORK_FILE``, by default the bundled Aalborg one): the same
geography the simulator measures with. Counts for a box without a known position, or for a carrier
without a known depot, cannot be placed; they are left out and listed in the result, never guessed.

Every part of the method works on one day at a time, so a day's tally depends only on that day's
counts, the method and the geography. :class:`DayCache` keeps the tallies of days it has seen: a
dashboard asking for a year again only works out the days whose counts changed (today's, as events
arrive), and a cached day is reused only if its counts are exactly the ones it was tallied from.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from dataclasses import replace
from datetime import date
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from accounting import Assessor, BoxDay, Geography, Method, Point, Tally, report, tally
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
    """The network file's geography with the registered box positions on top."""
    base = sites(network_file)
    boxes = dict(base.boxes)
    boxes.update({box: Point(lat, lon) for box, (lat, lon) in (await repository.box_positions(conn)).items()})
    return replace(base, boxes=boxes)


def placeable(days: list[BoxDay], geo: Geography) -> tuple[list[BoxDay], dict[str, list[str]]]:
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


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def geography_key(geo: Geography) -> str:
    """A fingerprint of every position the method measures from."""
    parts = [sorted(geo.boxes.items()), sorted(geo.depots.items()), geo.recycling_stations]
    return _fingerprint(repr(parts))


class DayCache:
    """Tallies of single days by (method, geography, grouping, day), with the counts they came from;
    least recently used entries go first. Safe to share between threads."""

    def __init__(self, max_days: int = 20_000) -> None:
        self.max_days = max_days
        self._days: OrderedDict[tuple[str, str, tuple[str, ...], date], tuple[list[BoxDay], Tally]] = OrderedDict()
        self._assessors: OrderedDict[tuple[str, str], Assessor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def assessor(self, geo: Geography, geo_key: str, method: Method, method_key: str) -> Assessor:
        with self._lock:
            key = (geo_key, method_key)
            found = self._assessors.get(key)
            if found is None:
                found = self._assessors[key] = Assessor(geo, method)
                while len(self._assessors) > 8:
                    self._assessors.popitem(last=False)
            self._assessors.move_to_end(key)
            return found

    def tally(
        self, assessor: Assessor, keys: tuple[str, str], group_by: list[str], day: date, rows: list[BoxDay]
    ) -> Tally:
        """The tally of one day's ``rows``: cached if these exact counts were tallied before."""
        key = (*keys, tuple(group_by), day)
        with self._lock:
            hit = self._days.get(key)
            if hit is not None and hit[0] == rows:
                self._days.move_to_end(key)
                self.hits += 1
                return hit[1]
        with self._lock:  # one thread at a time through an assessor's distance memo
            result = tally(assessor.assess(rows), group_by)
            self.misses += 1
            self._days[key] = (rows, result)
            while len(self._days) > self.max_days:
                self._days.popitem(last=False)
        return result


#: The API process's cache (a day of 50 boxes is a few kB; 20,000 days is a few hundred MB at most).
CACHE = DayCache()


def compute(
    days: list[BoxDay], geo: Geography, method: Method, group_by: list[str], cache: DayCache = CACHE
) -> dict[str, Any]:
    """The method's result over ``days`` (ordered by day), tallied day by day through ``cache``."""
    geo_key, method_key = geography_key(geo), _fingerprint(method.model_dump_json())
    assessor = cache.assessor(geo, geo_key, method, method_key)
    total = Tally()
    for day, rows in groupby(days, key=lambda d: d.day):
        total.add(cache.tally(assessor, (geo_key, method_key), group_by, day, list(rows)))
    return report(total, method, group_by)


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
    """The method's summary of UTC days ``[since, until)``. The method's work runs in a thread, so the
    event loop keeps serving other requests meanwhile."""
    days = await repository.activity(conn, since, until, boxes)
    geo = await geography(conn, network_file)
    kept, excluded = placeable(days, geo)
    result = await asyncio.to_thread(compute, kept, geo, method, group_by)
    return {"period": {"since": since.isoformat(), "until": until.isoformat()}, **result, "excluded": excluded}
