"""The method: avoided trips, vehicle-km and kg CO2e of the boxes, against a stated baseline.

Where it sits: the end of a message's journey, used on both sides. The simulator applies it to the
events of a what-if run (``simulator.impact``); the backend applies it to ingested events
(``backend/api/kpis.py``). Both call :func:`assess` on the same :class:`~accounting.activity.BoxDay`
counts, so their figures agree. The write-up with every formula is ``docs/methodology.md``.

In short (ISO 14083 / GLEC logic: emissions = vehicle-km x intensity of the vehicle category):

* **Project** (with the boxes). Each carrier's round of the day over the boxes where its van
  delivered, took parcels away or took a red box, rebuilt by nearest neighbour from its depot and cut
  into van trips where a van is full. A trip's km are split over what it carried, by mass x shortest
  feasible distance from the depot (``load_distance``), or by giving waste only the km its stops add
  (``marginal``). The waste company's own round for red boxes no van took. Residents' trips to the box.
* **Baseline** (without the boxes). Hazardous waste: residents' trips to the nearest recycling station
  (some chained with other errands), a dedicated collection round, a mix of the two, the municipal
  bin-bag scheme, or the residual bin. Parcels: the carriers' same rounds without the waste, with a
  stop at each door and failed first attempts (``home_delivery``) or at a parcel shop
  (``parcel_shop``), and residents' trips to a parcel shop to fetch or send parcels.
* **Avoided** = baseline - project, per category, box, carrier and period.

Results are lines (scenario, category, box, carrier, day, vehicle, trips, vkm); :func:`summarize` groups
them and adds kg CO2e, well-to-wheel as the headline and tank-to-wheel beside it.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal, NamedTuple

from accounting.activity import BoxDay
from accounting.assumptions import Baseline, Method
from accounting.geo import Distances, Geography, Point

Scenario = Literal["baseline", "project"]
CATEGORIES: tuple[str, ...] = ("hazardous_waste", "parcel_delivery", "parcel_sending")
#: What results can be grouped by. Groups partition the totals; grouped by ``mode``, the groups also
#: hold the walking and cycling rows, which no total counts.
GROUPS: tuple[str, ...] = ("category", "mode", "box", "carrier", "day", "week", "month")
#: The figures of every result: vehicle trips, vehicle stops (a van's at a box or a door, a truck's at a
#: box), vehicle-km and kg CO2e. ``walk_cycle``'s trips and km are a person's, and it has no stops.
METRICS: tuple[str, ...] = ("trips", "stops", "vkm", "kg_co2e_wtw", "kg_co2e_ttw")
_N = len(METRICS)
#: Who travels how (``modes`` of a result): the carriers' vans, the waste company's trucks, residents
#: by car, residents on foot, by bike or by public transport (no vehicle trip of their own).
MODES: dict[str, dict[str, Any]] = {
    "van": {"actor": "carriers", "motorised": True},
    "truck": {"actor": "waste company", "motorised": True},
    "car": {"actor": "residents", "motorised": True},
    "walk_cycle": {"actor": "residents", "motorised": False},
}
MOTORISED: frozenset[str] = frozenset(m for m, d in MODES.items() if d["motorised"])
WASTE, DELIVERY, SENDING = CATEGORIES
#: Activity counts every result carries beside its figures.
ACTIVITY: tuple[str, ...] = (
    "parcels_delivered", "parcels_collected", "parcels_taken_back", "parcels_sent", "waste_deposits",
    "waste_kg_deposited", "red_boxes_by_vans", "waste_kg_by_vans", "red_boxes_by_operator", "waste_kg_by_operator",
)  # fmt: skip


class Line(NamedTuple):
    """Trips, stops and km of one mode (see :data:`MODES`), for one category, box, carrier and day."""

    scenario: Scenario
    category: str
    box_id: str | None
    carrier: str | None
    day: date
    vehicle: str  # a key of MODES: "van" (the carriers' fleet mix), "truck", "car", "walk_cycle"
    trips: float
    stops: float
    vkm: float  # for walk_cycle: person-km


def _line(*fields: Any) -> Line:
    """A :class:`Line` without NamedTuple's Python-level ``__new__`` (the method makes ~300k a year)."""
    return tuple.__new__(Line, fields)


