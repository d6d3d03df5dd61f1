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
from dataclasses import dataclass, replace
from datetime import date
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from accounting import Assessor, BoxDay, Geography, Method, Point, Tally, report, tally
from backend.impact import repository
from network import geography_of, load_network


@lru_cache(maxsize=4)
def sites(network_file: Path | None) -> Geography:
    """Depots, recycling stations and the boxes of the network file (positions the database lacks),
    as the simulator measures them."""
    return geography_of(load_network(network_file))


#: The last geography built, per network file, with the database fingerprint of the box positions
#: it was built from and its :func:`geography_key` (one per API process; boxes rarely move).
_GEOGRAPHIES: dict[Path | None, tuple[str, Geography, str]] = {}


async def geography(conn: AsyncConnection[Any], network_file: Path | None) -> Geography:
    """The network file's geography with the registered box positions on top: built again only when
    the positions' fingerprint in the database changed."""
    fingerprint = await repository.box_positions_fingerprint(conn)
    known = _GEOGRAPHIES.get(network_file)
    if known is not None and known[0] == fingerprint:
        return known[1]
    base = sites(network_file)
    boxes = dict(base.boxes)
    boxes.update({box: Point(lat, lon) for box, (lat, lon) in (await repository.box_positions(conn)).items()})
    geo = replace(base, boxes=boxes)
    _GEOGRAPHIES[network_file] = (fingerprint, geo, _geography_key(geo))
    return geo


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


def _geography_key(geo: Geography) -> str:
    parts = [sorted(geo.boxes.items()), sorted(geo.depots.items()), geo.recycling_stations]
    return _fingerprint(repr(parts))


def geography_key(geo: Geography) -> str:
    """A fingerprint of every position the method measures from (remembered for the geographies
    :func:`geography` keeps)."""
    for _, known, key in _GEOGRAPHIES.values():
        if known is geo:
            return key
    return _geography_key(geo)


Fingerprint = tuple[Any, ...]
CacheKey = tuple[str, str, tuple[str, ...], tuple[str, ...] | None]  # geography, method, grouping, boxes


@dataclass
class DayResult:
    """One day worked out: its tally and what it could not place."""

    tally: Tally
    no_box: frozenset[str]
    no_depot: frozenset[str]


class DayCache:
    """Days worked out, by (geography, method, grouping, box filter, day), each with the fingerprint
    of the counts it came from; least recently used entries go first. Safe to share between threads."""

    def __init__(self, max_days: int = 20_000) -> None:
        self.max_days = max_days
        self._days: OrderedDict[tuple[CacheKey, date], tuple[Fingerprint, DayResult]] = OrderedDict()
        self._assessors: OrderedDict[tuple[str, str], Assessor] = OrderedDict()
        self._lock = threading.Lock()  # the dicts only: held for microseconds, also on the event loop
        self._compute = threading.Lock()  # one day worked out at a time: assessors' memos are not thread-safe
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

    def lookup(self, key: CacheKey, day: date, fingerprint: Fingerprint) -> DayResult | None:
        """The day's result if it was worked out from counts with this fingerprint."""
        with self._lock:
            hit = self._days.get((key, day))
            if hit is None or hit[0] != fingerprint:
                return None
            self._days.move_to_end((key, day))
            self.hits += 1
            return hit[1]

    def work_out(
        self, assessor: Assessor, key: CacheKey, day: date, fingerprint: Fingerprint, rows: list[BoxDay]
    ) -> DayResult:
        """Tally one day's counts of every box, keeping the figures of the key's boxes (all if None),
        and keep the result under ``fingerprint``."""
        kept, excluded = placeable(rows, assessor.geo)
        only = key[3]
        no_box = frozenset(excluded["boxes_without_position"])
        with self._compute:
            t = tally(assessor.assess(kept, only), list(key[2]))
        result = DayResult(
            t, no_box if only is None else no_box & set(only), frozenset(excluded["carriers_without_depot"])
        )
        with self._lock:
            self.misses += 1
            self._days[(key, day)] = (fingerprint, result)
            while len(self._days) > self.max_days:
                self._days.popitem(last=False)
        return result


