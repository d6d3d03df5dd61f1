"""The trip and CO2 method on hand-made days, with every expected number written out from the
formulas of docs/methodology.md (no services needed).

The geography puts everything on the meridian 10 E, so road km are easy: with road factor 1 and no
distance adjustment, 0.01 degree of latitude is U = 6371.0088 x 0.01 x pi/180 = 1.11195 km.
"""

from __future__ import annotations

import math
from datetime import date

import pytest

from accounting import BoxDay, Geography, Method, Point, apply_overrides, assess, summarize, to_csv
from accounting.factors import Factors
from accounting.method import Line

U = 6371.0088 * math.radians(0.01)
DAY = date(2026, 3, 2)
GEO = Geography(
    boxes={"x": Point(57.01, 10.0), "y": Point(57.02, 10.0), "z": Point(57.03, 10.0)},
    depots={"gls": Point(57.0, 10.0), "nordvaerk": Point(57.0, 10.0)},
    recycling_stations=[Point(57.04, 10.0)],
)
DIESEL_VAN_WTW = 0.256 / 2.571 * 3.24  # L/vkm x kg/L
DIESEL_VAN_TTW = 0.256
CAR_WTW, CAR_TTW = 0.065 * 3.24, 0.065 * 2.571
TRUCK_WTW = 1.0 * 3.24


def method(*sets: str) -> Method:
    """The default method on plain distances (road factor 1, no GLEC adjustment), plus ``sets``."""
    return apply_overrides(Method(), ["road_factor=1.0", "distance_adjustment=0.0", *sets])


def lines(days: list[BoxDay], m: Method, scenario: str, vehicle: str | None = None) -> list[Line]:
    return [ln for ln in assess(days, GEO, m).lines if ln.scenario == scenario and vehicle in (None, ln.vehicle)]


def vkm(ls: list[Line], category: str | None = None, box: str | None = None) -> float:
    return sum(ln.vkm for ln in ls if category in (None, ln.category) and box in (None, ln.box_id))


def test_intensities_follow_energy_use_times_factor() -> None:
    """Diesel van WTW = 0.0996 L/vkm x 3.24 kg/L, TTW = 0.256; electric van WTW = 0.24 kWh x 0.096 kg,
    TTW 0; an electric share mixes the two linearly; the truck burns 1 L/km."""
    f = Factors()
    assert f.intensity("diesel_van") == pytest.approx((DIESEL_VAN_WTW, DIESEL_VAN_TTW))
    assert f.intensity("electric_van") == pytest.approx((0.24 * 0.096, 0.0))
    assert method("van_electric_share=0.25").intensity("van") == pytest.approx(
        (0.75 * DIESEL_VAN_WTW + 0.25 * 0.02304, 0.75 * DIESEL_VAN_TTW)
    )
    assert method().intensity("truck") == pytest.approx((TRUCK_WTW, 2.571))
    with pytest.raises(KeyError, match="unknown vehicle category 'bike'"):
        f.intensity("bike")


def test_shared_tour_is_split_by_load_times_distance() -> None:
    """Depot -> x (10 A parcels, 1 kg each) -> y (2 B parcels of 3 kg, a 3.5 kg red box + 0.5 kg tare)
    -> depot is 4U; weights: x 10 kg x 1U, y parcels 6 kg x 2U, y waste 4 kg x 2U (sum 30U kg): waste
    gets 8/30 of the tour, one van trip in all."""
    days = [
        BoxDay(DAY, "x", "gls", deposited_a=10),
        BoxDay(DAY, "y", "gls", deposited_b=2, waste_collections=1, waste_collected_kg=3.5),
    ]
    project = lines(days, method(), "project", "van")
    assert vkm(project) == pytest.approx(4 * U)
    assert vkm(project, "hazardous_waste") == pytest.approx(4 * U * 8 / 30)
    assert vkm(project, "parcel_delivery", "x") == pytest.approx(4 * U * 10 / 30)
    assert vkm(project, "parcel_delivery", "y") == pytest.approx(4 * U * 12 / 30)
    assert sum(ln.trips for ln in project) == pytest.approx(1.0)