class Part(NamedTuple):
    """What a van carried for one category at one stop, with its mass x distance from the depot."""

    category: str
    box_id: str
    load_km: float


@dataclass
class Assessment:
    method: Method
    lines: list[Line]
    activity: dict[str, float]


class Assessor:
    """The method in ``geo``, keeping the road distances and rebuilt tours it has worked out, so
    assessing day after day (the backend's cache does) costs no more than all days at once."""

    def __init__(self, geo: Geography, method: Method) -> None:
        self.geo, self.method = geo, method
        self.dist = Distances(geo, method.road_factor, method.distance_adjustment)

    def assess(self, days: Iterable[BoxDay], only: Collection[str] | None = None) -> Assessment:
        """Apply the method to the counted events ``days``. Every part of the method works on one day
        at a time, so assessing days apart and adding the results up gives the same figures.

        ``only``: keep the figures of these boxes. Van and waste rounds are still rebuilt over every
        box of the day (a box's share of a shared round depends on the others), then only these
        boxes' lines and activity are kept."""
        days = list(days)
        lines: list[Line] = []
        _vans(days, self.dist, self.method, lines)
        _waste_rounds(days, self.dist, self.method, lines, scenario="project", weight=1.0)
        _residents(days, self.dist, self.method, lines)
        if only is not None:
            keep = set(only)
            lines = [ln for ln in lines if ln.box_id in keep]
            days = [d for d in days if d.box_id in keep]
        return Assessment(self.method, lines, _activity(days, self.method))


def assess(days: Iterable[BoxDay], geo: Geography, method: Method) -> Assessment:
    """Apply ``method`` to the counted events ``days`` in ``geo``."""
    return Assessor(geo, method).assess(days)


def _split(total: float, weights: Sequence[float]) -> list[float]:
    """``total`` in proportion to ``weights`` (equal parts if they are all zero)."""
    s = sum(weights)
    if s > 0:
        return [total * w / s for w in weights]
    return [total / len(weights)] * len(weights) if weights else []


# ---------------------------------------------------------------------------------------- vans


def _parts(a: BoxDay, depot_km: float, method: Method) -> list[Part]:
    p = method.parcels
    m = p.mass_kg
    out = []
    if a.parcels_delivered or a.expired:
        delivered = (
            a.deposited_a * m.get("A", p.unsized_mass_kg)
            + a.deposited_b * m.get("B", p.unsized_mass_kg)
            + a.deposited_c * m.get("C", p.unsized_mass_kg)
            + a.expired * p.unsized_mass_kg
        )
        out.append(Part(DELIVERY, a.box_id, delivered * depot_km))
    if a.picked_up:
        out.append(Part(SENDING, a.box_id, a.picked_up * p.unsized_mass_kg * depot_km))
    if a.waste_collections:
        kg = a.waste_collected_kg + a.waste_collections * method.waste.red_box_tare_kg
        out.append(Part(WASTE, a.box_id, kg * depot_km))
    return out


def _van_trips(order: list[str], stops: dict[str, BoxDay], capacity: int) -> list[list[str]]:
    """The round cut into van trips in stop order, a new van where the parcels to deliver would
    exceed ``capacity`` (0: one van)."""
    trips: list[list[str]] = [[]]
    load = 0
    for box in order:
        n = stops[box].parcels_delivered
        if capacity and trips[-1] and load + n > capacity:
            trips.append([])
            load = 0
        trips[-1].append(box)
        load += n
    return [t for t in trips if t]


