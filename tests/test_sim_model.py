"""Unit tests of the world model's processes on a tiny world built in code.

Where it sits: tests of the first step of a message's journey (``simulator.model``). In SimPy's own
style: an environment, a log (a ``MemorySink``), exact expectations. Each test builds a network of one
to three boxes with the depots it needs and a scenario with everything switched off except the process
under test (faults at MTBFs of 1e9 days, no sends, no waste, constant dwell, daily van rounds at fixed
hours), so record times can be computed by hand: a van leaves at its round hour and reaches a box after
``haversine_km x road factor / speed``.

Parcels for a round are either drawn by the model's own demand or, where a test needs an exact set of
parcels, put at the carrier's depot before the run (``at_depot``): the model sends parcels waiting at
the depot out with the next round first. Times are compared to a microsecond.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import simpy

from contract.domain import BoxLayout, Compartment, CompartmentKind, SizeClass
from contract.messages import EVENT_TYPES, PAYLOAD_BY_TYPE, check_layout, decode_event, encode, make_event
from network import Box, FjordSide, Network, Site, SiteKind, build_layout, haversine_km
from simulator.model import Parcel, World
from simulator.params import Scenario, resolve
from simulator.run import network_for, run_batch
from simulator.trace import FileSink, MemorySink, Record, to_ms

HOUR = 3600.0
DAY = 24 * HOUR
ROAD_FACTOR = 1.3
VAN_KMH = 25.0
TRUCK_KMH = 30.0
STOP_S = 4 * 60.0

POSTNORD = Site(id="postnord", name="PostNord test depot", lat=57.0300, lon=9.9500, kind=SiteKind.CARRIER_DEPOT)
GLS = Site(id="gls", name="GLS test depot", lat=57.0300, lon=9.9700, kind=SiteKind.CARRIER_DEPOT)
NORDVAERK = Site(id="nordvaerk", name="Nordværk test site", lat=57.0250, lon=9.9600, kind=SiteKind.WASTE_FACILITY)

# Where the test boxes stand: NEAR is the closest to both depots; NEXT is ~0.8 road km from NEAR (inside
# the 2 km redirect radius) and farther from the depots; FAR is ~4.3 road km from NEAR (outside it).
NEAR = (57.0400, 9.9500)
NEXT = (57.0450, 9.9550)
FAR = (57.0700, 9.9500)

#: Every process off but daily rounds of one carrier (PostNord at 09:00), constant 5 h dwell.
BASE: dict[str, Any] = {
    "name": "tiny",
    "simulation": {"days": 3, "seed": 7},
    "network": {"road_factor": ROAD_FACTOR},
    "demand": {
        "parcels_per_household_year": 0.0,
        "locker_share": 1.0,
        "sends_per_household_year": 0.0,
        "weekday_profile": [1.0] * 7,
        "hour_profile": [1.0] * 24,
    },
    "pickup": {"dwell_h": {"kind": "constant", "mean": 5.0}, "window_h": 72.0},
    "delivery": {
        "carriers": {
            "postnord": {
                "share": 1.0,
                "depot": "postnord",
                "round_hours": [9.0],
                "round_days": [0, 1, 2, 3, 4, 5, 6],
                "speed_kmh": VAN_KMH,
                "stop_min": 4.0,
            }
        }
    },
    "waste": {"deposits_per_user_year": 0.0, "max_wait_h": 1e6},
    "faults": {"box_offline_mtbf_days": 1e9, "door_jam_mtbf_days": 1e9},
}
GLS_AT_NOON: dict[str, Any] = {
    "share": 0.5,
    "depot": "gls",
    "round_hours": [12.0],
    "round_days": [0, 1, 2, 3, 4, 5, 6],
    "speed_kmh": VAN_KMH,
    "stop_min": 4.0,
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, table by table."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def scenario(**sections: Any) -> Scenario:
    """The BASE scenario with some sections overridden (nested tables merge)."""
    return Scenario.model_validate(merged(BASE, sections))


def two_carriers(**extra: Any) -> dict[str, Any]:
    """The delivery section with PostNord (09:00) and GLS (12:00) sharing the parcels."""
    return {"carriers": {"postnord": {"share": 0.5}, "gls": GLS_AT_NOON}, **extra}


def box(box_id: str, where: tuple[float, float], layout: BoxLayout, households: int = 100) -> Box:
    return Box(
        id=box_id,
        name=box_id,
        area="Test",
        side=FjordSide.SOUTH,
        lat=where[0],
        lon=where[1],
        households=households,
        layout=layout,
    )


def network(*boxes: Box) -> Network:
    return Network(boxes=list(boxes), depots={s.id: s for s in (POSTNORD, GLS, NORDVAERK)}, recycling_stations=[])


def world(sc: Scenario, net: Network) -> tuple[Any, World, MemorySink]:
    """A fresh environment with the world built in it (nothing has run yet)."""
    env = simpy.Environment()
    sink = MemorySink()
    return env, World(env, sc, net, sink), sink


def run(sc: Scenario, net: Network, *parcels: Parcel) -> list[Record]:
    """Run to the horizon with ``parcels`` waiting at their carriers' depots; the records."""
    env, w, sink = world(sc, net)
    at_depot(w, *parcels)
    env.run(until=w.horizon)
    return sink.records


