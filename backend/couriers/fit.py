"""Which compartment sizes a parcel fits, and distances on the Earth. Pure functions, no I/O."""

from __future__ import annotations

import math

from contract import SIZE_DIMENSIONS_MM, SizeClass
from contract.domain import Dimensions

#: Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M = 6_371_008.8
#: Size classes from the smallest compartment up.
SIZES_SMALLEST_FIRST: tuple[SizeClass, ...] = tuple(
    sorted(SIZE_DIMENSIONS_MM, key=lambda s: math.prod(SIZE_DIMENSIONS_MM[s].model_dump().values()))
)


def fitting_sizes(size_class: SizeClass | None = None, dimensions: Dimensions | None = None) -> list[SizeClass]:
    """The size classes a parcel fits in, smallest first. A size class fits itself and every larger
    class whose compartment is at least as large in every dimension; dimensions fit a class if the
    parcel fits its compartment in some orientation. Empty: the parcel is too large for any door."""
    if dimensions is None:
        if size_class is None:
            raise ValueError("give a size class or dimensions")
        dimensions = SIZE_DIMENSIONS_MM[size_class]
    return [s for s in SIZES_SMALLEST_FIRST if dimensions.fits_in(SIZE_DIMENSIONS_MM[s])]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lon: float, radius_m: float) -> tuple[float, float, float, float]:
    """(lat_min, lat_max, lon_min, lon_max) enclosing the circle; a cheap index filter before the
    exact distance. Slightly generous; clamped at the poles."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M) * 1.001
    coslat = math.cos(math.radians(lat))
    dlon = 180.0 if coslat < 1e-6 else min(180.0, dlat / coslat)
    return lat - dlat, lat + dlat, lon - dlon, lon + dlon
