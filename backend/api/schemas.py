"""Public output models of the API (separate from the wire models and the database rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from contract import CompartmentKind, SizeClass
from contract.messages import CommandAction


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
    deposited_kg: float = Field(0.0, description="waste deposited since the last collection (from the events)")
    deposits: int = Field(0, description="deposits since the last collection")
    fractions_kg: dict[str, float] = Field(
        default_factory=dict, description="kg by waste fraction since the last collection"
    )
    collected_ts: datetime | None = Field(None, description="device time of the last collection")


StatusReasonOut = Literal["birth", "shutdown", "connection_lost", "heartbeat_timeout", "never_seen"]


class BoxSummary(BaseModel):
    box_id: str
    name: str | None
    latitude: float | None
    longitude: float | None
    online: bool
    status_reason: StatusReasonOut
    status_since: datetime | None = Field(
        description="when the box went online or offline, by the box's clock (a Last Will or a silence: when the "
        "box was last heard); docs/operations.md, Times"
    )
    status_received_at: datetime | None = Field(
        None,
        description="when the backend saw that change, by its own clock (differs from status_since in "
        "simulation and when messages arrive late)",
    )
    session: int
    last_seen_at: datetime | None = Field(description="newest device timestamp of any message")
    last_received_at: datetime | None
    last_seq: int
    occupancy: dict[SizeClass, SizeOccupancy]
    red_boxes: list[RedBoxView]
    temperature_c: float | None
    power: str | None
    battery_pct: float | None
    maintenance: bool = Field(False, description="box-wide maintenance, as the box confirmed a set_maintenance")
    maintenance_since: datetime | None = None
    open_alerts: int = Field(0, description="open alerts of this box (GET /api/v1/alerts?box_id=... lists them)")
    open_alert_kinds: list[str] = Field(default_factory=list)
    alert_level: Literal["critical", "warning"] | None = Field(
        None,
        description="the highest severity among this box's open alerts that colours it (docs/operations.md, "
        "Severity): critical or warning; null when none is open or all are info (a parcel near expiry)",
    )


class BoxStatus(BaseModel):
    """One box's live status only: the compact list an operator's screen or a monitor polls."""

    box_id: str
    online: bool
    status_reason: StatusReasonOut
    status_since: datetime | None = Field(description="as in the box list: by the box's clock")
    session: int
    last_seen_at: datetime | None
    last_received_at: datetime | None
    last_seq: int
    maintenance: bool
    open_alerts: int
    alert_level: Literal["critical", "warning"] | None


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


class AlertOut(BaseModel):
    id: int
    box_id: str
    kind: str = Field(
        description="box_offline, door_left_open, compartment_fault, red_box_near_limit, "
        "red_box_at_limit, temperature_out_of_range or parcel_near_expiry"
    )
    subject: str = Field(description="'' for the whole box, the door number, or the parcel id")
    compartment: int | None
    severity: Literal["info", "warning", "critical"]
    message: str
    details: dict[str, Any]
    open: bool
    raised_at: datetime = Field(description="when the backend raised it (wall clock)")
    raised_ts: datetime | None = Field(description="device time of the evidence that raised it")
    raised_by: str
    cleared_at: datetime | None
    cleared_ts: datetime | None
    cleared_by: str | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class AlertPage(BaseModel):
    items: list[AlertOut]
    next_before: int | None = Field(description="pass as ?before= for the next (older) page; null on the last")


class BoxDetail(BoxSummary):
    firmware: str | None
    compartments: list[CompartmentView]
    telemetry: TelemetryView | None
    alerts: list[AlertOut] = Field(default_factory=list, description="the open alerts, newest first")


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: CommandAction
    compartment: int | None = Field(None, ge=1, le=64, description="open_compartment, set_compartment_service")
    enabled: bool | None = Field(None, description="set_compartment_service, set_maintenance")
    timeout_s: float | None = Field(
        None, gt=0, le=86_400, description="no ack by then: timed_out (default MOLO_COMMAND_TIMEOUT_S)"
    )


CommandStatus = Literal["pending", "sent", "succeeded", "failed", "rejected", "timed_out"]


class CommandOut(BaseModel):
    command_id: UUID
    box_id: str
    action: str
    compartment: int | None
    enabled: bool | None
    status: CommandStatus
    detail: str | None
    requested_by: str | None
    created_at: datetime
    sent_at: datetime | None
    acked_at: datetime | None = Field(description="when the box's acknowledgement was received")
    ack_ts: datetime | None = Field(description="device time of the acknowledgement")
    expires_at: datetime | None


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


class HistoryBucket(BaseModel):
    """One time bucket of a box's telemetry (``GET /api/v1/boxes/{id}/history``)."""

    start: datetime = Field(description="the bucket's start, by the box's clock")
    readings: int = Field(description="telemetry readings in the bucket")
    occupied_mean: float = Field(description="parcel doors occupied, mean over the readings")
    occupied_max: int
    red_box_max_kg: float | None = Field(description="the fullest red box's weight, the highest reading")
    temperature_mean_c: float
    temperature_min_c: float
    temperature_max_c: float


class HistoryPage(BaseModel):
    box_id: str
    since: datetime
    until: datetime
    bucket: str
    items: list[HistoryBucket]