def test_marginal_allocation_charges_waste_only_its_detour() -> None:
    """Marginal: a red box taken where the van stopped for parcels anyway costs 0 km; a waste-only
    stop z costs its cheapest insertion into depot -> x -> depot: d(x,z) + d(z,depot) - d(x,depot)
    = 2U + 3U - 1U = 4U. The tour depot -> x -> z -> depot (6U) keeps its total."""
    shared = [BoxDay(DAY, "x", "gls", deposited_a=3, waste_collections=1, waste_collected_kg=2.0)]
    assert vkm(lines(shared, method("allocation='marginal'"), "project", "van"), "hazardous_waste") == 0.0
    detour = [
        BoxDay(DAY, "x", "gls", deposited_a=3),
        BoxDay(DAY, "z", "gls", waste_collections=1, waste_collected_kg=2.0),
    ]
    project = lines(detour, method("allocation='marginal'"), "project", "van")
    assert vkm(project) == pytest.approx(6 * U)
    assert vkm(project, "hazardous_waste") == pytest.approx(4 * U)
    assert vkm(project, "parcel_delivery") == pytest.approx(2 * U)
    # The same tour split by load x distance: waste 2.5 kg x 3U against parcels 3 kg x 1U.
    by_load = lines(detour, method(), "project", "van")
    assert vkm(by_load, "hazardous_waste") == pytest.approx(6 * U * 7.5 / 10.5)


def test_baseline_trip_to_the_recycling_station() -> None:
    """Two red-box deposits at x, station 3U away: 2 x 0.6 car trips, each 2 x 3U km by car, and
    2 x 0.4 on foot, by bike or bus; with the hub the residents walk or drive 1 km to the box with 26%
    by car. Only the car trips are vehicle trips; the others have no CO2."""
    days = [BoxDay(DAY, "x", None, waste_deposits=2, waste_deposit_kg=1.2)]
    base = lines(days, method(), "baseline")
    assert [(ln.vehicle, ln.category) for ln in base] == [("car", "hazardous_waste"), ("walk_cycle", "hazardous_waste")]
    assert (base[0].trips, base[1].trips) == pytest.approx((1.2, 0.8))
    assert (base[0].vkm, base[1].vkm) == pytest.approx((1.2 * 6 * U, 0.8 * 6 * U))
    assert base[0].stops == base[1].stops == 0.0
    project = lines(days, method(), "project")
    assert (project[0].trips, project[1].trips) == pytest.approx((0.52, 1.48))
    assert project[0].vkm == pytest.approx(0.52)
    modes = summarize(assess(days, GEO, method()))["modes"]
    assert modes["walk_cycle"]["avoided"]["trips"] == pytest.approx(0.8 - 1.48)
    assert modes["walk_cycle"]["project"]["kg_co2e_wtw"] == 0.0
    assert modes["walk_cycle"]["motorised"] is False
    assert modes["car"]["actor"] == "residents"
    s = summarize(assess(days, GEO, method()))
    assert s["categories"]["hazardous_waste"]["avoided"]["kg_co2e_wtw"] == pytest.approx(
        (1.2 * 6 * U - 0.52) * CAR_WTW, rel=1e-6
    )
    assert s["categories"]["hazardous_waste"]["avoided"]["kg_co2e_ttw"] == pytest.approx(
        (1.2 * 6 * U - 0.52) * CAR_TTW, rel=1e-6
    )


def test_dedicated_round_baseline_is_one_truck_round_a_day() -> None:
    """Red boxes taken at x and y on one day: the waste company's baseline round depot -> x -> y ->
    depot is 4U at 1 L/km, split by mass x distance (x 2.5 kg x 1U, y 4.5 kg x 2U)."""
    days = [
        BoxDay(DAY, "x", "gls", deposited_a=1, waste_collections=1, waste_collected_kg=2.0),
        BoxDay(DAY, "y", "gls", deposited_a=1, waste_collections=1, waste_collected_kg=4.0),
    ]
    trucks = lines(days, method("baseline.waste='dedicated_round'"), "baseline", "truck")
    assert vkm(trucks) == pytest.approx(4 * U)
    assert vkm(trucks, box="x") == pytest.approx(4 * U * 2.5 / 11.5)
    assert sum(ln.trips for ln in trucks) == pytest.approx(1.0)
    mixed = lines(days, method("baseline.waste='mixed'", "baseline.waste_resident_share=0.25"), "baseline", "truck")
    assert vkm(mixed) == pytest.approx(0.75 * 4 * U)
    s = summarize(assess(days, GEO, method("baseline.waste='dedicated_round'")))
    assert s["modes"]["truck"]["baseline"]["kg_co2e_wtw"] == pytest.approx(4 * U * TRUCK_WTW, rel=1e-6)


