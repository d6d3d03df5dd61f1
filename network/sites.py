"""The box network: where the 50 Aalborg boxes stand, what doors they have, and where vans come from.

Where it sits: domain data on the ground floor, beside ``contract`` and ``accounting``: the simulator
builds its world from it and the backend's impact service takes its geography from it, so neither
depends on the other for where things are. ``load_network()`` reads a TOML file (by default the bundled
``network/data/aalborg_boxes.toml``) into typed, validated models: boxes, their layouts
(``contract.BoxLayout``, the same shape a box announces in its birth message), carrier depots,
recycling stations and distances. No I/O besides reading that file.

Meaning of the data, its sources and assumptions: ``docs/network.md``. Every location is illustrative
(the pilot's real sites are not published).
"""

from __future__ import annotations

import math
import tomllib
from enum import StrEnum
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accounting.geo import Geography, Point
from contract.domain import BoxLayout, Compartment, CompartmentKind, SizeClass, default_layout
from contract.topics import BOX_ID_PATTERN

#: The bundled network file, relative to the ``network`` package.
DEFAULT_NETWORK_RESOURCE = "data/aalborg_boxes.toml"

#: Carriers the simulator routes vans for. Each needs a depot of the same id in the network file.
#: These are carriers operating parcel lockers in Denmark.
CARRIERS: tuple[str, ...] = ("postnord", "gls", "dao", "bring", "dhl")
#: The depot id of the waste company (Nordværk), where collected red boxes go.
WASTE_COMPANY = "nordvaerk"

#: Mean Earth radius (IUGG), km. One degree of latitude is then 2*pi*R/360 = 111.195 km.
EARTH_RADIUS_KM = 6371.0088

#: Road distance = straight-line distance x this factor. Detour indices (circuity) of urban road
#: networks in Denmark and Europe are typically 1.2-1.4; 1.3 is an assumption in the middle of that
#: range, not a measured Aalborg figure. A parameter of ``road_km``; see docs/network.md.
DEFAULT_ROAD_FACTOR = 1.3

#: The Limfjord's mid-channel through Aalborg as (lon, lat) points, west to east: a coarse line (good to
#: a few hundred metres between 9.85 and 10.05 E) used only to check a box's ``side``. It passes the
#: Limfjordsbroen at about 9.921 E, 57.0535 N and bends north-east past Rørdal towards Østhavnen.
FJORD_LINE: tuple[tuple[float, float], ...] = (
    (9.800, 57.066),
    (9.880, 57.061),
    (9.900, 57.058),
    (9.921, 57.0535),
    (9.955, 57.058),
    (9.990, 57.066),
    (10.050, 57.078),
)


class FjordSide(StrEnum):
    """Which side of the Limfjord: Aalborg proper (south) or Nørresundby (north)."""

    SOUTH = "south"
    NORTH = "north"


class SiteKind(StrEnum):
    """What a non-box site is."""

    CARRIER_DEPOT = "carrier_depot"
    WASTE_FACILITY = "waste_facility"
    RECYCLING_STATION = "recycling_station"


Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]
DoorCount = Annotated[int, Field(ge=0, le=64)]


class Located(Protocol):
    """Anything with a WGS84 position: a ``Box`` or a ``Site``."""

    @property
    def lat(self) -> float: ...

    @property
    def lon(self) -> float: ...


class Site(BaseModel):
    """A place vans or residents travel to: a carrier depot, the waste facility, a recycling station."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    lat: Latitude
    lon: Longitude
    kind: SiteKind


class Box(BaseModel):
    """One MoLo box: where it stands, whom it serves, and its doors (red boxes first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=BOX_ID_PATTERN)]
    name: Annotated[str, Field(min_length=1)]
    area: Annotated[str, Field(min_length=1)]
    side: FjordSide
    lat: Latitude
    lon: Longitude
    households: Annotated[int, Field(gt=0)]
    layout: BoxLayout


class Network(BaseModel):
    """All boxes, the depots by id (carriers and the waste company) and the recycling stations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boxes: Annotated[list[Box], Field(min_length=1)]
    depots: dict[str, Site]
    recycling_stations: list[Site]

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        seen: set[str] = set()
        for box in self.boxes:
            if box.id in seen:
                raise ValueError(f"duplicate box id {box.id!r}")
            seen.add(box.id)
        for key, depot in self.depots.items():
            if key != depot.id:
                raise ValueError(f"depot key {key!r} differs from its id {depot.id!r}")
        sites = [*self.depots.values(), *self.recycling_stations]
        site_ids: set[str] = set()
        for site in sites:
            if site.id in site_ids:
                raise ValueError(f"duplicate site id {site.id!r}")
            site_ids.add(site.id)
        return self

    def box(self, box_id: str) -> Box:
        """The box with this id; KeyError if there is none."""
        for box in self.boxes:
            if box.id == box_id:
                return box
        raise KeyError(box_id)

    def boxes_on(self, side: FjordSide) -> list[Box]:
        """The boxes on one side of the fjord, in file order."""
        return [b for b in self.boxes if b.side is side]

    def nearest_recycling_station(self, place: Located) -> Site:
        """The recycling station closest to ``place`` in straight line; ValueError if there are none."""
        if not self.recycling_stations:
            raise ValueError("the network has no recycling stations")
        return min(self.recycling_stations, key=lambda s: haversine_km(place.lat, place.lon, s.lat, s.lon))


# --- The file format: compact door layouts, sites keyed by id -------------------------------------


class _BoxEntry(BaseModel):
    """A ``[[boxes]]`` entry as written in the file: the layout in compact form."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    area: str
    side: FjordSide
    lat: float
    lon: float
    households: int
    parcel: dict[SizeClass, DoorCount]
    red_boxes: DoorCount = 2