def _vans(days: list[BoxDay], dist: Distances, method: Method, lines: list[Line]) -> None:
    """The carriers' rounds: the project's (red boxes on board) and the baseline's (the same rounds
    without the waste; with doors instead of boxes under the home-delivery baseline)."""
    rounds: dict[tuple[str, date], dict[str, BoxDay]] = defaultdict(dict)
    for a in days:
        if a.carrier is not None and a.carrier != method.waste.operator and a.van_visit:
            rounds[(a.carrier, a.day)][a.box_id] = a
    for (carrier, day), stops in sorted(rounds.items()):
        depot = dist.geo.depot(carrier)
        order, _ = dist.tour(depot, stops)
        for trip in _van_trips(order, stops, method.van_capacity_parcels):
            parts = [pt for box in trip for pt in _parts(stops[box], dist.from_origin(depot, box), method)]
            km = dist.path_km(depot, trip)
            if km > 0:
                if method.allocation == "load_distance":
                    shares = _split(km, [pt.load_km for pt in parts])
                else:
                    shares = _marginal(depot, trip, parts, km, dist)
                for pt, vkm, stop in zip(parts, shares, _stop_shares(parts, shares), strict=True):
                    lines.append(_line("project", pt.category, pt.box_id, carrier, day, "van", vkm / km, stop, vkm))
            _baseline_trip(depot, trip, stops, parts, carrier, day, dist, method, lines)


def _stop_shares(parts: list[Part], shares: Sequence[float]) -> list[float]:
    """One stop per box, split over what the van did there like the trip's km (equally if those are
    all zero): under ``marginal``, waste at a stop the van made for parcels anyway costs no stop."""
    per_box: dict[str, list[int]] = defaultdict(list)
    for i, pt in enumerate(parts):
        per_box[pt.box_id].append(i)
    out = [0.0] * len(parts)
    for idx in per_box.values():
        for i, s in zip(idx, _split(1.0, [shares[i] for i in idx]), strict=True):
            out[i] = s
    return out


def _marginal(depot: Point, trip: list[str], parts: list[Part], km: float, dist: Distances) -> list[float]:
    """Waste gets the km its stops add to the trip over the parcel stops (0 where the van stopped for
    parcels anyway); parcels share the rest by mass x distance. A trip with only waste stops is all
    waste's, split by mass x distance."""
    parcel_stops = {pt.box_id for pt in parts if pt.category != WASTE}
    waste = [i for i, pt in enumerate(parts) if pt.category == WASTE]
    others = [i for i, pt in enumerate(parts) if pt.category != WASTE]
    shares = [0.0] * len(parts)
    if not parcel_stops:
        for i, s in zip(waste, _split(km, [parts[i].load_km for i in waste]), strict=True):
            shares[i] = s
        return shares
    base = [b for b in trip if b in parcel_stops]
    for i in waste:
        box = parts[i].box_id
        shares[i] = 0.0 if box in parcel_stops else dist.insertion_km(depot, base, box)
    detours = sum(shares)
    if detours > km:  # only if insertions overlap; keep the trip's total exact all the same
        shares = [s * km / detours for s in shares]
        detours = km
    for i, s in zip(others, _split(km - detours, [parts[i].load_km for i in others]), strict=True):
        shares[i] = s
    return shares


