"""Turns stored rows into what operators see: the online rule, occupancy by size, red-box fill.

Online means: the newest status message (by session) says online, and the box has been heard from
within ``heartbeat_timeout_s``. A box that stopped talking without its Last Will reaching us is
shown offline with reason ``heartbeat_timeout`` from the moment the timeout ran out.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta
from typing import Any, cast, get_args

import orjson

from backend.api.repository import STATUS_COLUMNS
from backend.api.schemas import (
    AlertOut,
    BoxDetail,
    CompartmentView,
    StatusReasonOut,
    TelemetryView,
)
from backend.operations.alerts import alert_data, alert_level
from contract import SIZE_DIMENSIONS_MM, BoxLayout, CompartmentKind, SizeClass
from contract.domain import RED_BOX_MAX_KG

Row = dict[str, Any]
log = logging.getLogger(__name__)
_REASONS = set(get_args(StatusReasonOut))


def online_state(row: Row, now: datetime, timeout: timedelta) -> tuple[bool, StatusReasonOut, datetime | None]:
    """(online, reason, since) for a box row; ``since`` is by the backend's clock (the box's: :func:`box_since`)."""
    if row.get("status_session") is None:
        return False, "never_seen", None
    stored = row.get("status_reason")
    reason = cast(StatusReasonOut, stored) if stored in _REASONS else "never_seen"
    since: datetime | None = row.get("status_changed_at")
    if not row.get("status_online"):
        return False, reason, since
    last = row.get("last_received_at")
    if last is None or now - last > timeout:
        return False, "heartbeat_timeout", (last + timeout) if last is not None else since
    return True, reason, since


def box_since(row: Row, reason: StatusReasonOut) -> datetime | None:
    """Since when a box's current status holds, by the box's clock (docs/operations.md, "Times").

    A birth or a shutdown carries the box's time; a Last Will carries none (it is written when the box
    connects and published whenever the link dies), nor does a silence the backend noticed, so those
    are dated by the box's last message (when it was last heard, by its own clock)."""
    if reason == "never_seen":
        return None
    if reason in {"connection_lost", "heartbeat_timeout"}:
        return row.get("last_seen_at") or row.get("status_ts")
    return row.get("status_ts") or row.get("last_seen_at")


@functools.lru_cache(maxsize=1024)
def _parse_layout(text: str) -> BoxLayout:
    """A layout's JSON text, parsed once per distinct text (boxes mostly share one; BoxLayout is frozen)."""
    return BoxLayout.model_validate_json(text)


def _layout(row: Row) -> BoxLayout | None:
    """The stored layout (JSON text, or an already decoded object); an invalid one (hand-edited row)
    is logged and treated as unknown, so one bad row never breaks the box list."""
    raw = row.get("layout")
    if not raw:
        return None
    try:
        return _parse_layout(raw) if isinstance(raw, str) else BoxLayout.model_validate(raw)
    except ValueError as exc:
        log.warning("box %s has an invalid stored layout (%s); showing it without compartments", row["box_id"], exc)
        return None


_DOORS: dict[int, tuple[BoxLayout, list[tuple[SizeClass, list[int]]]]] = {}


def _doors_by_size(layout: BoxLayout) -> list[tuple[SizeClass, list[int]]]:
    """The parcel door ids of each size class present, in SizeClass order; worked out once per
    layout object (:func:`_parse_layout` hands out one object per distinct layout)."""
    known = _DOORS.get(id(layout))
    if known is not None and known[0] is layout:
        return known[1]
    parcel = layout.parcel_compartments
    doors = [(size, [c.id for c in parcel if c.size_class is size]) for size in SizeClass]
    doors = [(size, ids) for size, ids in doors if ids]
    if len(_DOORS) > 4096:
        _DOORS.clear()
    _DOORS[id(layout)] = (layout, doors)
    return doors


def _readings(row: Row) -> tuple[dict[int, Row], dict[int, float]]:
    compartments = {int(c["id"]): c for c in (row.get("compartments") or [])}
    weights = {int(r["compartment"]): float(r["weight_kg"]) for r in (row.get("red_boxes") or [])}
    return compartments, weights


