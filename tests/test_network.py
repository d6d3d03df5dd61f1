"""Unit tests of the box network: the bundled Aalborg data, the loader's validation, and distances."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from contract.domain import CompartmentKind, SizeClass, default_layout
from contract.topics import BOX_ID_PATTERN
from network import (
    CARRIERS,
    DEFAULT_ROAD_FACTOR,
    WASTE_COMPANY,
    Box,
    FjordSide,
    Network,
    Site,
    SiteKind,
    build_layout,
    crosses_fjord,
    fjord_line_lat,
    fjord_side,
    haversine_km,
    load_network,
    road_km,
)

# A generous box around greater Aalborg (Svenstrup in the south to the airport and Vodskov in the north).
LAT_MIN, LAT_MAX = 56.95, 57.13
LON_MIN, LON_MAX = 9.80, 10.10

MINIMAL_FILE = """
[depots.postnord]
name = "Depot"
kind = "carrier_depot"
lat = 57.04
lon = 10.01

[recycling_stations.south]
name = "South station"
kind = "recycling_station"
lat = 57.03
lon = 9.93

[recycling_stations.north]
name = "North station"
kind = "recycling_station"
lat = 57.07
lon = 9.96

[[boxes]]
id = "aal-001"
name = "Box one"
area = "Vejgaard"
side = "south"
lat = 57.044
lon = 9.947
households = 300
parcel = { A = 2, B = 3, C = 1 }

[[boxes]]
id = "{second_id}"
name = "Box two"
area = "Løvvangen"
side = "north"
lat = 57.07
lon = 9.93
households = 200
parcel = { A = 1, B = 1, C = 1 }
red_boxes = 3
"""


@pytest.fixture(scope="module")
def network() -> Network:
    return load_network()


def write_network(tmp_path: Path, second_id: str = "aal-002") -> Path:
    path = tmp_path / "net.toml"
    path.write_text(MINIMAL_FILE.replace("{second_id}", second_id), encoding="utf-8")
    return path


def test_default_file_has_50_boxes_with_ids_aal_001_to_050(network: Network) -> None:
    """The bundled network has exactly the ids aal-001..aal-050, in order, each a valid box id."""
    ids = [box.id for box in network.boxes]
    assert ids == [f"aal-{n:03d}" for n in range(1, 51)]
    assert all(re.fullmatch(BOX_ID_PATTERN, box_id) for box_id in ids)


def test_every_box_has_two_red_boxes_at_the_bottom_and_at_least_8_parcel_doors(network: Network) -> None:
    """Doors 1 and 2 are the only red-box doors; the rest are >= 8 parcel doors ordered A, B, C."""
    order = {SizeClass.A: 0, SizeClass.B: 1, SizeClass.C: 2}
    for box in network.boxes:
        doors = box.layout.compartments
        assert [d.id for d in doors] == list(range(1, len(doors) + 1)), box.id
        assert [d.id for d in box.layout.red_boxes] == [1, 2], box.id
        parcels = box.layout.parcel_compartments
        assert len(parcels) >= 8, box.id
        assert len(parcels) + 2 == len(doors), box.id
        ranks = [order[d.size_class] for d in parcels if d.size_class is not None]
        assert ranks == sorted(ranks), box.id


def test_layout_matches_the_compact_form(tmp_path: Path) -> None:
    """parcel = {A=2, B=3, C=1} with the default two red boxes is contract.default_layout(2, 3, 1)."""
    net = load_network(write_network(tmp_path))
    assert net.box("aal-001").layout == default_layout(2, 3, 1)
    three = net.box("aal-002").layout
    assert [d.kind for d in three.compartments] == [CompartmentKind.RED_BOX] * 3 + [CompartmentKind.PARCEL] * 3
    assert [d.size_class for d in three.parcel_compartments] == [SizeClass.A, SizeClass.B, SizeClass.C]


def test_build_layout_without_red_boxes_starts_parcels_at_door_1() -> None:
    """With red_boxes=0 the first parcel compartment is door 1."""
    layout = build_layout(1, 0, 2, red_boxes=0)
    assert [(d.id, d.size_class) for d in layout.compartments] == [(1, SizeClass.A), (2, SizeClass.C), (3, SizeClass.C)]


def test_boxes_on_both_sides_and_side_agrees_with_the_fjord_line(network: Network) -> None:
    """Both sides of the Limfjord have boxes, and each box's side matches its position vs FJORD_LINE."""
    sides = Counter(box.side for box in network.boxes)
    assert sides[FjordSide.NORTH] >= 5
    assert sides[FjordSide.SOUTH] >= 5
    for box in network.boxes:
        assert fjord_side(box.lat, box.lon) is box.side, (box.id, box.lat, box.lon)
        # not ambiguously close to the line: at least ~400 m from it
        assert abs(box.lat - fjord_line_lat(box.lon)) > 0.0036, box.id
    assert network.boxes_on(FjordSide.NORTH) == [b for b in network.boxes if b.side is FjordSide.NORTH]


def test_fjord_line_known_places() -> None:
    """Aalborg's library and station are south, Nørresundby's square and Lindholm Høje are north."""
    assert fjord_side(57.0473, 9.9276) is FjordSide.SOUTH  # Hovedbiblioteket, Rendsburggade
    assert fjord_side(57.0430, 9.9170) is FjordSide.SOUTH  # Aalborg station
    assert fjord_side(57.0590, 9.9232) is FjordSide.NORTH  # Nørresundby Torv
    assert fjord_side(57.0766, 9.9116) is FjordSide.NORTH  # Lindholm Høje
    assert fjord_line_lat(0.0) == fjord_line_lat(9.0)  # constant beyond the ends


