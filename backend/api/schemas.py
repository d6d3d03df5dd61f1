"""Public output models of the API (separate from the wire models and the database rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from contract import CompartmentKind, SizeClass


class SizeOccupancy(BaseModel):
    total: int
    occupied: int
    out_of_service: int
    free: int


class RedBoxView(BaseModel):
    compartment: int
    weight_kg: float | None = Field(description="latest reading; null before the first telemetry")
    capacity_kg: float
    fill_ratio: float | None


StatusReasonOut = Literal["birth", "shutdown", "connection_lost", "heartbeat_timeout", "never_seen"]


class BoxSummary(BaseModel):
    box_id: str
    name: str | None
    latitude: float | None
    longitude: float | None
    online: bool
    status_reason: StatusReasonOut
    status_since: datetime | None = Field(description="when the box went online or offline, as the backend saw it")
    session: int
    last_seen_at: datetime | None = Field(description="newest device timestamp of any message")
    last_received_at: datetime | None
    last_seq: int
    occupancy: dict[SizeClass, SizeOccupancy]
    red_boxes: list[RedBoxView]
    temperature_c: float | None
    power: str | None
    battery_pct: float | None


class CompartmentView(BaseModel):
    id: int
    kind: CompartmentKind
    size_class: SizeClass | None
    dimensions_mm: dict[str, int] | None
    occupied: bool | None
    door_open: bool | None
    in_service: bool | None
    weight_kg: float | None
    capacity_kg: float | None


class TelemetryView(BaseModel):
    ts: datetime
    seq: int
    power: str | None
    battery_pct: float | None
    temperature_c: float | None


class BoxDetail(BoxSummary):
    firmware: str | None
    compartments: list[CompartmentView]
    telemetry: TelemetryView | None


class EventOut(BaseModel):
    box_id: str
    seq: int
    session: int
    ts: datetime
    received_at: datetime
    type: str
    payload: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = Field(description="pass as ?cursor= to get the next page; null on the last page")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    schema_version: int
    flavour: str