class _SiteEntry(BaseModel):
    """A ``[depots.<id>]`` or ``[recycling_stations.<id>]`` table; the id is the table's key."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: SiteKind
    lat: float
    lon: float


class _NetworkFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boxes: list[_BoxEntry]
    depots: dict[str, _SiteEntry] = Field(default_factory=dict)
    recycling_stations: dict[str, _SiteEntry] = Field(default_factory=dict)


def build_layout(a: int, b: int, c: int, red_boxes: int = 2) -> BoxLayout:
    """Doors 1..``red_boxes`` hold red boxes (the bottom doors), then ``a`` A-, ``b`` B- and ``c``
    C-size parcel compartments. With two red boxes this is ``contract.default_layout(a, b, c)``."""
    if red_boxes == 2:
        return default_layout(a, b, c)
    doors = [Compartment(id=i, kind=CompartmentKind.RED_BOX) for i in range(1, red_boxes + 1)]
    for size, count in ((SizeClass.A, a), (SizeClass.B, b), (SizeClass.C, c)):
        for _ in range(count):
            doors.append(Compartment(id=len(doors) + 1, kind=CompartmentKind.PARCEL, size_class=size))
    return BoxLayout(compartments=doors)


def _site(site_id: str, entry: _SiteEntry) -> Site:
    return Site(id=site_id, name=entry.name, lat=entry.lat, lon=entry.lon, kind=entry.kind)


def _box(entry: _BoxEntry) -> Box:
    layout = build_layout(
        entry.parcel.get(SizeClass.A, 0),
        entry.parcel.get(SizeClass.B, 0),
        entry.parcel.get(SizeClass.C, 0),
        entry.red_boxes,
    )
    return Box(
        id=entry.id,
        name=entry.name,
        area=entry.area,
        side=entry.side,
        lat=entry.lat,
        lon=entry.lon,
        households=entry.households,
        layout=layout,
    )


def parse_network(data: dict[str, Any]) -> Network:
    """Build a ``Network`` from the parsed TOML document; pydantic's ValidationError (a ValueError) if
    it is invalid."""
    raw = _NetworkFile.model_validate(data)
    return Network(
        boxes=[_box(entry) for entry in raw.boxes],
        depots={key: _site(key, entry) for key, entry in raw.depots.items()},
        recycling_stations=[_site(key, entry) for key, entry in raw.recycling_stations.items()],
    )


def load_network(path: Path | None = None) -> Network:
    """Read and validate a network file; by default the bundled Aalborg network (50 boxes).

    Raises ValueError naming the file and the problem (bad TOML, a missing field, a duplicate id, a
    layout with more than 64 doors, ...); FileNotFoundError if ``path`` does not exist.
    """
    if path is None:
        source = f"network/{DEFAULT_NETWORK_RESOURCE}"
        text = resources.files("network").joinpath(DEFAULT_NETWORK_RESOURCE).read_text(encoding="utf-8")
    else:
        source = str(path)
        text = path.read_text(encoding="utf-8")
    try:
        return parse_network(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ValueError(f"invalid network file {source}: {exc}") from exc


# --- Distances ------------------------------------------------------------------------------------


def haversine_km(a_lat: float, a_lon: float, b_lat: float, b_lon: float) -> float:
    """Great-circle distance in km between two WGS84 points (spherical Earth, mean radius)."""
    phi1, phi2 = math.radians(a_lat), math.radians(b_lat)
    dphi = phi2 - phi1
    dlambda = math.radians(b_lon - a_lon)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def road_km(a: Located, b: Located, road_factor: float = DEFAULT_ROAD_FACTOR) -> float:
    """Estimated road distance in km: straight-line distance x ``road_factor`` (an assumption, see
    ``DEFAULT_ROAD_FACTOR``). ValueError if the factor is below 1 (a road cannot beat a straight line)."""
    if not road_factor >= 1.0:
        raise ValueError(f"road_factor must be >= 1, got {road_factor}")
    return haversine_km(a.lat, a.lon, b.lat, b.lon) * road_factor


def fjord_line_lat(lon: float) -> float:
    """Latitude of ``FJORD_LINE`` at ``lon`` (linear between its points, constant beyond its ends)."""
    points = FJORD_LINE
    if lon <= points[0][0]:
        return points[0][1]
    for (lon0, lat0), (lon1, lat1) in pairwise(points):
        if lon <= lon1:
            return lat0 + (lat1 - lat0) * (lon - lon0) / (lon1 - lon0)
    return points[-1][1]


def fjord_side(lat: float, lon: float) -> FjordSide:
    """Which side of the Limfjord a point in Aalborg is on, by ``FJORD_LINE``."""
    return FjordSide.NORTH if lat > fjord_line_lat(lon) else FjordSide.SOUTH


def crosses_fjord(a: Located, b: Located) -> bool:
    """True if a trip from ``a`` to ``b`` must cross the Limfjord (by ``FJORD_LINE``). ``road_km`` does
    not know this: such trips go over Limfjordsbroen or through the Limfjord tunnel, so for places far
    from those crossings the real road distance is longer than ``road_km`` says."""
    return fjord_side(a.lat, a.lon) is not fjord_side(b.lat, b.lon)


def geography_of(network: Network) -> Geography:
    """The trip and CO2 method's geography of a network (boxes, depots incl. the waste company, stations)."""
    return Geography(
        boxes={b.id: Point(b.lat, b.lon) for b in network.boxes},
        depots={k: Point(s.lat, s.lon) for k, s in network.depots.items()},
        recycling_stations=[Point(s.lat, s.lon) for s in network.recycling_stations],
    )