def test_bin_bag_and_residual_bin_baselines_leave_only_the_rest_to_the_station() -> None:
    """Ten deposits at x (station 3U away): under ``bin_bag`` the bin round takes 73% at no trip, so
    2.7 deposits go to the station (0.6 by car: 1.62 car trips of 6U); under ``residual_bin`` nothing
    travels in the baseline, so the box's own trips (2.6 by car, 1 km) and the red box's share of
    the van trip (4.5 of 5.5 kg) are all the waste's avoided figures, negative. Neither has a truck
    round."""
    days = [BoxDay(DAY, "x", "gls", deposited_a=1, waste_deposits=10, waste_collections=1, waste_collected_kg=4.0)]
    bag = lines(days, method("baseline.waste='bin_bag'"), "baseline")
    cars = [ln for ln in bag if ln.vehicle == "car" and ln.category == "hazardous_waste"]
    assert sum(ln.trips for ln in cars) == pytest.approx(10 * 0.27 * 0.6)
    assert vkm(cars) == pytest.approx(10 * 0.27 * 0.6 * 6 * U)
    half = lines(days, method("baseline.waste='bin_bag'", "baseline.bin_bag_share=0.5"), "baseline", "car")
    assert vkm(half, "hazardous_waste") == pytest.approx(10 * 0.5 * 0.6 * 6 * U)
    for waste in ("bin_bag", "residual_bin"):
        assert lines(days, method(f"baseline.waste='{waste}'"), "baseline", "truck") == []
    residual = method("baseline.waste='residual_bin'")
    assert [ln for ln in lines(days, residual, "baseline") if ln.category == "hazardous_waste"] == []
    s = summarize(assess(days, GEO, residual))["categories"]["hazardous_waste"]["avoided"]
    assert s["trips"] == pytest.approx(-(10 * 0.26 + 4.5 / 5.5))
    assert s["kg_co2e_wtw"] < -10 * 0.26 * 1.0 * CAR_WTW  # the car trips and the van's share


def test_chained_recycling_trips_are_no_trips_of_their_own_and_only_their_detour() -> None:
    """Half of four deposits' station trips chained, detour 30%: 0.6 x 2 solo car trips of 6U, and
    0.6 x 2 chained ones that are 0 vehicle trips and 0.3 x 6U km each; walk/cycle the same way."""
    days = [BoxDay(DAY, "x", None, waste_deposits=4, waste_deposit_kg=2.0)]
    m = method("residents.recycling_chained_share=0.5")
    cars = lines(days, m, "baseline", "car")
    assert sum(ln.trips for ln in cars) == pytest.approx(0.6 * 2)
    assert vkm(cars) == pytest.approx(0.6 * 2 * 6 * U + 0.6 * 2 * 0.3 * 6 * U)
    walk = lines(days, m, "baseline", "walk_cycle")
    assert sum(ln.trips for ln in walk) == pytest.approx(0.4 * 2)
    full = lines(days, method("residents.recycling_chained_share=1", "residents.chained_detour_share=0.5"), "baseline")
    assert sum(ln.trips for ln in full) == 0.0
    assert vkm([ln for ln in full if ln.vehicle == "car"]) == pytest.approx(4 * 0.6 * 0.5 * 6 * U)
    # The headline's avoided car trips fall by exactly the chained ones.
    plain = summarize(assess(days, GEO, method()))["modes"]["car"]["avoided"]["trips"]
    half = summarize(assess(days, GEO, m))["modes"]["car"]["avoided"]["trips"]
    assert plain - half == pytest.approx(0.6 * 2)