def at_depot(w: World, *parcels: Parcel) -> None:
    """Put parcels at their carrier's depot (the model's backlog of parcels brought back): the next
    round of that carrier takes them out first, before any it draws itself."""
    for parcel in parcels:
        w._backlog[parcel.carrier].append(parcel)


def parcel(pid: str, size: SizeClass = SizeClass.A, carrier: str = "postnord", to: int = 0) -> Parcel:
    return Parcel(pid, size, carrier, to)


def road(a: tuple[float, float] | Site, b: tuple[float, float] | Site) -> float:
    """Road km between two places, as the scenario counts them."""
    pa = (a.lat, a.lon) if isinstance(a, Site) else a
    pb = (b.lat, b.lon) if isinstance(b, Site) else b
    return haversine_km(pa[0], pa[1], pb[0], pb[1]) * ROAD_FACTOR


def drive(km: float, kmh: float = VAN_KMH) -> float:
    return km / kmh * HOUR


def at(t: float) -> Any:
    """A time expectation, to a microsecond."""
    return pytest.approx(t, abs=1e-6)


def only(records: Iterable[Record], *kinds: str) -> list[Record]:
    return [r for r in records if r[2] in kinds]


def log(records: Iterable[Record], *kinds: str) -> list[tuple[Any, str | None, str, dict[str, Any]]]:
    """The records of these kinds, in order (as plain tuples, to compare with expectations)."""
    return [(t, b, k, d) for t, b, k, d in records if k in kinds]


PARCEL_KINDS = (
    "parcel.deposited",
    "parcel.collected",
    "parcel.expired",
    "parcel.redirected",
    "parcel.returned_to_depot",
    "parcel.dropped_off",
    "parcel.picked_up",
)


# ---------------------------------------------------------------------------------------- deliveries


def test_parcel_delivered_at_round_time_plus_travel_and_collected_after_constant_dwell() -> None:
    """A parcel leaves with the 09:00 round, is deposited on arrival, collected exactly 5 h later."""
    records = run(scenario(), network(box("aal-901", NEAR, build_layout(1, 1, 1))), parcel("P-1"))
    leg = road(POSTNORD, NEAR)
    arrive = 9 * HOUR + drive(leg)
    assert log(records, *PARCEL_KINDS) == [
        (
            at(arrive),
            "aal-901",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-1", "carrier": "postnord"},
        ),
        (at(arrive + 5 * HOUR), "aal-901", "parcel.collected", {"compartment": 3, "parcel_id": "P-1"}),
    ]
    [trip] = only(records, "van.trip")
    assert trip[0] == at(arrive + STOP_S + drive(leg))
    assert trip[3]["trip"] == "round"
    assert trip[3]["depart_s"] == 9 * HOUR
    assert (trip[3]["delivered"], trip[3]["stops"], trip[3]["boxes"]) == (1, 1, ["aal-901"])


