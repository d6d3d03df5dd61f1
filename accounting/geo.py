"""Places and distances for the method: where boxes, depots and recycling stations are, and tours.

Where it sits: under ``accounting.method``. The simulator builds a :class:`Geography` from its network
file, the backend from the boxes table and the same file, so both measure the same distances. Road km
are straight-line km x the road factor x (1 + the GLEC distance adjustment); a van's tour over a day's
stops is rebuilt by nearest neighbour from its depot (the order the simulator's vans drive).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

#: Mean Earth radius (IUGG), km; the simulator uses the same.
EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True, slots=True)
class Point:
    lat: float
    lon: float


def haversine_km(a: Point, b: Point) -> float:
    """Great-circle distance in km between two WGS84 points (spherical Earth, mean radius)."""
    phi1, phi2 = math.radians(a.lat), math.radians(b.lat)
    dphi, dlambda = phi2 - phi1, math.radians(b.lon - a.lon)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass
class Geography:
    """Box positions by id, depots by carrier id (and the waste company's), recycling stations."""

    boxes: dict[str, Point]
    depots: dict[str, Point]
    recycling_stations: list[Point]

    def box(self, box_id: str) -> Point:
        try:
            return self.boxes[box_id]
        except KeyError:
            raise UnknownPlaceError(f"box {box_id!r} has no known position") from None

    def depot(self, carrier: str) -> Point:
        try:
            return self.depots[carrier]
        except KeyError:
            raise UnknownPlaceError(f"carrier {carrier!r} has no known depot") from None


class UnknownPlaceError(ValueError):
    """The activity names a box or carrier the geography does not know."""


class Distances:
    """Road km between places, computed once per pair (a year of tours asks for the same pairs again
    and again). Boxes are addressed by id; an origin (depot, waste site) by its :class:`Point`."""

    def __init__(self, geo: Geography, road_factor: float, adjustment: float) -> None:
        self.geo = geo
        self.scale = road_factor * (1 + adjustment)
        self._rows: dict[str, dict[str, float]] = {}
        self._origins: dict[Point, dict[str, float]] = {}
        self._tours: dict[tuple[Point, frozenset[str]], tuple[list[str], float]] = {}
        self._station: dict[str, float] = {}
        self._rank: dict[Point | str, list[str]] = {}

    def _row(self, box_id: str) -> dict[str, float]:
        row = self._rows.get(box_id)
        if row is None:
            here = self.geo.box(box_id)
            row = self._rows[box_id] = {b: haversine_km(here, p) * self.scale for b, p in self.geo.boxes.items()}
        return row

    def _origin(self, origin: Point) -> dict[str, float]:
        row = self._origins.get(origin)
        if row is None:
            row = self._origins[origin] = {b: haversine_km(origin, p) * self.scale for b, p in self.geo.boxes.items()}
        return row

    def km(self, a: Point, b: Point) -> float:
        """Road km between two points."""
        return haversine_km(a, b) * self.scale

    def from_origin(self, origin: Point, box_id: str) -> float:
        """Road km from ``origin`` (a depot) to a box."""
        self.geo.box(box_id)  # a clear error for an unknown box
        return self._origin(origin)[box_id]

    def to_station_km(self, box_id: str) -> float:
        """Road km from a box to its nearest recycling station."""
        d = self._station.get(box_id)
        if d is None:
            if not self.geo.recycling_stations:
                raise UnknownPlaceError("the geography has no recycling stations")
            here = self.geo.box(box_id)
            d = self._station[box_id] = min(self.km(here, s) for s in self.geo.recycling_stations)
        return d

    def tour(self, origin: Point, stops: Iterable[str]) -> tuple[list[str], float]:
        """Nearest-neighbour order of ``stops`` (box ids) from ``origin`` and the closed tour's km.

        Each next stop is the nearest from here, ties to the lower box id; the van returns to the
        origin. Memoised per (origin, set of stops): most days a carrier serves the same boxes.
        """
        key = (origin, frozenset(stops))
        hit = self._tours.get(key)
        if hit is not None:
            return hit
        left = set(key[1])
        for box_id in left:
            self.geo.box(box_id)
        start = self._origin(origin)
        order: list[str] = []
        ranked, km = self._ranked(origin, start), 0.0
        while left:
            box_id = next(b for b in ranked if b in left)  # the nearest left, ties to the lower id
            km += (start if not order else self._row(order[-1]))[box_id]
            order.append(box_id)
            left.discard(box_id)
            ranked = self._ranked(box_id, self._row(box_id))
        if order:
            km += start[order[-1]]
        result = self._tours[key] = (order, km)
        return result

    def _ranked(self, place: Point | str, row: dict[str, float]) -> list[str]:
        """Box ids by road km from ``place``, nearest first, ties to the lower id."""
        found = self._rank.get(place)
        if found is None:
            found = self._rank[place] = sorted(row, key=lambda b: (row[b], b))
        return found

    def path_km(self, origin: Point, order: list[str]) -> float:
        """km of the closed tour ``origin -> order[0] -> ... -> order[-1] -> origin`` in that order."""
        if not order:
            return 0.0
        start = self._origin(origin)
        return start[order[0]] + sum(self._row(a)[b] for a, b in pairwise(order)) + start[order[-1]]

    def insertion_km(self, origin: Point, order: list[str], box_id: str) -> float:
        """The extra km of visiting ``box_id`` on the closed tour ``origin -> order -> origin``: the
        cheapest insertion between two consecutive places (never negative: triangle inequality)."""
        start, row = self._origin(origin), self._row(box_id)
        if not order:
            return 2 * start[box_id]
        legs = [start[box_id] + row[order[0]] - start[order[0]]]
        legs += [row[a] + row[b] - self._row(a)[b] for a, b in pairwise(order)]
        legs.append(row[order[-1]] + start[box_id] - start[order[-1]])
        return max(0.0, min(legs))