def test_the_waste_companys_own_collection_is_a_project_truck_round() -> None:
    """A red box no van took, fetched by the waste company: depot -> y -> depot = 4U by truck."""
    days = [BoxDay(DAY, "y", "nordvaerk", waste_collections=1, waste_collected_kg=3.0)]
    trucks = lines(days, method(), "project", "truck")
    assert vkm(trucks) == pytest.approx(4 * U)
    assert [ln.carrier for ln in trucks] == ["nordvaerk"]
    assert lines(days, method(), "project", "van") == []


def test_home_delivery_baseline_adds_door_stops_and_failed_attempts() -> None:
    """10 parcels at x: the same round (2U) plus 10 x (1 + 0.055 x 0.5) x 0.2 km of door stops; the
    failed first attempts not delivered again (10 x 0.055 x 0.5) go to a parcel shop, 46% by car,
    3 km a trip. Under parcel_shop, every parcel is a shop visit and the van drives only the round."""
    days = [BoxDay(DAY, "x", "gls", deposited_a=10), BoxDay(DAY, "x", None, collected=10)]
    base = lines(days, method(), "baseline")
    assert vkm([ln for ln in base if ln.vehicle == "van"]) == pytest.approx(2 * U + 10 * 1.0275 * 0.2)
    cars = [ln for ln in base if ln.vehicle == "car"]
    assert sum(ln.trips for ln in cars) == pytest.approx(10 * 0.0275 * 0.46)
    assert vkm(cars) == pytest.approx(10 * 0.0275 * 0.46 * 3.0)
    shop = lines(days, method("baseline.parcels='parcel_shop'"), "baseline")
    assert vkm([ln for ln in shop if ln.vehicle == "van"]) == pytest.approx(2 * U)
    assert vkm([ln for ln in shop if ln.vehicle == "car"]) == pytest.approx(10 * 0.46 * 3.0)
    pickups = [ln for ln in lines(days, method(), "project") if ln.vehicle == "car"]
    assert vkm(pickups) == pytest.approx(10 * 0.26 * 1.0)


def test_vans_stop_once_at_a_box_and_at_every_door_without_it() -> None:
    """x: 10 parcels delivered and 2 sent parcels taken; y: a red box only. With the hub the van
    stops twice (x's stop split between delivery and sending like its km, y's all waste's). Home
    delivery: a stop at each of the 10 doors plus redeliveries (10 x 1.0275) and one at the shop for
    the sent parcels; parcel shop: one stop at x, as at the box. The waste company's round stops
    once per box. Residents' trips make no stops."""
    days = [
        BoxDay(DAY, "x", "gls", deposited_a=10, picked_up=2),
        BoxDay(DAY, "y", "gls", waste_collections=1, waste_collected_kg=3.0),
        BoxDay(DAY, "x", None, collected=10, dropped_off=2),
    ]
    project = lines(days, method(), "project", "van")
    assert sum(ln.stops for ln in project) == pytest.approx(2.0)
    x = [ln for ln in project if ln.box_id == "x"]
    assert [ln.category for ln in x] == ["parcel_delivery", "parcel_sending"]
    assert x[0].stops == pytest.approx(10 / 15)
    assert x[1].stops == pytest.approx(5 / 15)
    assert [ln.stops for ln in project if ln.box_id == "y"] == [1.0]
    home = lines(days, method(), "baseline", "van")
    assert {ln.category: ln.stops for ln in home} == pytest.approx({"parcel_delivery": 10.275, "parcel_sending": 1.0})
    shop = lines(days, method("baseline.parcels='parcel_shop'"), "baseline", "van")
    assert sum(ln.stops for ln in shop) == pytest.approx(1.0)
    trucks = lines(days, method("baseline.waste='dedicated_round'"), "baseline", "truck")
    assert [ln.stops for ln in trucks] == [1.0]
    assert all(ln.stops == 0 for ln in assess(days, GEO, method()).lines if ln.vehicle in ("car", "walk_cycle"))
    s = summarize(assess(days, GEO, method()))
    assert s["modes"]["van"]["avoided"]["stops"] == pytest.approx(11.275 - 2.0)
    assert s["totals"]["avoided"]["stops"] == pytest.approx(11.275 - 2.0)


