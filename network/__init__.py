"""The MoLo Hubs box network: boxes, their doors, depots, recycling stations and distances.

Where it sits: domain data on the ground floor, beside ``contract`` (the wire format) and
``accounting`` (the trip and CO2 method). The simulator builds its world from a network and the
backend's impact service takes its geography from one, so the backend does not depend on the
simulator for where things are. The data, its sources and assumptions: ``docs/network.md``.
"""

from network.sites import (
    CARRIERS,
    DEFAULT_NETWORK_RESOURCE,
    DEFAULT_ROAD_FACTOR,
    EARTH_RADIUS_KM,
    FJORD_LINE,
    WASTE_COMPANY,
    Box,
    FjordSide,
    Located,
    Network,
    Site,
    SiteKind,
    build_layout,
    crosses_fjord,
    fjord_line_lat,
    fjord_side,
    geography_of,
    haversine_km,
    load_network,
    parse_network,
    road_km,
)

__all__ = [
    "CARRIERS",
    "DEFAULT_NETWORK_RESOURCE",
    "DEFAULT_ROAD_FACTOR",
    "EARTH_RADIUS_KM",
    "FJORD_LINE",
    "WASTE_COMPANY",
    "Box",
    "FjordSide",
    "Located",
    "Network",
    "Site",
    "SiteKind",
    "build_layout",
    "crosses_fjord",
    "fjord_line_lat",
    "fjord_side",
    "geography_of",
    "haversine_km",
    "load_network",
    "parse_network",
    "road_km",
]