def test_demand_parcels_arrive_with_their_carriers_round_and_leave_after_the_dwell() -> None:
    """Parcels the model draws are all deposited when their carrier's van reaches the box, and each is
    collected exactly one dwell later."""
    sc = scenario(
        simulation={"days": 4},
        demand={"parcels_per_household_year": 365 * 8 / 100},  # 8 a day for the box
        delivery=two_carriers(),
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(6, 6, 6))))
    arrivals = {
        "postnord": {d * DAY + 9 * HOUR + drive(road(POSTNORD, NEAR)) for d in range(4)},
        "gls": {d * DAY + 12 * HOUR + drive(road(GLS, NEAR)) for d in range(4)},
    }
    deposited = only(records, "parcel.deposited")
    assert len(deposited) >= 16
    assert {d["carrier"] for _, _, _, d in deposited} == {"postnord", "gls"}
    for t, _, _, data in deposited:
        assert min(abs(t - a) for a in arrivals[data["carrier"]]) < 1e-6
    when = {d["parcel_id"]: t for t, _, _, d in deposited}
    collected = only(records, "parcel.collected")
    assert collected
    for t, _, _, data in collected:
        assert t == at(when[data["parcel_id"]] + 5 * HOUR)


def test_uncollected_parcel_expires_and_goes_back_with_its_own_carriers_next_van() -> None:
    """A parcel whose dwell exceeds the 20 h window waits in its door and leaves with the next van of its
    own carrier (parcel.expired carrier=<it>), not with another carrier's van that calls first."""
    sc = scenario(pickup={"dwell_h": {"kind": "constant", "mean": 100.0}, "window_h": 20.0}, delivery=two_carriers())
    records = run(sc, network(box("aal-901", NEAR, build_layout(2, 0, 0))), parcel("P-1"), parcel("G-1", carrier="gls"))
    pn, gls = drive(road(POSTNORD, NEAR)), drive(road(GLS, NEAR))
    assert log(records, *PARCEL_KINDS) == [
        (
            at(9 * HOUR + pn),
            "aal-901",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-1", "carrier": "postnord"},
        ),
        (
            at(12 * HOUR + gls),
            "aal-901",
            "parcel.deposited",
            {"compartment": 4, "size_class": "A", "parcel_id": "G-1", "carrier": "gls"},
        ),
        (
            at(DAY + 9 * HOUR + pn),
            "aal-901",
            "parcel.expired",
            {"compartment": 3, "parcel_id": "P-1", "carrier": "postnord"},
        ),
        (
            at(DAY + 12 * HOUR + gls),
            "aal-901",
            "parcel.expired",
            {"compartment": 4, "parcel_id": "G-1", "carrier": "gls"},
        ),
    ]
    day1 = [(d["carrier"], d["picked_up"]) for t, _, _, d in only(records, "van.trip") if t > DAY]
    assert day1 == [("postnord", 1), ("gls", 1)]


def test_full_box_redirects_parcel_to_next_box_of_the_round_within_radius() -> None:
    """A parcel that finds its box full is redirected to the next stop of the round within 2 km and
    deposited there, after that box's own parcels (they have first claim on its doors)."""
    net = network(box("aal-901", NEAR, build_layout(1, 0, 0)), box("aal-902", NEXT, build_layout(2, 0, 0)))
    records = run(scenario(), net, parcel("P-1"), parcel("P-2"), parcel("P-3", to=1))
    t1 = 9 * HOUR + drive(road(POSTNORD, NEAR))
    t2 = t1 + STOP_S + drive(road(NEAR, NEXT))
    assert log(records, "parcel.deposited", "parcel.redirected", "parcel.returned_to_depot") == [
        (
            at(t1),
            "aal-901",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-1", "carrier": "postnord"},
        ),
        (at(t1), "aal-901", "parcel.redirected", {"parcel_id": "P-2", "carrier": "postnord"}),
        (
            at(t2),
            "aal-902",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-3", "carrier": "postnord"},
        ),
        (
            at(t2),
            "aal-902",
            "parcel.deposited",
            {"compartment": 4, "size_class": "A", "parcel_id": "P-2", "carrier": "postnord"},
        ),
    ]