def summary_data(
    row: Row,
    now: datetime,
    timeout: timedelta,
    fills: dict[tuple[str, int], Row] | None = None,
    open_alerts: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The list view of a box as the plain data of a :class:`~backend.api.schemas.BoxSummary` (every field, JSON types
    but for datetimes); ``fills`` (red-box contents since collection) and ``open_alerts`` (kind and
    severity of each open alert) come from the operations tables. The box list writes thousands of
    these with orjson; a box's detail (:func:`detail`) validates one into its model."""
    online, reason, received = online_state(row, now, timeout)
    layout = _layout(row)
    readings, weights = _readings(row)
    occupancy: dict[str, dict[str, int]] = {}
    red_boxes: list[dict[str, Any]] = []
    if layout is not None:
        for size, ids in _doors_by_size(layout):
            occupied = broken = free = 0
            for door in ids:
                reading = readings.get(door)
                busy = bool(reading and reading.get("occupied"))
                out = reading is not None and reading.get("in_service") is False
                occupied += busy
                broken += out
                free += not busy and not out
            occupancy[size.value] = {"total": len(ids), "occupied": occupied, "out_of_service": broken, "free": free}
        for rb in layout.red_boxes:
            weight = weights.get(rb.id)
            cap = float(rb.red_box_capacity_kg)
            fill = (fills or {}).get((row["box_id"], rb.id))
            red_boxes.append(
                {
                    "compartment": rb.id,
                    "weight_kg": weight,
                    "capacity_kg": cap,
                    "fill_ratio": None if weight is None else round(weight / cap, 4),
                    "deposited_kg": round(float(fill["deposited_kg"]), 3) if fill else 0.0,
                    "deposits": int(fill["deposits"]) if fill else 0,
                    "fractions_kg": {k: float(v) for k, v in (fill["fractions"] or {}).items()} if fill else {},
                    "collected_ts": fill["collected_ts"] if fill else None,
                }
            )
    alerts = open_alerts or []
    return {
        "box_id": row["box_id"],
        "name": row.get("name"),
        "latitude": _float(row.get("latitude")),
        "longitude": _float(row.get("longitude")),
        "online": online,
        "status_reason": reason,
        "status_since": box_since(row, reason),
        "status_received_at": received,
        "session": int(row.get("status_session") or 0),
        "last_seen_at": row.get("last_seen_at"),
        "last_received_at": row.get("last_received_at"),
        "last_seq": int(row.get("last_seq") or 0),
        "occupancy": occupancy,
        "red_boxes": red_boxes,
        "temperature_c": _float(row.get("temperature_c")),
        "power": row.get("power"),
        "battery_pct": _float(row.get("battery_pct")),
        "maintenance": bool(row.get("maintenance")),
        "maintenance_since": row.get("maintenance_since"),
        "open_alerts": len(alerts),
        "open_alert_kinds": sorted({kind for kind, _ in alerts}),
        "alert_level": alert_level(severity for _, severity in alerts),
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def summaries_json(
    rows: list[Row],
    now: datetime,
    timeout: timedelta,
    fills: dict[tuple[str, int], Row],
    alerts: dict[str, list[tuple[str, str]]],
) -> bytes:
    """The JSON of ``GET /api/v1/boxes``: each row's :func:`summary_data`, written by orjson straight
    from dicts (a model per box, validated again by FastAPI's response model, was most of the time
    at 5,000 boxes: docs/benchmarks.md); the test compares every box with ``GET /api/v1/boxes/{id}``."""
    return orjson.dumps(
        [summary_data(r, now, timeout, fills, alerts.get(r["box_id"])) for r in rows], option=orjson.OPT_UTC_Z
    )


def statuses_json(rows: list[tuple[Any, ...]], now: datetime, timeout: timedelta, *, online: bool | None) -> bytes:
    """The JSON of ``GET /api/v1/box-status``: each :func:`~backend.api.repository.box_statuses` row as
    a :class:`BoxStatus` by the box list's own rules (:func:`online_state`, :func:`box_since`), written
    by orjson straight from dicts. Thousands of rows a request: a pydantic model per row tripled the
    time (docs/benchmarks.md); the test compares every field with the box list's."""
    out: list[dict[str, Any]] = []
    for values in rows:
        row = dict(zip(STATUS_COLUMNS, values, strict=True))
        is_online, reason, _ = online_state(row, now, timeout)
        if online is not None and is_online is not online:
            continue
        severities = row["severities"]
        out.append(
            {
                "box_id": row["box_id"],
                "online": is_online,
                "status_reason": reason,
                "status_since": box_since(row, reason),
                "session": int(row["status_session"] or 0),
                "last_seen_at": row["last_seen_at"],
                "last_received_at": row["last_received_at"],
                "last_seq": int(row["last_seq"] or 0),
                "maintenance": bool(row["maintenance"]),
                "open_alerts": len(severities),
                "alert_level": alert_level(severities),
            }
        )
    return orjson.dumps(out, option=orjson.OPT_UTC_Z)


def detail(
    row: Row,
    now: datetime,
    timeout: timedelta,
    fills: dict[tuple[str, int], Row] | None = None,
    alerts: list[Row] | None = None,
) -> BoxDetail:
    """One box with its compartments, latest telemetry and open alerts (``alerts``: alert rows)."""
    open_rows = alerts or []
    summary = summary_data(row, now, timeout, fills, [(a["kind"], a["severity"]) for a in open_rows])
    layout = _layout(row)
    readings, weights = _readings(row)
    compartments: list[CompartmentView] = []
    for c in layout.compartments if layout else []:
        reading = readings.get(c.id)
        dims = SIZE_DIMENSIONS_MM[c.size_class].model_dump() if c.size_class else None
        is_red = c.kind is CompartmentKind.RED_BOX
        compartments.append(
            CompartmentView(
                id=c.id,
                kind=c.kind,
                size_class=c.size_class,
                dimensions_mm=dims,
                occupied=reading.get("occupied") if reading else None,
                door_open=reading.get("door_open") if reading else None,
                in_service=reading.get("in_service") if reading else None,
                weight_kg=weights.get(c.id) if is_red else None,
                capacity_kg=(c.capacity_kg or RED_BOX_MAX_KG) if is_red else None,
            )
        )
    telemetry = None
    if row.get("telemetry_ts") is not None:
        telemetry = TelemetryView(
            ts=row["telemetry_ts"],
            seq=int(row["telemetry_seq"]),
            power=row.get("power"),
            battery_pct=row.get("battery_pct"),
            temperature_c=row.get("temperature_c"),
        )
    return BoxDetail(
        **summary,
        firmware=row.get("firmware"),
        compartments=compartments,
        telemetry=telemetry,
        alerts=[AlertOut(**alert_data(a)) for a in open_rows],
    )
