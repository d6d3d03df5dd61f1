"""Endpoints under ``/api/v1/kpis``: avoided trips and CO2 from ingested events, by the one method.

Where it sits: the end of a message's journey. Researchers and operators ask for any UTC-day range,
grouped by box, day, week, month, carrier or category, under the method's defaults or with
per-request overrides for sensitivity (``allocation``, ``waste_baseline``, ``parcel_baseline``,
``van_electric_share`` or any parameter as ``set=key.path=value``). Every answer carries the method
and the assumptions that produced it; ``/assumptions`` returns them alone, ``.csv`` the same figures
as CSV. The method: ``docs/methodology.md``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import ValidationError

from accounting import GROUPS, Method, UnknownPlaceError, apply_overrides, describe, to_csv
from accounting.assumptions import Allocation, ParcelBaseline, WasteBaseline
from backend.api.auth import ViewerDep
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import ApiError
from backend.impact import repository, service
from contract.topics import BOX_ID_PATTERN

router = APIRouter(prefix="/api/v1/kpis", tags=["kpis"])

#: The longest range one request may ask for (ten years of days).
MAX_DAYS = 3660
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "`invalid_range`, `invalid_parameter` (a bad override; details name the field) or "
        "`unknown_place` (the method needs a depot or station the network file lacks)"
    },
}
GroupBy = Literal[GROUPS]  # type: ignore[valid-type]
_BOX_ID = re.compile(BOX_ID_PATTERN)


def method_from(
    allocation: Allocation | None,
    waste_baseline: WasteBaseline | None,
    parcel_baseline: ParcelBaseline | None,
    van_electric_share: float | None,
    overrides: list[str] | None,
) -> Method:
    """The default method with the request's choices applied; 400 ``invalid_parameter`` if one is bad."""
    sets = list(overrides or [])
    if allocation is not None:
        sets.append(f'allocation="{allocation}"')
    if waste_baseline is not None:
        sets.append(f'baseline.waste="{waste_baseline}"')
    if parcel_baseline is not None:
        sets.append(f'baseline.parcels="{parcel_baseline}"')
    if van_electric_share is not None:
        sets.append(f"van_electric_share={van_electric_share!r}")
    try:
        return apply_overrides(Method(), sets)
    except ValidationError as exc:
        details = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise ApiError(400, "invalid_parameter", "a method parameter is invalid", details) from exc
    except ValueError as exc:
        raise ApiError(400, "invalid_parameter", str(exc)) from exc


class _Query:
    """The query parameters shared by the JSON and CSV answers."""

    def __init__(
        self,
        since: Annotated[date | None, Query(description="first UTC day (default: the first day with events)")] = None,
        until: Annotated[date | None, Query(description="UTC day after the last (default: after the last)")] = None,
        group_by: Annotated[list[GroupBy] | None, Query(description="group by (repeatable, up to 3)")] = None,
        box: Annotated[list[str] | None, Query(max_length=100, description="only these boxes (repeatable)")] = None,
        allocation: Annotated[Allocation | None, Query(description="how shared van trips are split")] = None,
        waste_baseline: Annotated[WasteBaseline | None, Query(description="hazardous-waste counterfactual")] = None,
        parcel_baseline: Annotated[ParcelBaseline | None, Query(description="parcel counterfactual")] = None,
        van_electric_share: Annotated[float | None, Query(ge=0, le=1, description="electric share of van-km")] = None,
        overrides: Annotated[
            list[str] | None,
            Query(alias="set", max_length=50, description="any method parameter as key.path=value (repeatable)"),
        ] = None,
    ) -> None:
        if group_by is not None and len(group_by) > 3:
            raise ApiError(400, "invalid_parameter", "group_by takes at most 3 keys")
        if group_by is not None and len(set(group_by)) != len(group_by):
            raise ApiError(400, "invalid_parameter", "group_by repeats a key")
        for box_id in box or []:
            if not _BOX_ID.fullmatch(box_id):
                raise ApiError(400, "invalid_parameter", f"{box_id!r} is not a box id")
        for item in overrides or []:
            if len(item) > 200:
                raise ApiError(400, "invalid_parameter", "an override is longer than 200 characters")
        self.since, self.until = since, until
        self.group_by: list[str] = list(group_by or [])
        self.boxes = box
        self.method = method_from(allocation, waste_baseline, parcel_baseline, van_electric_share, overrides)


async def _compute(q: _Query, conn: ConnDep, settings: SettingsDep) -> dict[str, Any]:
    since, until = q.since, q.until
    if since is None or until is None:
        span = await repository.activity_span(conn, q.boxes)
        today = datetime.now(UTC).date()
        first, last = span if span is not None else (today, today)  # no events yet: today, empty
        since = since or first
        until = until or last + timedelta(days=1)
    if since >= until:
        raise ApiError(400, "invalid_range", "since must be before until")
    if (until - since).days > MAX_DAYS:
        raise ApiError(400, "invalid_range", f"a request covers at most {MAX_DAYS} days")
    try:
        return await service.kpis(
            conn,
            since=since,
            until=until,
            method=q.method,
            group_by=q.group_by,
            boxes=q.boxes,
            network_file=settings.network_file,
        )
    except UnknownPlaceError as exc:  # e.g. waste.operator set to a company without a site
        raise ApiError(400, "unknown_place", f"the method needs a place the network does not have: {exc}") from exc


KpiQuery = Annotated[_Query, Depends()]


@router.get("", summary="Avoided trips, vehicle-km and kg CO2e over a range of days", responses=_ERRORS)
async def kpis(_: ViewerDep, conn: ConnDep, settings: SettingsDep, q: KpiQuery) -> dict[str, Any]:
    """Baseline, project and avoided figures (totals, per category, per vehicle and per group), with
    the method's choices and every assumption in force."""
    return await _compute(q, conn, settings)


@router.get(".csv", summary="The same figures as CSV", responses=_ERRORS, response_class=Response)
async def kpis_csv(_: ViewerDep, conn: ConnDep, settings: SettingsDep, q: KpiQuery) -> Response:
    """One row per group (or the totals), one column per scenario and metric, the method's choices in
    every row."""
    result = await _compute(q, conn, settings)
    name = f"molo-kpis_{result['period']['since']}_{result['period']['until']}.csv"
    return Response(
        to_csv(result),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/assumptions", summary="The method and every assumption in force", responses=_ERRORS)
async def assumptions(_: ViewerDep, q: KpiQuery) -> dict[str, Any]:
    """The method's choices and all parameters (with the request's overrides applied), and the source
    of every emission factor."""
    m = q.method
    return {
        "method": describe(m),
        "assumptions": m.model_dump(mode="json"),
        "intensities_kg_co2e_per_vkm": {
            v: dict(zip(("wtw", "ttw"), m.intensity(v), strict=True)) for v in ("van", "truck", "car")
        },
        "sources": {
            **{f"energy.{k}": e.source for k, e in m.factors.energy.items()},
            **{f"vehicles.{k}": v.source for k, v in m.factors.vehicles.items()},
        },
        "methodology": "docs/methodology.md",
    }