def test_full_box_without_room_nearby_returns_parcel_to_depot_and_delivers_it_next_round() -> None:
    """With no other stop inside the radius, the parcel goes back to the depot and out with the next
    round, into the door the first parcel's resident has emptied meanwhile."""
    net = network(box("aal-901", NEAR, build_layout(1, 0, 0)), box("aal-903", FAR, build_layout(2, 0, 0)))
    records = run(scenario(), net, parcel("P-1"), parcel("P-2"), parcel("P-3", to=1))
    near, far, back = road(POSTNORD, NEAR), road(NEAR, FAR), road(FAR, POSTNORD)
    t1 = 9 * HOUR + drive(near)
    home = t1 + STOP_S + drive(far) + STOP_S + drive(back)
    t_next = DAY + 9 * HOUR + drive(near)
    assert log(records, "parcel.deposited", "parcel.redirected", "parcel.returned_to_depot") == [
        (
            at(t1),
            "aal-901",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-1", "carrier": "postnord"},
        ),
        (
            at(t1 + STOP_S + drive(far)),
            "aal-903",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-3", "carrier": "postnord"},
        ),
        (at(home), "aal-901", "parcel.returned_to_depot", {"parcel_id": "P-2", "carrier": "postnord"}),
        (
            at(t_next),
            "aal-901",
            "parcel.deposited",
            {"compartment": 3, "size_class": "A", "parcel_id": "P-2", "carrier": "postnord"},
        ),
    ]


@pytest.mark.parametrize(
    ("sizes", "doors", "returned"),
    [
        ("AAAA", [3, 4, 5], ["P-4"]),  # A fills A, then B, then C; a fourth has no door
        ("BA", [4, 3], []),  # the A parcel still gets the A door
        ("BB", [4, 5], []),  # B overflows into C, never into A
        ("CC", [5], ["P-2"]),  # C never goes into A or B, even when they are free
    ],
)
def test_parcels_get_the_smallest_free_compartment_that_fits(sizes: str, doors: list[int], returned: list[str]) -> None:
    """Each parcel gets the smallest free door that fits it (A 3, B 4, C 5); none fits -> back to depot."""
    parcels = [parcel(f"P-{i}", SizeClass(s)) for i, s in enumerate(sizes, start=1)]
    records = run(scenario(simulation={"days": 0.5}), network(box("aal-901", NEAR, build_layout(1, 1, 1))), *parcels)
    assert [d["compartment"] for _, _, _, d in only(records, "parcel.deposited")] == doors
    assert [d["parcel_id"] for _, _, _, d in only(records, "parcel.returned_to_depot")] == returned


# ---------------------------------------------------------------------------------------- sends


def test_send_is_picked_up_by_the_next_van_of_its_carrier() -> None:
    """A resident's send (parcel.dropped_off) leaves with the first van of its own carrier that reaches
    the box after the drop-off (parcel.picked_up with that carrier)."""
    sc = scenario(
        simulation={"days": 5},
        demand={"sends_per_household_year": 365 * 6 / 100},  # 6 a day
        delivery=two_carriers(),
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(4, 4, 4))))
    legs = {"postnord": drive(road(POSTNORD, NEAR)), "gls": drive(road(GLS, NEAR))}
    arrivals = {
        c: sorted(d["depart_s"] + legs[c] for _, _, _, d in only(records, "van.trip") if d["carrier"] == c)
        for c in legs
    }
    dropped = {d["parcel_id"]: (t, d) for t, _, _, d in only(records, "parcel.dropped_off")}
    picked = only(records, "parcel.picked_up")
    assert len(picked) >= 8
    assert {d["carrier"] for _, _, _, d in picked} == {"postnord", "gls"}
    for t, _, _, data in picked:
        t_drop, drop = dropped[data["parcel_id"]]
        assert (data["carrier"], data["compartment"]) == (drop["carrier"], drop["compartment"])
        assert t == at(min(a for a in arrivals[data["carrier"]] if a > t_drop))
    # every send dropped off before the last van of its carrier left was picked up
    for pid, (t_drop, drop) in dropped.items():
        if t_drop < max(arrivals[drop["carrier"]]):
            assert pid in {d["parcel_id"] for _, _, _, d in picked}


# ---------------------------------------------------------------------------------------- waste