def _baseline_trip(
    depot: Point,
    trip: list[str],
    stops: dict[str, BoxDay],
    parts: list[Part],
    carrier: str,
    day: date,
    dist: Distances,
    method: Method,
    lines: list[Line],
) -> None:
    """Without the boxes the van still makes this trip for its parcels, without red boxes: over the
    stops where it had parcels, split by mass x distance. Under ``home_delivery`` each parcel (and each
    redelivery) adds ``door_km_per_parcel`` for a stop at the door instead of one at the box."""
    parcel_parts = [pt for pt in parts if pt.category != WASTE]
    if not parcel_parts:
        return
    served = {pt.box_id for pt in parcel_parts}
    km = dist.path_km(depot, [b for b in trip if b in served])
    vkms = _split(km, [pt.load_km for pt in parcel_parts])
    p = method.parcels
    if method.baseline.parcels == "home_delivery":
        per_parcel = (1 + p.failed_first_attempt_share * p.failed_redelivery_share) * p.door_km_per_parcel
        vkms = [
            v + (stops[pt.box_id].parcels_delivered * per_parcel if pt.category == DELIVERY else 0.0)
            for v, pt in zip(vkms, parcel_parts, strict=True)
        ]
        # A stop at each door (and again for each redelivery); sent parcels are taken at a shop.
        door_stops = 1 + p.failed_first_attempt_share * p.failed_redelivery_share
        stops_at = [
            stops[pt.box_id].parcels_delivered * door_stops if pt.category == DELIVERY else 1.0 for pt in parcel_parts
        ]
    else:  # the parcel shop stands where the box stood: one stop, as at the box
        stops_at = _stop_shares(parcel_parts, vkms)
    total = sum(vkms)
    for pt, vkm, stop in zip(parcel_parts, vkms, stops_at, strict=True):
        trips = vkm / total if total > 0 else 0.0
        lines.append(_line("baseline", pt.category, pt.box_id, carrier, day, "van", trips, stop, vkm))


# ---------------------------------------------------------------------------------------- waste rounds


