"""Input and public output models of the courier endpoints (separate from rows and wire models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract import SizeClass
from contract.domain import Dimensions, WasteFraction

ParcelIdIn = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$", description="the carrier's parcel id")]
CarrierIn = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,31}$")]
#: Longest hold: two days (InPost keeps a parcel 48 h; DOMAIN.md "Parcel lockers").
MAX_HOLD_MINUTES = 2 * 24 * 60


class ParcelSize(BaseModel):
    """A parcel's size: a compartment size class, or its outer dimensions in millimetres."""

    model_config = ConfigDict(extra="forbid")

    size_class: SizeClass | None = Field(default=None, description="A, B or C (InPost sizes)")
    dimensions_mm: Dimensions | None = Field(default=None, description="outer dimensions of the parcel")

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.size_class is None) == (self.dimensions_mm is None):
            raise ValueError("give exactly one of size_class and dimensions_mm")
        return self


class ReservationIn(ParcelSize):
    box_id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,31}$")]
    parcel_id: ParcelIdIn
    hold_minutes: Annotated[int, Field(ge=1, le=MAX_HOLD_MINUTES)] = 120
    carrier: CarrierIn | None = Field(
        default=None, description="operators must name the carrier they act for; couriers may omit their own"
    )


class CommandRef(BaseModel):
    command_id: UUID | None
    status: str | None = Field(description="pending, sent, succeeded, failed, rejected or timed_out")


class ReservationOut(BaseModel):
    reservation_id: UUID
    box_id: str
    compartment: int
    size_class: SizeClass
    carrier: str
    parcel_id: str
    dimensions_mm: Dimensions | None
    status: Literal["active", "cancelled", "expired", "fulfilled", "rejected"] = Field(
        description="rejected: the box refused the hold (the door was taken or broke meanwhile); book again"
    )
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    reserve_command: CommandRef = Field(description="the reserve_compartment command that told the box")
    release_command: CommandRef | None = Field(description="the release_compartment command, once the hold ended")


class BoxCapacity(BaseModel):
    box_id: str
    name: str | None
    latitude: float
    longitude: float
    distance_m: float
    free_fitting: int = Field(description="free compartments the parcel fits in")
    free_by_size: dict[SizeClass, int] = Field(description="free compartments per size class (after holds)")
    smallest_fitting_size: SizeClass = Field(description="the size a reservation here would take")


class CapacityOut(BaseModel):
    fitting_sizes: list[SizeClass]
    boxes: list[BoxCapacity]


class Stop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latitude: Annotated[float, Field(ge=-90, le=90)]
    longitude: Annotated[float, Field(ge=-180, le=180)]


class RouteCapacityIn(ParcelSize):
    stops: Annotated[list[Stop], Field(min_length=1, max_length=100)]
    radius_m: Annotated[float, Field(gt=0, le=50_000)] = 500.0
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class RouteBoxCapacity(BoxCapacity):
    nearest_stop: int = Field(description="index of the stop the box is nearest to (distance_m is to it)")


class RouteCapacityOut(BaseModel):
    fitting_sizes: list[SizeClass]
    boxes: list[RouteBoxCapacity]


class RedBoxPickup(BaseModel):
    compartment: int
    weight_kg: float = Field(description="best known weight: the newer of the deposits' sum and the weighed reading")
    deposited_kg: float = Field(description="sum of waste.deposited since the last waste.collected")
    weighed_kg: float | None = Field(description="the box's latest telemetry reading of this red box")
    capacity_kg: float
    fill_ratio: float
    deposits: int
    fractions_kg: dict[WasteFraction, float]
    since: datetime | None = Field(description="the last collection (null: never collected)")


class WastePickup(BaseModel):
    box_id: str
    name: str | None
    latitude: float
    longitude: float
    distance_m: float
    weight_kg: float
    red_boxes: list[RedBoxPickup]


class WastePickupsOut(BaseModel):
    total_weight_kg: float
    boxes: list[WastePickup]