def constant_waste(kg: float, per_hour: float = 2.0, **extra: Any) -> dict[str, Any]:
    """A waste section: deposits of ``kg`` (batteries) at ``per_hour`` per box of 100 households."""
    return {
        "adoption": 1.0,
        "deposits_per_user_year": per_hour * 24 * 365 / 100,
        "fractions": {"batteries": {"share": 1.0, "weight_kg": {"kind": "constant", "mean": kg}}},
        **extra,
    }


def test_waste_fills_the_emptiest_red_box_and_is_refused_when_neither_has_room() -> None:
    """1.5 kg deposits alternate between the two 4 kg red boxes; a third one each would exceed 4 kg,
    so from then on every deposit is refused (waste.refused)."""
    sc = scenario(simulation={"days": 0.5}, waste=constant_waste(1.5))
    records = run(sc, network(box("aal-901", NEAR, build_layout(1, 0, 0))))
    seq = [
        (k, d.get("compartment"), d["weight_kg"]) for _, _, k, d in only(records, "waste.deposited", "waste.refused")
    ]
    assert len(seq) > 6
    assert seq[:4] == [("waste.deposited", 1, 1.5), ("waste.deposited", 2, 1.5)] * 2
    assert set(seq[4:]) == {("waste.refused", None, 1.5)}
    [refused, *_] = only(records, "waste.refused")
    assert refused[3] == {"fraction": "batteries", "weight_kg": 1.5, "reason": "red_box_full"}


def test_waste_that_would_overfill_one_red_box_goes_into_the_other() -> None:
    """With a 2 kg red box at door 1 and a 4 kg one at door 2, the third 1.5 kg deposit would overfill
    door 1 (tied as emptiest) and goes into door 2; the fourth fits nowhere and is refused."""
    layout = BoxLayout(
        compartments=[
            Compartment(id=1, kind=CompartmentKind.RED_BOX, capacity_kg=2.0),
            Compartment(id=2, kind=CompartmentKind.RED_BOX),
            Compartment(id=3, kind=CompartmentKind.PARCEL, size_class=SizeClass.A),
        ]
    )
    sc = scenario(simulation={"days": 0.5}, waste=constant_waste(1.5))
    records = run(sc, network(box("aal-901", NEAR, layout)))
    seq = [(k, d.get("compartment")) for _, _, k, d in only(records, "waste.deposited", "waste.refused")]
    assert seq[:4] == [("waste.deposited", 1), ("waste.deposited", 2), ("waste.deposited", 2), ("waste.refused", None)]


@pytest.mark.parametrize(
    ("van_capacity", "hazardous_limit_kg", "doors"),
    [
        (120, 40.0, [1, 2]),  # room for both 3 kg red boxes
        (120, 5.0, [1]),  # dangerous-goods room for one 3 kg box only
        (120, 2.0, []),  # not even for one
        (1, 40.0, [1]),  # after delivering its one parcel the van has room for one red box
    ],
)
def test_ready_red_box_is_collected_by_a_visiting_van_with_room(
    van_capacity: int, hazardous_limit_kg: float, doors: list[int]
) -> None:
    """Red boxes holding 3 kg (ready at 2 kg) go with the 09:00 van as far as its spare capacity and
    dangerous-goods limit allow (waste.collected carrier=postnord, at the van's arrival)."""
    carrier = {"van_capacity": van_capacity, "hazardous_limit_kg": hazardous_limit_kg}
    sc = scenario(
        simulation={"days": 0.5},
        waste=constant_waste(1.5),
        delivery={"carriers": {"postnord": carrier}},
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(1, 0, 0))), parcel("P-1"))
    arrive = 9 * HOUR + drive(road(POSTNORD, NEAR))
    before = [(d["compartment"], d["weight_kg"]) for t, _, _, d in only(records, "waste.deposited") if t < arrive]
    assert sorted(before) == [(1, 1.5), (1, 1.5), (2, 1.5), (2, 1.5)]  # both boxes ready, 3 kg each
    assert log(records, "waste.collected") == [
        (at(arrive), "aal-901", "waste.collected", {"compartment": door, "carrier": "postnord", "weight_kg": 3.0})
        for door in doors
    ]
    [trip] = only(records, "van.trip")
    assert (trip[3]["red_boxes"], trip[3]["waste_kg"]) == (len(doors), 3.0 * len(doors))