def _waste_rounds(
    days: list[BoxDay], dist: Distances, method: Method, lines: list[Line], *, scenario: Scenario, weight: float
) -> None:
    """One waste-company round a day over the boxes whose red boxes it collected (project), or over
    every box whose red boxes anyone collected (the dedicated-round baseline); split over the boxes by
    mass x distance."""
    if weight <= 0:
        return
    operator = method.waste.operator
    rounds: dict[date, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for a in days:
        if a.waste_collections and (scenario == "baseline" or a.carrier == operator):
            rounds[a.day][a.box_id] += a.waste_collected_kg + a.waste_collections * method.waste.red_box_tare_kg
    if not rounds:
        return
    site = dist.geo.depot(operator)
    for day, boxes in sorted(rounds.items()):
        order, km = dist.tour(site, boxes)
        loads = [boxes[b] * dist.from_origin(site, b) for b in order]
        for box, vkm in zip(order, _split(km, loads), strict=True):
            trips = vkm / km if km > 0 else 0.0
            lines.append(_line(scenario, WASTE, box, operator, day, "truck", trips * weight, weight, vkm * weight))


# ---------------------------------------------------------------------------------------- residents


def _residents(days: list[BoxDay], dist: Distances, method: Method, lines: list[Line]) -> None:
    """Residents' trips: to the box (project); to a recycling station and a parcel shop (baseline).
    Each is split by mode: a share by car, the rest on foot, by bike or by public transport
    (``walk_cycle``). Trips are expected values (count x share), so they need not be whole numbers.
    Residents make them, so their carrier is None: a carrier's figures are its own vehicles' (and a
    pickup event names no carrier anyway)."""
    r, p, b = method.residents, method.parcels, method.baseline
    resident, rounds = _waste_baseline_shares(b)
    home = b.parcels == "home_delivery"
    failed_to_shop = p.failed_first_attempt_share * (1 - p.failed_redelivery_share)
    recycling = r.recycling_trips_per_deposit * resident
    chained = r.recycling_chained_share
    add = lines.append

    def trips(
        scenario: Scenario, category: str, a: BoxDay, n: float, car_share: float, km: float, per_trip: float = 1.0
    ) -> None:
        """``n`` journeys of ``km`` each, ``per_trip`` vehicle trips a journey (0 for a chained one)."""
        car, other = n * car_share, n * (1 - car_share)
        add(_line(scenario, category, a.box_id, None, a.day, "car", car * per_trip, 0.0, car * km))
        if other:
            add(_line(scenario, category, a.box_id, None, a.day, "walk_cycle", other * per_trip, 0.0, other * km))

    for a in days:
        if a.collected:
            trips("project", DELIVERY, a, a.collected, r.box_car_share, r.box_trip_km)
        if a.dropped_off:
            trips("project", SENDING, a, a.dropped_off, r.box_car_share, r.box_trip_km)
            trips("baseline", SENDING, a, a.dropped_off, r.shop_car_share, r.shop_trip_km)
        if a.waste_deposits:
            trips("project", WASTE, a, a.waste_deposits, r.box_car_share, r.box_trip_km)
            if recycling > 0:
                km, n = 2 * dist.to_station_km(a.box_id), a.waste_deposits * recycling
                if chained < 1:
                    trips("baseline", WASTE, a, n * (1 - chained), r.recycling_car_share, km)
                if chained > 0:
                    detour = km * r.chained_detour_share
                    trips("baseline", WASTE, a, n * chained, r.recycling_car_share, detour, per_trip=0.0)
        # Home delivery: the failed first attempts not delivered again are fetched from a shop.
        # Parcel shop: every parcel a resident fetched (from the box, so from the shop instead).
        fetched = (a.deposited_a + a.deposited_b + a.deposited_c) * failed_to_shop if home else a.collected
        if fetched:
            trips("baseline", DELIVERY, a, fetched, r.shop_car_share, r.shop_trip_km)
    if rounds > 0:
        _waste_rounds(days, dist, method, lines, scenario="baseline", weight=rounds)


def _waste_baseline_shares(b: Baseline) -> tuple[float, float]:
    """The hazardous-waste baseline as (share of deposits taken to a recycling station by the
    resident, share collected on dedicated truck rounds); the rest costs no trip (a bin emptied on a
    round that runs anyway)."""
    return {
        "resident_trips": (1.0, 0.0),
        "dedicated_round": (0.0, 1.0),
        "mixed": (b.waste_resident_share, 1.0 - b.waste_resident_share),
        "bin_bag": (1.0 - b.bin_bag_share, 0.0),
        "residual_bin": (0.0, 0.0),
    }[b.waste]


def _activity(days: list[BoxDay], method: Method) -> dict[str, float]:
    delivered = collected = taken_back = sent = deposits = 0
    kg_deposited = 0.0
    boxes = {"vans": 0, "operator": 0}
    kg = {"vans": 0.0, "operator": 0.0}
    operator = method.waste.operator
    for a in days:
        delivered += a.deposited_a + a.deposited_b + a.deposited_c
        collected += a.collected
        taken_back += a.expired
        sent += a.dropped_off
        deposits += a.waste_deposits
        kg_deposited += a.waste_deposit_kg
        if a.waste_collections:
            by = "operator" if a.carrier == operator else "vans"
            boxes[by] += a.waste_collections
            kg[by] += a.waste_collected_kg
    values = (delivered, collected, taken_back, sent, deposits, kg_deposited,
              boxes["vans"], kg["vans"], boxes["operator"], kg["operator"])  # fmt: skip
    return dict(zip(ACTIVITY, map(float, values), strict=True))


# ---------------------------------------------------------------------------------------- results


def _round(x: float) -> float:
    return round(x, 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def _period(day: date, group: str) -> str:
    if group == "day":
        return day.isoformat()
    if group == "week":
        return (day - timedelta(days=day.weekday())).isoformat()  # the week's Monday
    return day.replace(day=1).isoformat()


def describe(method: Method) -> dict[str, Any]:
    """The choices a result was made with (every result carries this beside its figures)."""
    return {
        "name": method.name,
        "standard": "ISO 14083:2023 / GLEC Framework v3, activity-based",
        "headline": "kg_co2e_wtw",
        "trips": "motorised vehicle trips: carriers' vans, the waste company's trucks, residents' cars",
        "allocation": method.allocation,
        "waste_baseline": method.baseline.waste,
        "parcel_baseline": method.baseline.parcels,
        "van_electric_share": method.van_electric_share,
        "days": "UTC dates of the device timestamps",
    }


Cell = list[float]  # the baseline's METRICS, then the project's


def _cell() -> Cell:
    return [0.0] * (2 * _N)


def _finish(cell: Cell) -> dict[str, dict[str, float]]:
    base, proj = cell[:_N], cell[_N:]
    return {
        "baseline": {m: _round(v) for m, v in zip(METRICS, base, strict=True)},
        "project": {m: _round(v) for m, v in zip(METRICS, proj, strict=True)},
        "avoided": {m: _round(x - y) for m, x, y in zip(METRICS, base, proj, strict=True)},
    }


GroupKey = tuple[str | None, ...]


@dataclass
class Tally:
    """Summed figures of an assessment (totals, per category, mode and group, and activity).
    Totals, categories and groups count motorised modes only; ``modes`` has every mode.
    Tallies of different days add up to the tally of all of them."""

    totals: Cell = field(default_factory=_cell)
    categories: dict[str, Cell] = field(default_factory=lambda: {c: _cell() for c in CATEGORIES})
    modes: dict[str, Cell] = field(default_factory=dict)
    groups: dict[GroupKey, Cell] = field(default_factory=dict)
    activity: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ACTIVITY, 0.0))

    def add(self, other: Tally) -> None:
        """Add ``other``'s figures to these."""
        _add(self.totals, other.totals)
        for mine, theirs in ((self.categories, other.categories), (self.modes, other.modes)):
            for k, cell in theirs.items():
                _add(mine.setdefault(k, _cell()), cell)
        for gk, cell in other.groups.items():
            _add(self.groups.setdefault(gk, _cell()), cell)
        for k, v in other.activity.items():
            self.activity[k] = self.activity.get(k, 0.0) + v