def test_all_coordinates_are_in_greater_aalborg(network: Network) -> None:
    """Boxes, depots and recycling stations all lie within a bounding box around Aalborg."""
    places: list[Box | Site] = [*network.boxes, *network.depots.values(), *network.recycling_stations]
    for place in places:
        assert LAT_MIN < place.lat < LAT_MAX, place.id
        assert LON_MIN < place.lon < LON_MAX, place.id


def test_boxes_have_plausible_household_counts(network: Network) -> None:
    """Each box serves 150-600 apartment households; door count does not shrink as households grow."""
    for box in network.boxes:
        assert 150 <= box.households <= 600, box.id
    ranked = sorted(network.boxes, key=lambda b: b.households)
    doors = [len(b.layout.parcel_compartments) for b in ranked]
    assert doors == sorted(doors)


def test_every_carrier_and_the_waste_company_have_a_depot(network: Network) -> None:
    """Each carrier in CARRIERS has a carrier depot, Nordværk a waste facility, and stations exist."""
    for carrier in CARRIERS:
        assert network.depots[carrier].kind is SiteKind.CARRIER_DEPOT, carrier
    assert network.depots[WASTE_COMPANY].kind is SiteKind.WASTE_FACILITY
    assert len(network.recycling_stations) >= 2
    assert all(s.kind is SiteKind.RECYCLING_STATION for s in network.recycling_stations)


def test_nearest_recycling_station(tmp_path: Path) -> None:
    """A north-side box's nearest station is the northern one."""
    net = load_network(write_network(tmp_path))
    assert net.nearest_recycling_station(net.box("aal-002")).id == "north"
    assert net.nearest_recycling_station(net.box("aal-001")).id == "south"


def test_crosses_fjord(network: Network) -> None:
    """A trip between the two sides crosses the fjord; one within a side does not."""
    south, north = network.boxes_on(FjordSide.SOUTH), network.boxes_on(FjordSide.NORTH)
    assert crosses_fjord(south[0], north[0])
    assert crosses_fjord(north[0], south[-1])
    assert not crosses_fjord(south[0], south[-1])
    assert not crosses_fjord(north[0], north[-1])


def test_haversine_one_degree_of_latitude() -> None:
    """One degree of latitude (and of longitude on the equator) is 111.195 km on the mean sphere."""
    assert haversine_km(57.0, 9.9, 58.0, 9.9) == pytest.approx(111.195, abs=0.01)
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(111.195, abs=0.01)
    assert haversine_km(57.05, 9.92, 57.05, 9.92) == 0.0


def test_haversine_aalborg_to_norresundby() -> None:
    """Aalborg main library to Nørresundby library is about 1.328 km (hand-computed, flat-Earth check)."""
    # dlat 0.0117 deg x 111.195 = 1.3010 km; dlon 0.0044 deg x 111.195 x cos(57.053 deg) = 0.2661 km
    distance = haversine_km(57.0473, 9.9276, 57.0590, 9.9232)
    assert distance == pytest.approx(1.328, abs=0.005)
    assert haversine_km(57.0590, 9.9232, 57.0473, 9.9276) == pytest.approx(distance)


def test_road_km_scales_straight_line_by_the_factor(network: Network) -> None:
    """road_km is haversine times the road factor (1.3 by default); a factor below 1 is refused."""
    a, b = network.box("aal-001"), network.depots["postnord"]
    straight = haversine_km(a.lat, a.lon, b.lat, b.lon)
    assert straight > 1.0
    assert road_km(a, b) == pytest.approx(straight * DEFAULT_ROAD_FACTOR)
    assert road_km(a, b, road_factor=1.2) == pytest.approx(straight * 1.2)
    with pytest.raises(ValueError, match="road_factor"):
        road_km(a, b, road_factor=0.9)


def test_duplicate_box_id_is_refused_naming_the_id(tmp_path: Path) -> None:
    """A file with two boxes called aal-001 raises ValueError mentioning that id and the file."""
    path = write_network(tmp_path, second_id="aal-001")
    with pytest.raises(ValueError, match="duplicate box id 'aal-001'") as info:
        load_network(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('id = "aal-001"', 'id = "AAL 1"', "String should match pattern"),
        ("parcel = { A = 2, B = 3, C = 1 }", "parcel = { A = 2, D = 3 }", "parcel.D"),
        ("parcel = { A = 2, B = 3, C = 1 }", "parcel = { A = 60, B = 3, C = 1 }", "less than or equal to 64"),
        ('side = "south"', 'side = "west"', "side"),
        ("households = 300", "households = 0", "households"),
        ("[[boxes]]", "[[boxes]", "invalid network file"),
    ],
)
def test_invalid_files_raise_value_error(tmp_path: Path, old: str, new: str, message: str) -> None:
    """Bad ids, unknown size classes, too many doors, bad sides, no households, bad TOML: ValueError."""
    path = tmp_path / "bad.toml"
    text = MINIMAL_FILE.replace("{second_id}", "aal-002")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_network(path)


def test_network_refuses_no_boxes() -> None:
    """A network needs at least one box, but any positive count is fine."""
    with pytest.raises(ValueError, match="at least 1"):
        Network(boxes=[], depots={}, recycling_stations=[])
    box = Box(
        id="aal-001",
        name="x",
        area="y",
        side=FjordSide.SOUTH,
        lat=57.04,
        lon=9.92,
        households=1,
        layout=default_layout(),
    )
    assert Network(boxes=[box], depots={}, recycling_stations=[]).box("aal-001") is box
    with pytest.raises(KeyError):
        Network(boxes=[box], depots={}, recycling_stations=[]).box("aal-002")