def test_red_box_left_ready_past_max_wait_is_fetched_by_one_dedicated_trip() -> None:
    """A red box the van may not take (DG limit 1 kg) and that stays ready for max_wait_h = 24 h makes
    Nordværk's truck fetch it: one dedicated trip per time it became ready, at exactly ready + 24 h."""
    sc = scenario(
        simulation={"days": 4},
        waste=constant_waste(2.0, per_hour=1.0, max_wait_h=24.0),
        delivery={"carriers": {"postnord": {"hazardous_limit_kg": 1.0}}},
    )
    net = network(box("aal-901", NEAR, build_layout(1, 0, 0, red_boxes=1)))
    records = run(sc, net, parcel("P-1"))
    # 2 kg fills the single 4 kg red box to its ready share (50%) at once: ready at each first deposit
    ready, kg = [], 0.0
    for t, _, k, d in only(records, "waste.deposited", "waste.collected"):
        if k == "waste.collected":
            kg = 0.0
            continue
        if kg == 0.0:
            ready.append(t)
        kg += d["weight_kg"]
    van = [t for t, _, _, d in only(records, "van.trip") if d["carrier"] == "postnord"]
    assert van
    assert ready[0] < 9 * HOUR  # the van called while the red box was ready and left it
    leg = road(NORDVAERK, NEAR)
    trips = [(t, d) for t, _, _, d in only(records, "van.trip") if d["trip"] == "dedicated_waste"]
    collected = only(records, "waste.collected")
    assert len(trips) >= 2
    for (t, trip), t_ready in zip(trips, ready, strict=False):
        assert trip["depart_s"] == pytest.approx(t_ready + 24 * HOUR, abs=1e-3)
        assert t == at(t_ready + 24 * HOUR + 2 * drive(leg, TRUCK_KMH))
        assert trip["km"] == pytest.approx(2 * leg, abs=1e-3)
        assert (trip["carrier"], trip["vehicle"], trip["boxes"], trip["red_boxes"]) == (
            "nordvaerk",
            "waste_truck",
            ["aal-901"],
            1,
        )
    assert [t for t, *_ in collected] == [at(r + 24 * HOUR + drive(leg, TRUCK_KMH)) for r in ready[: len(collected)]]
    assert {(d["carrier"], d["compartment"]) for *_, d in collected} == {("nordvaerk", 1)}


# ---------------------------------------------------------------------------------------- faults


def test_door_jam_takes_a_free_door_out_of_service_until_repaired() -> None:
    """A jam takes a free door out of service (compartment.fault jammed_door), a constant 10 h repair
    brings it back (compartment.restored), and no parcel goes into a jammed door meanwhile."""
    sc = scenario(
        simulation={"days": 7},
        demand={"parcels_per_household_year": 365 * 6 / 100, "sends_per_household_year": 365 / 100},
        faults={"door_jam_mtbf_days": 0.25, "repair_h": {"kind": "constant", "mean": 10.0}},
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(2, 2, 2))))
    occupied: set[int] = set()
    jammed: dict[int, float] = {}
    faults = 0
    used_while_jammed = 0
    for t, _, kind, data in records:
        door: int = data.get("compartment", 0)
        if kind in ("parcel.deposited", "parcel.dropped_off"):
            assert door not in jammed
            used_while_jammed += bool(jammed)
            occupied.add(door)
        elif kind in ("parcel.collected", "parcel.expired", "parcel.picked_up"):
            occupied.remove(door)
        elif kind == "compartment.fault":
            assert data == {"compartment": door, "fault": "jammed_door"}
            assert door not in occupied
            assert not jammed  # one jam at a time per box
            jammed[door] = t
            faults += 1
        elif kind == "compartment.restored":
            assert t == at(jammed.pop(door) + 10 * HOUR)
    assert faults >= 3
    assert used_while_jammed > 0  # the box stayed in use around the jammed door


