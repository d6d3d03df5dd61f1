"""Endpoints under ``/api/v1/courier``: free capacity near a point or along stops, reservations
(holds on a compartment), and hazardous-waste pickups for vans with spare room.

Couriers act only for the carrier their key is bound to; operators may act for any carrier (and
must name it when reserving). Researchers are refused (403 ``forbidden_role``). Calls first mark
fulfilled and overdue holds ended (the capacity searches at most once a second; one sweep at a time,
a busy one is skipped); the capacity query itself never counts an overdue hold. No request sends a
release for an expired hold: :func:`sweep_periodically`, in the API's lifespan, does that and
re-sends releases that are missing, failed or timed out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, FastAPI, Query, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from backend.api.auth import CourierDep, Principal, Role, carrier_for
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import ApiError
from backend.couriers import repository, service
from backend.couriers.schemas import (
    CapacityOut,
    ParcelSize,
    ReservationIn,
    ReservationOut,
    RouteCapacityIn,
    RouteCapacityOut,
    WastePickupsOut,
)
from backend.settings import Settings
from contract import SizeClass
from contract.domain import Dimensions

router = APIRouter(prefix="/api/v1/courier", tags=["couriers"])
log = logging.getLogger(__name__)

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
    403: {"description": "`forbidden_role` (couriers and operators only) or `forbidden_carrier`"},
}
_SIZE_ERRORS: dict[int | str, dict[str, Any]] = {422: {"description": "`dimensions_exceed` or `invalid_request`"}}

Latitude = Annotated[float, Query(ge=-90, le=90, description="WGS84 latitude of the point")]
Longitude = Annotated[float, Query(ge=-180, le=180, description="WGS84 longitude of the point")]
Radius = Annotated[float, Query(gt=0, le=50_000, description="search radius, metres")]


def _commands(request: Request, settings: Settings) -> service.CommandContext:
    """The API's command sender (``app.state.commands``, made in the lifespan when a broker is set)."""
    return service.CommandContext(
        sender=getattr(request.app.state, "commands", None), timeout_s=settings.command_timeout_s
    )


#: The capacity searches sweep at most this often per API process: their query never counts an
#: overdue hold anyway, and this keeps two writes off the hot read path.
SWEEP_EVERY_S = 1.0


async def _sweep_now_and_then(request: Request, conn: ConnDep) -> None:
    now = time.monotonic()
    if now - getattr(request.app.state, "courier_swept_at", -SWEEP_EVERY_S) >= SWEEP_EVERY_S:
        request.app.state.courier_swept_at = now
        await service.sweep_expired(conn)


async def sweep_periodically(app: FastAPI, settings: Settings) -> None:
    """Run in the API's lifespan: every ``reservation_sweep_interval_s`` end fulfilled and overdue
    holds, send the releases of ended holds and re-send those missing, failed or timed out (at most
    ``reservation_release_attempts`` each, backing off from ``reservation_release_retry_s``), so
    boxes hear of expiries in quiet hours too and a door is not left held at the box for good. With
    several API processes each runs this, and one at a time does the pass (a session lock)."""
    interval = settings.reservation_sweep_interval_s
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            pool: AsyncConnectionPool[AsyncConnection[Any]] = app.state.pool
            async with pool.connection(timeout=5.0) as conn:
                ctx = service.CommandContext(getattr(app.state, "commands", None), settings.command_timeout_s)
                await service.periodic_pass(
                    conn,
                    ctx,
                    max_attempts=settings.reservation_release_attempts,
                    retry_s=settings.reservation_release_retry_s,
                )
        except Exception:  # the database may be down for a while; try again next time
            log.warning("reservation sweep failed; retrying in %g s", interval, exc_info=True)


def _size(
    size_class: SizeClass | None, height_mm: int | None, width_mm: int | None, depth_mm: int | None
) -> ParcelSize:
    dims = (height_mm, width_mm, depth_mm)
    if all(d is None for d in dims):
        if size_class is None:
            raise ApiError(422, "invalid_request", "give size_class or height_mm, width_mm and depth_mm")
        return ParcelSize(size_class=size_class)
    if any(d is None for d in dims) or size_class is not None:
        raise ApiError(422, "invalid_request", "give either size_class or all of height_mm, width_mm, depth_mm")
    return ParcelSize(
        dimensions_mm=Dimensions(height_mm=height_mm or 0, width_mm=width_mm or 0, depth_mm=depth_mm or 0)
    )


Mm = Annotated[int | None, Query(gt=0, le=3000, description="parcel dimension, mm")]