def _add(into: Cell, cell: Cell) -> None:
    for i, v in enumerate(cell):
        into[i] += v


def _check_groups(group_by: Sequence[str]) -> None:
    for g in group_by:
        if g not in GROUPS:
            raise ValueError(f"cannot group by {g!r}; choose from {', '.join(GROUPS)}")


def tally(assessment: Assessment, group_by: Sequence[str] = ()) -> Tally:
    """Sum an assessment's lines: trips, stops, vkm and kg CO2e (WTW and TTW) per scenario.

    Lines are first summed per (scenario, category, mode, group) as trips, stops and vkm; kg CO2e is
    vkm times the vehicle's intensity, so it is applied once per sum instead of once per line. Totals,
    categories and groups sum the motorised modes; walking and cycling are in ``modes`` alone."""
    _check_groups(group_by)
    method = assessment.method
    periods: dict[tuple[date, str], str] = {}

    def label(day: date, g: str) -> str:
        found = periods.get((day, g))
        if found is None:
            found = periods[(day, g)] = _period(day, g)
        return found

    pickers: dict[str, Callable[[Line], str | None]] = {
        "category": lambda ln: ln.category,
        "mode": lambda ln: ln.vehicle,
        "box": lambda ln: ln.box_id,
        "carrier": lambda ln: ln.carrier,
        "day": lambda ln: label(ln.day, "day"),
        "week": lambda ln: label(ln.day, "week"),
        "month": lambda ln: label(ln.day, "month"),
    }
    picks = [pickers[g] for g in group_by]
    by_mode = "mode" in group_by
    sums: dict[tuple[Any, ...], list[float]] = {}
    for ln in assessment.lines:
        key = (ln.scenario, ln.category, ln.vehicle, *(pick(ln) for pick in picks))
        cell = sums.get(key)
        if cell is None:
            cell = sums[key] = [0.0, 0.0, 0.0]
        cell[0] += ln.trips
        cell[1] += ln.stops
        cell[2] += ln.vkm
    t = Tally(activity=dict(assessment.activity))
    modes = {k[2] for k in sums}
    intensity = {v: method.intensity(v) if v in MOTORISED else (0.0, 0.0) for v in modes}
    for v in sorted(modes, key=list(MODES).index):
        t.modes[v] = _cell()
    for (scenario, category, mode, *group), (trips, stops, vkm) in sums.items():
        wtw, ttw = intensity[mode]
        o = 0 if scenario == "baseline" else _N
        cells = [t.modes[mode]]
        if mode in MOTORISED:
            cells += [t.totals, t.categories[category]]
        if group_by and (mode in MOTORISED or by_mode):
            gk = tuple(group)
            cell = t.groups.get(gk)
            if cell is None:
                cell = t.groups[gk] = _cell()
            cells.append(cell)
        for c in cells:
            c[o] += trips
            c[o + 1] += stops
            c[o + 2] += vkm
            c[o + 3] += vkm * wtw
            c[o + 4] += vkm * ttw
    return t


