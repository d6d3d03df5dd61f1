"""The domain language: boxes, compartments, size classes, waste fractions.

Figures come from ``shared/DOMAIN.md`` (sources given beside each constant). Everything here is a
plain value: no I/O, no project imports.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: A Danish municipal red box for hazardous household waste holds at most 4 kg (some municipalities
#: allow 6 kg; see DOMAIN.md "Hazardous household waste in Denmark"). Boxes may announce their own.
RED_BOX_MAX_KG = 4.0
#: InPost locker compartments take parcels up to 25 kg (DOMAIN.md "Parcel lockers").
PARCEL_MAX_WEIGHT_KG = 25.0
#: Highest compartment (door) number a box may have.
MAX_COMPARTMENTS = 64


class SizeClass(StrEnum):
    """Parcel compartment size classes, after InPost's A/B/C lockers."""

    A = "A"
    B = "B"
    C = "C"


class Dimensions(BaseModel):
    """Inner dimensions of a compartment, or outer dimensions of a parcel, in millimetres."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height_mm: Annotated[int, Field(gt=0, le=3000)]
    width_mm: Annotated[int, Field(gt=0, le=3000)]
    depth_mm: Annotated[int, Field(gt=0, le=3000)]

    def fits_in(self, other: Dimensions) -> bool:
        """True if this box-shaped item fits in ``other`` in some axis-aligned orientation."""
        mine = sorted((self.height_mm, self.width_mm, self.depth_mm))
        theirs = sorted((other.height_mm, other.width_mm, other.depth_mm))
        return all(a <= b for a, b in zip(mine, theirs, strict=True))


#: InPost compartment sizes: A 8x38x64 cm, B 19x38x64 cm, C 41x38x64 cm (DOMAIN.md).
SIZE_DIMENSIONS_MM: dict[SizeClass, Dimensions] = {
    SizeClass.A: Dimensions(height_mm=80, width_mm=380, depth_mm=640),
    SizeClass.B: Dimensions(height_mm=190, width_mm=380, depth_mm=640),
    SizeClass.C: Dimensions(height_mm=410, width_mm=380, depth_mm=640),
}


class WasteFraction(StrEnum):
    """What goes into the red box (accepted list from DOMAIN.md)."""

    SPRAY_CANS = "spray_cans"
    BATTERIES = "batteries"
    LIGHT_BULBS = "light_bulbs"
    SMALL_ELECTRONICS = "small_electronics"
    CHEMICALS = "chemicals"
    CLEANING_AGENTS = "cleaning_agents"
    PAINT = "paint"
    OIL = "oil"


class CompartmentKind(StrEnum):
    """A door of the box is either a parcel compartment or holds a hazardous-waste red box."""

    PARCEL = "parcel"
    RED_BOX = "red_box"


class Compartment(BaseModel):
    """One door of a box. Doors are numbered from 1, bottom row first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[int, Field(ge=1, le=MAX_COMPARTMENTS)]
    kind: CompartmentKind
    size_class: SizeClass | None = None
    capacity_kg: Annotated[float, Field(gt=0, le=100)] | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> Self:
        if self.kind is CompartmentKind.PARCEL and self.size_class is None:
            raise ValueError("a parcel compartment needs a size_class")
        if self.kind is CompartmentKind.RED_BOX and self.size_class is not None:
            raise ValueError("a red-box door has no parcel size_class")
        return self

    @property
    def red_box_capacity_kg(self) -> float:
        """The red box's weight limit: its own if announced, else the Danish 4 kg default."""
        return self.capacity_kg if self.capacity_kg is not None else RED_BOX_MAX_KG


class BoxLayout(BaseModel):
    """The doors of one box, as announced in its birth message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compartments: Annotated[list[Compartment], Field(min_length=1, max_length=MAX_COMPARTMENTS)]

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [c.id for c in self.compartments]
        if len(set(ids)) != len(ids):
            raise ValueError("compartment ids must be unique")
        return self

    def get(self, compartment_id: int) -> Compartment | None:
        """The compartment with this id, or None if the box has no such door."""
        for compartment in self.compartments:
            if compartment.id == compartment_id:
                return compartment
        return None

    @property
    def parcel_compartments(self) -> list[Compartment]:
        return [c for c in self.compartments if c.kind is CompartmentKind.PARCEL]

    @property
    def red_boxes(self) -> list[Compartment]:
        return [c for c in self.compartments if c.kind is CompartmentKind.RED_BOX]


def default_layout(a: int = 4, b: int = 6, c: int = 4) -> BoxLayout:
    """A typical MoLo box: the two bottom doors hold red boxes (Nordværk's arrangement, DOMAIN.md),
    then ``a`` A-, ``b`` B- and ``c`` C-size parcel compartments."""
    doors: list[Compartment] = [
        Compartment(id=1, kind=CompartmentKind.RED_BOX),
        Compartment(id=2, kind=CompartmentKind.RED_BOX),
    ]
    for size, count in ((SizeClass.A, a), (SizeClass.B, b), (SizeClass.C, c)):
        for _ in range(count):
            doors.append(Compartment(id=len(doors) + 1, kind=CompartmentKind.PARCEL, size_class=size))
    return BoxLayout(compartments=doors)