def test_the_headline_is_motorised_trips_as_a_whole_number_with_every_mode_beside_it() -> None:
    """Totals count vans, trucks and residents' cars; walking and cycling are a mode of their own that
    no total counts. The headline rounds the motorised trips avoided to a whole number. Grouped by
    mode, the motorised groups partition the totals and walk_cycle is a row of its own, in the CSV
    too."""
    days = [
        BoxDay(DAY, "x", "gls", deposited_a=10, picked_up=2),
        BoxDay(DAY, "x", None, collected=10, dropped_off=2, waste_deposits=3, waste_deposit_kg=1.5),
    ]
    s = summarize(assess(days, GEO, method()), ["mode"])
    assert list(s["modes"]) == ["van", "car", "walk_cycle"]
    motorised = sum(s["modes"][m]["avoided"]["trips"] for m in ("van", "car"))
    assert s["totals"]["avoided"]["trips"] == pytest.approx(motorised)
    walk = s["modes"]["walk_cycle"]["project"]["trips"]
    assert walk == pytest.approx((10 + 2 + 3) * 0.74)
    assert s["headline"]["motorised_trips_avoided"] == round(motorised)
    assert isinstance(s["headline"]["motorised_trips_avoided"], int)
    assert s["headline"]["kg_co2e_wtw_avoided"] == s["totals"]["avoided"]["kg_co2e_wtw"]
    rows = {g["key"]["mode"]: g for g in s["groups"]}
    assert set(rows) == {"van", "car", "walk_cycle"}
    assert rows["walk_cycle"]["project"]["trips"] == pytest.approx(walk)
    assert rows["van"]["avoided"]["vkm"] + rows["car"]["avoided"]["vkm"] == pytest.approx(s["totals"]["avoided"]["vkm"])
    assert to_csv(s).splitlines()[0].startswith("mode,baseline_trips,baseline_stops,baseline_vkm,")
    assert to_csv(s).count("\nwalk_cycle,") == 1


def test_sending_compares_shop_trips_with_box_trips() -> None:
    """4 parcels sent from y: 4 x 0.46 car trips of 3 km to a shop in the baseline, 4 x 0.26 of 1 km
    to the box with the hub; the van's pickup at y is its own round in both (depot -> y -> depot)."""
    days = [BoxDay(DAY, "y", "gls", dropped_off=4, picked_up=4)]
    s = summarize(assess(days, GEO, method()))["categories"]["parcel_sending"]
    assert s["baseline"]["vkm"] == pytest.approx(4 * 0.46 * 3 + 4 * U, abs=1e-6)
    assert s["project"]["vkm"] == pytest.approx(4 * 0.26 * 1 + 4 * U, abs=1e-6)
    assert s["avoided"]["trips"] == pytest.approx(4 * (0.46 - 0.26), abs=1e-6)


def test_a_full_van_makes_a_second_trip() -> None:
    """x, y, z with 50 parcels each and vans of 120: the round is cut after y (100 parcels), so two
    trips: depot -> x -> y -> depot (4U) and depot -> z -> depot (6U)."""
    days = [BoxDay(DAY, b, "gls", deposited_a=50) for b in ("x", "y", "z")]
    project = lines(days, method(), "project", "van")
    assert vkm(project) == pytest.approx(10 * U)
    assert sum(ln.trips for ln in project) == pytest.approx(2.0)
    one_van = lines(days, method("van_capacity_parcels=0"), "project", "van")
    assert vkm(one_van) == pytest.approx(6 * U)


def test_totals_do_not_depend_on_the_allocation() -> None:
    """Allocation moves km between categories, never changes the whole: the project's and baseline's
    totals are the same under both choices, and the road factor and GLEC adjustment scale tour km."""
    days = [
        BoxDay(DAY, "x", "gls", deposited_a=5, picked_up=2),
        BoxDay(DAY, "z", "gls", waste_collections=2, waste_collected_kg=6.0),
        BoxDay(DAY, "y", None, collected=4, dropped_off=1, waste_deposits=3, waste_deposit_kg=1.0),
    ]
    a = summarize(assess(days, GEO, method()))["totals"]
    b = summarize(assess(days, GEO, method("allocation='marginal'")))["totals"]
    assert a == b
    scaled = lines(days[:2], apply_overrides(Method(), ["road_factor=1.3"]), "project", "van")
    assert vkm(scaled) == pytest.approx(6 * U * 1.3 * 1.05)