def report(t: Tally, method: Method, group_by: Sequence[str] = ()) -> dict[str, Any]:
    """A tally as a result: the headline, totals, per category, per mode and per group, each with
    baseline, project and avoided figures (rounded to 6 decimals), with the method and every
    assumption."""
    _check_groups(group_by)
    totals = _finish(t.totals)
    return {
        "method": describe(method),
        "assumptions": method.model_dump(mode="json"),
        "activity": {k: _round(v) for k, v in t.activity.items()},
        "headline": headline(totals),
        "totals": totals,
        "categories": {c: _finish(v) for c, v in t.categories.items()},
        "modes": {m: {**MODES[m], **_finish(cell)} for m in MODES if (cell := t.modes.get(m)) is not None},
        "group_by": list(group_by),
        "groups": [
            {"key": dict(zip(group_by, key, strict=True)), **_finish(cell)}
            for key, cell in sorted(t.groups.items(), key=lambda kv: tuple(k or "" for k in kv[0]))
        ],
    }


def headline(totals: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The figures a result leads with: motorised vehicle trips avoided as a whole number (residents'
    expected car trips make the sum fractional; rounded half away from zero), vehicle-km and kg CO2e
    WTW avoided."""
    avoided = totals["avoided"]
    trips = avoided["trips"]
    return {
        "motorised_trips_avoided": int(math.copysign(math.floor(abs(trips) + 0.5), trips)),
        "vkm_avoided": avoided["vkm"],
        "kg_co2e_wtw_avoided": avoided["kg_co2e_wtw"],
    }


def summarize(assessment: Assessment, group_by: Sequence[str] = ()) -> dict[str, Any]:
    """The headline, totals, per category, per mode and per group (any of ``GROUPS``), each with
    baseline, project and avoided trips, stops, vkm and kg CO2e (WTW and TTW), plus the method and
    assumptions."""
    return report(tally(assessment, group_by), assessment.method, group_by)


def to_csv(summary: dict[str, Any]) -> str:
    """The groups of a summary as CSV (the totals as one row when there are no groups): one column
    per scenario and metric, and the method's choices in every row."""
    group_by: list[str] = summary["group_by"]
    method = summary["method"]
    choices = ["allocation", "waste_baseline", "parcel_baseline", "van_electric_share"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    scenarios = ("baseline", "project", "avoided")
    w.writerow([*group_by, *(f"{s}_{m}" for s in scenarios for m in METRICS), "method", *choices])
    rows = summary["groups"] if group_by else [{"key": {}, **summary["totals"]}]
    for row in rows:
        keys = ["" if row["key"][g] is None else row["key"][g] for g in group_by]
        w.writerow(
            [*keys, *(row[s][m] for s in scenarios for m in METRICS), method["name"], *(method[c] for c in choices)]
        )
    return buf.getvalue()