def test_box_goes_offline_and_comes_back_after_the_outage() -> None:
    """box.offline and box.online alternate, each outage lasting the constant 3 h."""
    sc = scenario(
        simulation={"days": 10},
        faults={"box_offline_mtbf_days": 0.5, "box_offline_h": {"kind": "constant", "mean": 3.0}},
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(1, 1, 1))))
    seq = only(records, "box.offline", "box.online")
    assert len(seq) >= 10
    assert [k for _, _, k, _ in seq[:10]] == ["box.offline", "box.online"] * 5
    for (t_off, box_off, _, d_off), (t_on, box_on, _, d_on) in zip(seq[::2], seq[1::2], strict=False):
        assert (box_off, box_on, d_off, d_on) == ("aal-901", "aal-901", {}, {})
        assert t_on == at(t_off + 3 * HOUR)


# ---------------------------------------------------------------------------------------- trips


def test_van_trip_km_is_the_route_depot_stops_depot_by_road_factor() -> None:
    """van.trip km = haversine x road factor over depot -> stops (nearest first) -> depot, and the trip
    ends after driving it at 25 km/h plus 4 minutes per stop."""
    net = network(
        box("aal-903", FAR, build_layout(1, 0, 0)),
        box("aal-902", NEXT, build_layout(1, 0, 0)),
        box("aal-901", NEAR, build_layout(1, 0, 0)),
    )
    records = run(scenario(simulation={"days": 0.5}), net, parcel("P-1"), parcel("P-2", to=1), parcel("P-3", to=2))
    route: list[tuple[float, float] | Site] = [POSTNORD, NEAR, NEXT, FAR, POSTNORD]
    km = sum(road(a, b) for a, b in pairwise(route))
    [(t, box_id, _, trip)] = only(records, "van.trip")
    assert box_id is None
    assert trip["boxes"] == ["aal-901", "aal-902", "aal-903"]
    assert trip["km"] == pytest.approx(km, abs=1e-3)
    assert t == at(9 * HOUR + drive(km) + 3 * STOP_S)
    assert {k: trip[k] for k in ("carrier", "van", "vehicle", "stops", "delivered", "picked_up")} == {
        "carrier": "postnord",
        "van": 0,
        "vehicle": "diesel_van",
        "stops": 3,
        "delivered": 3,
        "picked_up": 0,
    }


# ---------------------------------------------------------------------------------------- telemetry


def test_telemetry_every_interval_reports_the_box_state() -> None:
    """Telemetry every 30 min lists every parcel door (occupied, in service) and each red box's weight
    exactly as the events before it left the box."""
    sc = scenario(
        simulation={"days": 4, "telemetry_interval_min": 30},
        demand={"parcels_per_household_year": 365 * 6 / 100, "sends_per_household_year": 365 / 100},
        waste={"adoption": 1.0, "deposits_per_user_year": 365 * 4 / 100, "ready_share": 0.3},
        faults={"door_jam_mtbf_days": 0.5, "repair_h": {"kind": "constant", "mean": 8.0}},
    )
    records = run(sc, network(box("aal-901", NEAR, build_layout(2, 2, 2))))
    occupied: set[int] = set()
    jammed: set[int] = set()
    red = {1: 0.0, 2: 0.0}
    readings = 0
    for t, _, kind, data in records:
        door: int = data.get("compartment", 0)
        if kind in ("parcel.deposited", "parcel.dropped_off"):
            occupied.add(door)
        elif kind in ("parcel.collected", "parcel.expired", "parcel.picked_up"):
            occupied.remove(door)
        elif kind == "compartment.fault":
            jammed.add(door)
        elif kind == "compartment.restored":
            jammed.remove(door)
        elif kind == "waste.deposited":
            red[door] = round(red[door] + data["weight_kg"], 3)
        elif kind == "waste.collected":
            red[door] = 0.0
        elif kind == "telemetry":
            assert t == at(readings * 1800.0)
            readings += 1
            assert data["compartments"] == [
                {"id": d, "occupied": d in occupied, "door_open": False, "in_service": d not in jammed}
                for d in range(3, 9)
            ]
            assert data["red_boxes"] == [{"compartment": d, "weight_kg": pytest.approx(red[d])} for d in (1, 2)]
    assert readings == 4 * 48
    kinds = {k for _, _, k, _ in records}
    assert {"parcel.deposited", "parcel.dropped_off", "compartment.fault", "waste.collected"} <= kinds


# ---------------------------------------------------------------------------------------- whole runs