def test_results_group_by_box_day_week_and_carry_the_method() -> None:
    """Groups partition the totals; every result names its allocation and baselines; the CSV has one
    row per group with the method's choices in every row."""
    days = [
        BoxDay(date(2026, 3, 2), "x", "gls", deposited_a=5),
        BoxDay(date(2026, 3, 8), "y", "gls", deposited_b=2, waste_collections=1, waste_collected_kg=1.0),
        BoxDay(date(2026, 3, 9), "y", None, waste_deposits=1, waste_deposit_kg=1.0),
    ]
    s = summarize(assess(days, GEO, method()), ["week", "box"])
    assert [g["key"] for g in s["groups"]] == [
        {"week": "2026-03-02", "box": "x"},
        {"week": "2026-03-02", "box": "y"},
        {"week": "2026-03-09", "box": "y"},
    ]
    assert sum(g["avoided"]["kg_co2e_wtw"] for g in s["groups"]) == pytest.approx(s["totals"]["avoided"]["kg_co2e_wtw"])
    assert s["method"]["allocation"] == "load_distance"
    assert s["method"]["waste_baseline"] == "resident_trips"
    assert s["assumptions"]["residents"]["box_car_share"] == 0.26
    csv_rows = to_csv(s).splitlines()
    assert csv_rows[0].startswith("week,box,baseline_trips,")
    assert len(csv_rows) == 4
    assert csv_rows[1].endswith(",molo-hubs-activity-v1,load_distance,resident_trips,home_delivery,0.0")
    with pytest.raises(ValueError, match="cannot group by 'hour'"):
        summarize(assess(days, GEO, method()), ["hour"])


def test_overrides_are_validated() -> None:
    """An unknown parameter, a share above 1 or a vehicle category without factors is refused."""
    with pytest.raises(ValueError, match="box_car_shar"):
        apply_overrides(Method(), ["residents.box_car_shar=0.1"])
    with pytest.raises(ValueError, match="less than or equal to 1"):
        apply_overrides(Method(), ["van_electric_share=1.5"])
    with pytest.raises(ValueError, match="unknown vehicle category 'hovercraft'"):
        apply_overrides(Method(), ["truck='hovercraft'"])
    with pytest.raises(ValueError, match=r"not key\.path=value"):
        apply_overrides(Method(), ["allocation"])


def test_day_by_day_tallies_add_up_to_the_whole_and_are_reused_only_for_the_same_counts() -> None:
    """The backend's cache tallies day by day: the sum equals assessing every day at once; asking
    again reuses every day; a day whose counts changed is worked out again, with the new figures."""
    from dataclasses import replace

    from backend.impact.service import DayCache, compute

    days = [
        BoxDay(
            date(2026, 3, d), box, "gls", deposited_a=d, picked_up=1, waste_collections=d % 2, waste_collected_kg=2.0
        )
        for d in range(2, 9)
        for box in ("x", "y")
    ] + [BoxDay(date(2026, 3, d), "z", None, collected=3, waste_deposits=1, waste_deposit_kg=0.5) for d in range(2, 9)]
    days.sort(key=lambda d: d.day)
    cache = DayCache()
    first = compute(days, GEO, method(), ["week", "category"], cache)
    whole = summarize(assess(days, GEO, method()), ["week", "category"])
    assert first.pop("excluded") == {"boxes_without_position": [], "carriers_without_depot": []}
    assert json_close(first, whole)
    assert (cache.hits, cache.misses) == (0, 7)
    assert {
        k: v for k, v in compute(days, GEO, method(), ["week", "category"], cache).items() if k != "excluded"
    } == first
    assert (cache.hits, cache.misses) == (7, 7)
    changed = [replace(d, deposited_a=40) if (d.day, d.box_id) == (date(2026, 3, 8), "x") else d for d in days]
    again = compute(changed, GEO, method(), ["week", "category"], cache)
    del again["excluded"]
    assert (cache.hits, cache.misses) == (13, 8)
    assert json_close(again, summarize(assess(changed, GEO, method()), ["week", "category"]))
    assert again["activity"]["parcels_delivered"] == first["activity"]["parcels_delivered"] + 32


def json_close(a: object, b: object) -> bool:
    """Equal up to float rounding in the last of the 6 decimals results carry."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=2e-6)
    return a == b