@router.get(
    "/capacity",
    response_model=CapacityOut,
    summary="Boxes near a point with free compartments that fit a parcel, nearest first",
    responses={**_AUTH, **_SIZE_ERRORS},
)
async def capacity(
    request: Request,
    conn: ConnDep,
    settings: SettingsDep,
    who: CourierDep,
    lat: Latitude,
    lon: Longitude,
    radius_m: Radius = 2000.0,
    size_class: Annotated[SizeClass | None, Query(description="A, B or C; or give the dimensions")] = None,
    height_mm: Mm = None,
    width_mm: Mm = None,
    depth_mm: Mm = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> CapacityOut:
    """Free = in service, not occupied by the latest reading, not held by a reservation. Offline
    boxes and boxes in maintenance are not offered."""
    size = _size(size_class, height_mm, width_mm, depth_mm)
    await _sweep_now_and_then(request, conn)
    return await service.capacity_near(
        conn,
        lat=lat,
        lon=lon,
        radius_m=radius_m,
        size=size,
        limit=limit,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
    )


@router.post(
    "/capacity/route",
    response_model=RouteCapacityOut,
    summary="Boxes near any of a route's stops with free compartments that fit a parcel",
    responses={**_AUTH, **_SIZE_ERRORS},
)
async def capacity_along_route(
    body: RouteCapacityIn, request: Request, conn: ConnDep, settings: SettingsDep, who: CourierDep
) -> RouteCapacityOut:
    await _sweep_now_and_then(request, conn)
    return await service.capacity_along(conn, body, heartbeat_timeout_s=settings.heartbeat_timeout_s)


@router.post(
    "/reservations",
    response_model=ReservationOut,
    status_code=201,
    summary="Hold the smallest free compartment that fits a parcel, until an expiry",
    responses={
        **_AUTH,
        404: {"description": "`box_not_found`"},
        409: {
            "description": "`locker_is_full`, `no_free_fitting_compartment`, `box_unavailable` (offline or in "
            "maintenance), `parcel_already_reserved`"
        },
        422: {"description": "`dimensions_exceed`, `carrier_required` or `invalid_request`"},
        503: {"description": "`database_busy` (lost repeated lock conflicts; retry) or `database_unavailable`"},
    },
)
async def create_reservation(
    body: ReservationIn, request: Request, conn: ConnDep, settings: SettingsDep, who: CourierDep
) -> ReservationOut:
    carrier = carrier_for(who, body.carrier)
    if carrier is None:
        raise ApiError(422, "carrier_required", "an operator reserving for a carrier must name it in `carrier`")
    return await service.reserve(
        conn,
        _commands(request, settings),
        body,
        carrier=carrier,
        key_id=who.key_id,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
    )


@router.get(
    "/reservations",
    response_model=list[ReservationOut],
    summary="The caller's carrier's reservations, newest first",
    responses=_AUTH,
)
async def list_reservations(
    request: Request,
    conn: ConnDep,
    settings: SettingsDep,
    who: CourierDep,
    status: Literal["active", "cancelled", "expired", "fulfilled", "rejected"] | None = None,
    box_id: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9-]{1,31}$")] = None,
    carrier: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_-]{1,31}$", description="operators")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ReservationOut]:
    await service.sweep_expired(conn)
    rows = await repository.list_reservations(
        conn, carrier=carrier_for(who, carrier), status=status, box_id=box_id, limit=limit
    )
    return [service.reservation_out(r) for r in rows]


def _own(who: Principal) -> str | None:
    return who.carrier if who.role is Role.COURIER else None


@router.get(
    "/reservations/{reservation_id}",
    response_model=ReservationOut,
    summary="One reservation (of the caller's carrier)",
    responses={**_AUTH, 404: {"description": "`reservation_not_found` (also for another carrier's)"}},
)
async def get_reservation(
    reservation_id: UUID, request: Request, conn: ConnDep, settings: SettingsDep, who: CourierDep
) -> ReservationOut:
    await service.sweep_expired(conn)
    return await service.get_visible(conn, reservation_id, _own(who))


@router.delete(
    "/reservations/{reservation_id}",
    response_model=ReservationOut,
    summary="Cancel a hold: the compartment is free again and the box is told",
    responses={
        **_AUTH,
        404: {"description": "`reservation_not_found` (also for another carrier's)"},
        409: {"description": "`reservation_not_active` (already cancelled, expired or fulfilled)"},
    },
)
async def cancel_reservation(
    reservation_id: UUID, request: Request, conn: ConnDep, settings: SettingsDep, who: CourierDep
) -> ReservationOut:
    await service.sweep_expired(conn)
    return await service.cancel(conn, _commands(request, settings), reservation_id, _own(who), who.key_id)


@router.get(
    "/waste-pickups",
    response_model=WastePickupsOut,
    summary="Red boxes with hazardous waste ready for collection near a point, with weight and fractions",
    responses=_AUTH,
)
async def waste_pickups(
    conn: ConnDep,
    settings: SettingsDep,
    who: CourierDep,
    lat: Latitude,
    lon: Longitude,
    radius_m: Radius = 5000.0,
    min_kg: Annotated[float, Query(ge=0, le=50, description="only red boxes holding at least this much")] = 0.0,
    max_total_kg: Annotated[
        float | None, Query(gt=0, le=1000, description="the van's spare allowance (e.g. its ADR limit)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> WastePickupsOut:
    """Ready = holding waste since its last collection (``waste.deposited`` events after the last
    ``waste.collected``), at a box that is online and not in maintenance. The collection itself is
    confirmed by the box's ``waste.collected`` event: after ingest stores it, the red box drops out."""
    return await service.waste_pickups(
        conn,
        lat=lat,
        lon=lon,
        radius_m=radius_m,
        min_kg=min_kg,
        max_total_kg=max_total_kg,
        limit=limit,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
    )