def small_default(*overrides: str) -> Scenario:
    """The bundled Aalborg scenario cut to 5 boxes and 7 days, with hourly telemetry."""
    return resolve(
        overrides=["network.boxes=5", "simulation.days=7", "simulation.telemetry_interval_min=60", *overrides]
    )


def records_of(sc: Scenario) -> list[Record]:
    sink = MemorySink()
    run_batch(sc, sink)
    return sink.records


def test_same_scenario_and_seed_give_identical_records() -> None:
    """Two runs of one scenario and seed produce the very same records."""
    first, second = records_of(small_default()), records_of(small_default())
    assert len(first) > 1000
    assert first == second


def test_same_scenario_and_seed_give_identical_csv_bytes(tmp_path: Path) -> None:
    """Two runs of one scenario and seed write byte-identical CSV traces."""
    sc = small_default()
    texts = []
    for name in ("a.csv", "b.csv"):
        sink = FileSink(tmp_path / name, sc.simulation.start)
        try:
            run_batch(sc, sink)
        finally:
            sink.close()
        texts.append((tmp_path / name).read_bytes())
    assert texts[0].startswith(b"ts_ms,t_s,box_id,kind,data\n")
    assert texts[0].count(b"\n") > 1000
    assert texts[0] == texts[1]


def test_another_seed_gives_other_records() -> None:
    """Changing only the seed changes the run."""
    assert records_of(small_default()) != records_of(small_default("simulation.seed=2"))


#: Kinds the model records that are not contract events (documented in simulator/model.py).
SIMULATION_KINDS = {
    "van.trip",
    "parcel.redirected",
    "parcel.returned_to_depot",
    "parcel.refused",
    "waste.refused",
    "box.offline",
    "box.online",
}


def test_box_events_are_valid_contract_messages_for_the_boxes_layout() -> None:
    """Every record whose kind is a contract event type is a valid payload (as its JSON arrives on the
    wire), wraps into a valid envelope, round-trips through encode/decode and passes check_layout
    against its box's layout; every other record kind is a documented simulation-only kind."""
    sc = resolve(
        overrides=[
            "network.boxes=6",
            "simulation.days=14",
            "simulation.telemetry_interval_min=240",
            "faults.door_jam_mtbf_days=3",
            "faults.box_offline_mtbf_days=3",
            "waste.adoption=1",
            "waste.deposits_per_user_year=4",
            "demand.sends_per_household_year=6",
        ]
    )
    layouts = {b.id: b.layout for b in network_for(sc).boxes}
    records = records_of(sc)
    seq: dict[str, int] = {}
    seen: set[str] = set()
    for t, box_id, kind, data in records:
        if kind not in EVENT_TYPES:
            assert kind in SIMULATION_KINDS
            continue
        assert box_id is not None
        seen.add(kind)
        seq[box_id] = seq.get(box_id, 0) + 1
        # The trace is JSON; so is the wire: validate as the receiver does (strict, from JSON).
        payload = PAYLOAD_BY_TYPE[kind].model_validate_json(json.dumps(data))
        event = make_event(
            box_id=box_id, seq=seq[box_id], session=1, ts_ms=to_ms(sc.simulation.start, t), payload=payload
        )
        check_layout(event, layouts[box_id])
        assert decode_event(encode(event), topic_box_id=box_id) == event
    assert seen == {
        "parcel.deposited",
        "parcel.collected",
        "parcel.expired",
        "parcel.dropped_off",
        "parcel.picked_up",
        "waste.deposited",
        "waste.collected",
        "compartment.fault",
        "compartment.restored",
        "telemetry",
    }


def test_reporting_progress_changes_no_record() -> None:
    """A run that stops at every simulated midnight to report progress emits exactly the records of one
    that runs straight through, and reports each day once, ending at the horizon."""
    scenario = resolve(overrides=["simulation.days=9.5", "network.boxes=12"])
    straight, stepped = MemorySink(), MemorySink()
    reported: list[tuple[float, float]] = []
    run_batch(scenario, straight)
    run_batch(scenario, stepped, progress=lambda done, total: reported.append((done, total)))
    assert stepped.records == straight.records
    assert len(straight.records) > 1000
    assert reported == [(float(d), 9.5) for d in range(1, 10)] + [(9.5, 9.5)]