#: The API process's cache (a day of 50 boxes is a few kB; 20,000 days is a few hundred MB at most).
CACHE = DayCache()


def cache_key(geo: Geography, method: Method, group_by: list[str], boxes: list[str] | None) -> CacheKey:
    return (
        geography_key(geo),
        _fingerprint(method.model_dump_json()),
        tuple(group_by),
        tuple(sorted(set(boxes))) if boxes else None,
    )


def combine(results: list[DayResult], method: Method, group_by: list[str]) -> dict[str, Any]:
    """Days' results added up into one result, with what was left out."""
    total = Tally()
    no_box: set[str] = set()
    no_depot: set[str] = set()
    for r in results:
        total.add(r.tally)
        no_box |= r.no_box
        no_depot |= r.no_depot
    excluded = {"boxes_without_position": sorted(no_box), "carriers_without_depot": sorted(no_depot)}
    return {**report(total, method, group_by), "excluded": excluded}


def compute(
    days: list[BoxDay], geo: Geography, method: Method, group_by: list[str], cache: DayCache = CACHE
) -> dict[str, Any]:
    """The method's result over ``days`` (ordered by day), worked out day by day through ``cache``
    (each day's fingerprint taken from its counts; for callers that hold the counts already)."""
    key = cache_key(geo, method, group_by, None)
    assessor = cache.assessor(geo, key[0], method, key[1])
    results = []
    for day, group in groupby(days, key=lambda d: d.day):
        rows = list(group)
        fp = tuple(_counts(r) for r in rows)
        results.append(cache.lookup(key, day, fp) or cache.work_out(assessor, key, day, fp, rows))
    return combine(results, method, group_by)


def _counts(d: BoxDay) -> tuple[Any, ...]:
    return (d.box_id, d.carrier, d.deposited_a, d.deposited_b, d.deposited_c, d.collected, d.expired,
            d.dropped_off, d.picked_up, d.waste_deposits, d.waste_deposit_kg, d.waste_collections,
            d.waste_collected_kg)  # fmt: skip


async def kpis(
    conn: AsyncConnection[Any],
    *,
    since: date,
    until: date,
    method: Method,
    group_by: list[str],
    boxes: list[str] | None,
    network_file: Path | None,
    cache: DayCache = CACHE,
) -> dict[str, Any]:
    """The method's result over UTC days ``[since, until)``.

    In one snapshot (REPEATABLE READ): each day's fingerprint, then the counts of only the days the
    cache does not hold with that fingerprint. Both cover every box: a box's share of a shared van
    round depends on the other boxes of the round, so ``boxes`` only selects whose figures are kept.
    The method's work runs in a thread, so the event loop keeps serving other requests meanwhile.
    """
    geo = await geography(conn, network_file)
    key = cache_key(geo, method, group_by, boxes)
    assessor = cache.assessor(geo, key[0], method, key[1])
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        prints = await repository.day_fingerprints(conn, since, until, None)
        if boxes:  # only the days with activity at these boxes
            mine = await repository.day_fingerprints(conn, since, until, boxes)
            prints = {d: fp for d, fp in prints.items() if d in mine}
        found = {day: cache.lookup(key, day, fp) for day, fp in prints.items()}
        missing = [day for day, r in found.items() if r is None]
        if len(missing) == len(prints):  # nothing cached: one range scan beats a list of days
            rows = await repository.activity(conn, since, until) if missing else []
        else:
            rows = await repository.activity_of_days(conn, missing) if missing else []

    def work() -> dict[str, Any]:
        by_day = {day: list(group) for day, group in groupby(rows, key=lambda d: d.day)}
        results = [
            r if r is not None else cache.work_out(assessor, key, day, prints[day], by_day.get(day, []))
            for day, r in found.items()
        ]
        return combine(results, method, group_by)

    result = await asyncio.to_thread(work)
    return {"period": {"since": since.isoformat(), "until": until.isoformat()}, **result}
