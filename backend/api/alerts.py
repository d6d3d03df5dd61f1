"""Endpoints under ``/api/v1/alerts``: list and filter alerts, and acknowledge one.

Where it sits in a message's journey: last. Alerts are raised and cleared by ingest and the monitor
sweep (:mod:`backend.operations.alerts`, :mod:`backend.operations.monitor`); operators read them
here and acknowledge them (which records who and when, and tells the live stream).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from backend.api import repository
from backend.api.auth import OperatorDep, ViewerDep
from backend.api.deps import ConnDep
from backend.api.errors import ApiError
from backend.api.schemas import AlertOut, AlertPage
from backend.operations.alerts import AlertKind, alert_data
from contract.topics import BOX_ID_PATTERN

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
    403: {"description": "`forbidden_role`"},
}


@router.get("", response_model=AlertPage, summary="Alerts, newest first, filtered", responses=_AUTH)
async def list_alerts(
    conn: ConnDep,
    viewer: ViewerDep,
    box_id: Annotated[str | None, Query(pattern=BOX_ID_PATTERN)] = None,
    kind: Annotated[list[AlertKind] | None, Query(description="only these kinds (repeatable)")] = None,
    state: Annotated[Literal["open", "cleared", "all"], Query(description="open or cleared alerts")] = "all",
    acknowledged: Annotated[bool | None, Query(description="only (un)acknowledged alerts")] = None,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="the next_before of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertPage:
    rows = await repository.list_alerts(
        conn,
        box_id=box_id,
        kinds=[k.value for k in kind] if kind else None,
        state=state,
        acknowledged=acknowledged,
        before=before,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return AlertPage(items=[AlertOut(**alert_data(r)) for r in rows], next_before=rows[-1]["id"] if more else None)


AlertIdPath = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get(
    "/{alert_id}",
    response_model=AlertOut,
    summary="One alert",
    responses={**_AUTH, 404: {"description": "`alert_not_found`"}},
)
async def get_alert(alert_id: AlertIdPath, conn: ConnDep, viewer: ViewerDep) -> AlertOut:
    row = await repository.get_alert(conn, alert_id)
    if row is None:
        raise ApiError(404, "alert_not_found", f"no alert {alert_id}")
    return AlertOut(**alert_data(row))


@router.post(
    "/{alert_id}/ack",
    response_model=AlertOut,
    summary="Acknowledge an alert (operators)",
    responses={
        **_AUTH,
        404: {"description": "`alert_not_found`"},
        409: {"description": "`alert_already_acknowledged` (details: by whom and when)"},
    },
)
async def acknowledge(alert_id: AlertIdPath, conn: ConnDep, operator: OperatorDep) -> AlertOut:
    row = await repository.acknowledge_alert(conn, alert_id, f"{operator.name} [{operator.key_id}]")
    if row is not None:
        return AlertOut(**alert_data(row))
    existing = await repository.get_alert(conn, alert_id)
    if existing is None:
        raise ApiError(404, "alert_not_found", f"no alert {alert_id}")
    raise ApiError(
        409,
        "alert_already_acknowledged",
        f"alert {alert_id} was already acknowledged by {existing['acknowledged_by']}",
        {"acknowledged_by": existing["acknowledged_by"], "acknowledged_at": existing["acknowledged_at"].isoformat()},
    )
