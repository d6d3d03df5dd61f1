"""The courier rules: what is free, which compartment a hold takes, and why a booking is refused.

Free means: a parcel door, in service and not occupied by the box's latest reading, and not held by
an unexpired active reservation. Boxes offline (the API's heartbeat rule) or in maintenance offer
nothing. A hold takes the smallest free size the parcel fits, lowest door first.

No overbooking: a hold is taken in one transaction that first takes a per-box advisory lock, so two
couriers racing for the last door are served one after the other and the second sees it held; the
partial unique index ``reservations_one_active_hold`` refuses a second active hold on a door even if
some other code path forgot the lock. Under that lock the box's overdue holds are first ended
(``expired``), then every ``active`` row counts as held: exactly what the index sees. A hold
transaction that deadlocks or fails to serialise is retried once.

Boxes are told: a hold's reserve_compartment is sent by the request; a cancel tries its release once
(failing at once if the broker connection is down). Requests only *mark* holds ended
(:func:`sweep_expired`, one sweeper at a time); the releases of expired holds, and re-sends of
releases that are missing, failed or timed out, are sent by the API's periodic sweeper
(:func:`send_releases`), never by a request.

Refusals, after the GLS/NXT locker API (``shared/DOMAIN.md``): ``dimensions_exceed`` (the parcel fits
no compartment the box has), ``locker_is_full`` (no free parcel door at all),
``no_free_fitting_compartment`` (free doors, none large enough), ``box_unavailable`` (offline or in
maintenance), ``box_not_found``, ``parcel_already_reserved``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from psycopg import AsyncConnection, errors

from backend.api.errors import ApiError
from backend.api.service import online_state
from backend.couriers import repository
from backend.couriers.fit import SIZES_SMALLEST_FIRST, bounding_box, fitting_sizes, haversine_m
from backend.couriers.schemas import (
    BoxCapacity,
    CapacityOut,
    CommandRef,
    ParcelSize,
    RedBoxPickup,
    ReservationIn,
    ReservationOut,
    RouteBoxCapacity,
    RouteCapacityIn,
    RouteCapacityOut,
    WastePickup,
    WastePickupsOut,
)
from backend.operations.commands import CONNECT_WAIT_S, CommandRequest, CommandSender, send_command
from contract import BoxLayout, SizeClass
from contract.domain import RED_BOX_MAX_KG, Dimensions, WasteFraction
from contract.messages import CommandAction

log = logging.getLogger(__name__)
Row = dict[str, Any]
_SIZE_VALUES = frozenset(s.value for s in SizeClass)
_FRACTION_VALUES = frozenset(f.value for f in WasteFraction)


@dataclass(frozen=True)
class CommandContext:
    """How to tell boxes: the API's command sender (None without a broker) and the ack timeout."""

    sender: CommandSender | None
    timeout_s: float


def sizes_for(size: ParcelSize) -> list[SizeClass]:
    """The size classes the parcel fits, smallest first; 422 ``dimensions_exceed`` if none."""
    sizes = fitting_sizes(size.size_class, size.dimensions_mm)
    if not sizes:
        dims = size.dimensions_mm
        raise ApiError(
            422,
            "dimensions_exceed",
            f"a parcel of {dims.height_mm}x{dims.width_mm}x{dims.depth_mm} mm fits no compartment size"
            if dims
            else "the parcel fits no compartment size",
        )
    return sizes


def _capacity(row: Row, sizes: list[SizeClass]) -> BoxCapacity:
    free = {SizeClass(k): int(v) for k, v in (row["free_by_size"] or {}).items() if k in _SIZE_VALUES}
    smallest = next(s for s in sizes if free.get(s))
    return BoxCapacity(
        box_id=row["box_id"],
        name=row["name"],
        latitude=row["latitude"],
        longitude=row["longitude"],
        distance_m=round(float(row["distance_m"]), 1),
        free_fitting=int(row["fitting"]),
        free_by_size=free,
        smallest_fitting_size=smallest,
    )


async def capacity_near(
    conn: AsyncConnection[Any],
    *,
    lat: float,
    lon: float,
    radius_m: float,
    size: ParcelSize,
    limit: int,
    heartbeat_timeout_s: float,
) -> CapacityOut:
    sizes = sizes_for(size)
    rows = await repository.free_capacity_near(
        conn,
        lat=lat,
        lon=lon,
        radius_m=radius_m,
        bbox=bounding_box(lat, lon, radius_m),
        sizes=[s.value for s in sizes],
        timeout_s=heartbeat_timeout_s,
        limit=limit,
    )
    return CapacityOut(fitting_sizes=sizes, boxes=[_capacity(r, sizes) for r in rows])


async def capacity_along(
    conn: AsyncConnection[Any], route: RouteCapacityIn, *, heartbeat_timeout_s: float
) -> RouteCapacityOut:
    """Boxes within ``radius_m`` of any stop, each with the stop it is nearest to, nearest first."""
    sizes = sizes_for(route)
    best: dict[str, RouteBoxCapacity] = {}
    for index, stop in enumerate(route.stops):
        rows = await repository.free_capacity_near(
            conn,
            lat=stop.latitude,
            lon=stop.longitude,
            radius_m=route.radius_m,
            bbox=bounding_box(stop.latitude, stop.longitude, route.radius_m),
            sizes=[s.value for s in sizes],
            timeout_s=heartbeat_timeout_s,
            limit=route.limit,
        )
        for row in rows:
            found = RouteBoxCapacity(**_capacity(row, sizes).model_dump(), nearest_stop=index)
            if row["box_id"] not in best or found.distance_m < best[row["box_id"]].distance_m:
                best[row["box_id"]] = found
    boxes = sorted(best.values(), key=lambda b: (b.distance_m, b.box_id))[: route.limit]
    return RouteCapacityOut(fitting_sizes=sizes, boxes=boxes)


def _layout(row: Row) -> BoxLayout | None:
    try:
        return BoxLayout.model_validate(row["layout"]) if row.get("layout") else None
    except ValueError:
        return None


def choose_compartment(
    layout: BoxLayout, readings: list[Row] | None, held: set[int], sizes: list[SizeClass], box_id: str
) -> tuple[int, SizeClass]:
    """The door a hold takes: smallest fitting free size, lowest id; or the precise refusal."""
    by_id = {int(r["id"]): r for r in readings or []}
    doors = layout.parcel_compartments
    if not any(d.size_class in sizes for d in doors):
        raise ApiError(422, "dimensions_exceed", f"the parcel fits no compartment of box {box_id}")
    free = [
        d
        for d in doors
        if by_id.get(d.id, {}).get("in_service") is not False
        and not by_id.get(d.id, {}).get("occupied")
        and d.id not in held
    ]
    if not free:
        raise ApiError(409, "locker_is_full", f"box {box_id} has no free compartment")
    for size in sizes:  # smallest first
        fitting = sorted(d.id for d in free if d.size_class is size)
        if fitting:
            return fitting[0], size
    free_sizes = sorted({d.size_class.value for d in free if d.size_class is not None})
    raise ApiError(
        409,
        "no_free_fitting_compartment",
        f"box {box_id} has free compartments ({', '.join(free_sizes)}) but none the parcel fits",
        {"free_sizes": free_sizes},
    )


def reservation_out(row: Row) -> ReservationOut:
    dims = None
    if row["height_mm"] is not None:
        dims = Dimensions(height_mm=row["height_mm"], width_mm=row["width_mm"], depth_mm=row["depth_mm"])
    release = None
    if row["release_command_id"] is not None:
        release = CommandRef(command_id=row["release_command_id"], status=row["release_command_status"])
    return ReservationOut(
        reservation_id=row["reservation_id"],
        box_id=row["box_id"],
        compartment=row["compartment"],
        size_class=SizeClass(row["size_class"]),
        carrier=row["carrier"],
        parcel_id=row["parcel_id"],
        dimensions_mm=dims,
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        ended_at=row["ended_at"],
        reserve_command=CommandRef(command_id=row["command_id"], status=row["command_status"]),
        release_command=release,
    )


#: The sweep's advisory lock key ("mres"): one sweep at a time, others skip (as the monitor's does).
SWEEP_LOCK_KEY = 0x6D726573
#: The periodic pass's session lock ("mrep"): with several API processes one passes at a time, the
#: others skip that turn.
PERIODIC_LOCK_KEY = 0x6D726570
#: Releases handled per periodic pass (the rest wait for the next one).
RELEASES_PER_PASS = 100
_RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)
T = TypeVar("T")
#: Attempts of a hold transaction (or of linking a hold to its command) that PostgreSQL rolled back
#: for a lock conflict (a deadlock with another writer); between attempts a jittered pause of up to
#: ``attempt * RETRY_PAUSE_S``.
ATTEMPTS = 5
RETRY_PAUSE_S = 0.02


async def _retried(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` (one transaction or one statement, rolled back as a whole when it loses a lock
    conflict) again while it loses, up to :data:`ATTEMPTS` times; then 503 ``database_busy``."""
    for n in range(1, ATTEMPTS + 1):
        try:
            return await attempt()
        except _RETRYABLE as exc:
            if n == ATTEMPTS:
                raise ApiError(503, "database_busy", f"{what} lost {n} lock conflicts in a row; retry") from exc
            log.info("%s retried (attempt %d): %s", what, n, exc)
            await asyncio.sleep(random.uniform(0, n * RETRY_PAUSE_S))
    raise AssertionError("unreachable")


async def _tell_box(
    conn: AsyncConnection[Any],
    ctx: CommandContext,
    reservation_id: UUID,
    box_id: str,
    compartment: int,
    action: CommandAction,
    requested_by: str,
    *,
    connect_wait_s: float = CONNECT_WAIT_S,
) -> None:
    """Send the command (recorded in ``commands``) and link it to the reservation. A broker that is
    down does not undo the hold: the command row says ``failed`` and the reservation shows it."""
    column = "command_id" if action is CommandAction.RESERVE_COMPARTMENT else "release_command_id"
    row = await send_command(
        conn,
        ctx.sender,
        CommandRequest(box_id=box_id, action=action, compartment=compartment),
        requested_by=requested_by,
        timeout_s=ctx.timeout_s,
        connect_wait_s=connect_wait_s,
    )
    # One statement, but it can still lose a deadlock (it queues for the row behind other writers).
    await _retried(
        f"linking reservation {reservation_id} to its command",
        lambda: repository.set_command(conn, reservation_id, column, row["command_id"]),
    )


async def sweep_expired(conn: AsyncConnection[Any]) -> int:
    """End holds whose parcel went in (``fulfilled``), those the box refused (``rejected``) and
    overdue ones (``expired``); returns how many expired. Only marks: nothing is sent to a box here
    (the periodic sweeper's :func:`send_releases` does that). If another sweep holds the lock, or
    this one deadlocks with a hold transaction, it is skipped: the capacity query never counts an
    overdue hold, so this only has to catch up, not be on time."""
    try:
        async with conn.transaction():
            if not await repository.try_sweep_lock(conn, SWEEP_LOCK_KEY):
                return 0
            await repository.end_fulfilled(conn)
            await repository.end_rejected(conn)
            return len(await repository.end_expired(conn))
    except _RETRYABLE as exc:
        log.info("reservation sweep skipped: %s", exc)
        return 0


async def periodic_pass(conn: AsyncConnection[Any], ctx: CommandContext, *, max_attempts: int, retry_s: float) -> bool:
    """The periodic sweeper's turn: :func:`sweep_expired`, then :func:`send_releases`, under a lock
    so that of several API processes one at a time does it. False: another process was at it."""
    if not await repository.try_session_lock(conn, PERIODIC_LOCK_KEY):
        return False
    try:
        await sweep_expired(conn)
        await send_releases(conn, ctx, max_attempts=max_attempts, retry_s=retry_s)
    finally:
        await repository.unlock_session(conn, PERIODIC_LOCK_KEY)
    return True


async def send_releases(conn: AsyncConnection[Any], ctx: CommandContext, *, max_attempts: int, retry_s: float) -> int:
    """Send release_compartment for ended holds whose release is missing, failed or timed out
    (:func:`repository.releases_due`); returns how many were handed to the broker. Skipped while
    the sender is not connected (no attempt is spent then). Each is sent under the box's hold lock,
    after checking no newer hold took the door, so a release never overtakes a newer reserve."""
    if ctx.sender is None or not ctx.sender.is_connected():
        return 0
    sent = 0
    for row in await repository.releases_due(conn, max_attempts=max_attempts, limit=RELEASES_PER_PASS):
        box_id = row["box_id"]
        await repository.lock_box_session(conn, box_id)
        try:
            if not await repository.claim_release(conn, row["reservation_id"], row["release_attempts"], retry_s):
                continue
            await _tell_box(
                conn,
                ctx,
                row["reservation_id"],
                box_id,
                row["compartment"],
                CommandAction.RELEASE_COMPARTMENT,
                f"reservation {row['reservation_id']} {row['status']}"
                + (f" (release attempt {row['release_attempts'] + 1})" if row["release_attempts"] else ""),
                connect_wait_s=0,
            )
            sent += 1
        except Exception:  # one box's release must not stop the others (the hold has ended anyway)
            log.exception("could not send the release for reservation %s", row["reservation_id"])
        finally:
            await repository.unlock_box_session(conn, box_id)
    return sent


async def _hold(
    conn: AsyncConnection[Any],
    request: ReservationIn,
    sizes: list[SizeClass],
    reservation_id: UUID,
    *,
    carrier: str,
    key_id: str,
    heartbeat_timeout_s: float,
) -> int:
    """The locked per-box transaction that takes a door; returns the compartment."""
    dims = request.dimensions_mm
    async with conn.transaction():
        await repository.lock_box(conn, request.box_id)
        box = await repository.box_for_hold(conn, request.box_id)
        layout = _layout(box) if box else None
        if box is None or layout is None:
            raise ApiError(404, "box_not_found", f"no box {request.box_id!r} with a known layout")
        online, reason, _ = online_state(box, datetime.now(UTC), timedelta(seconds=heartbeat_timeout_s))
        if not online:
            raise ApiError(409, "box_unavailable", f"box {request.box_id} is offline ({reason})", {"state": "offline"})
        if box["maintenance"]:
            raise ApiError(409, "box_unavailable", f"box {request.box_id} is in maintenance", {"state": "maintenance"})
        # Overdue holds of this box end now (their releases go out with the periodic sweeper), so
        # every remaining active row is a real hold: the same rows the partial unique index sees.
        await repository.end_expired(conn, request.box_id)
        existing = await repository.active_for_parcel(conn, carrier, request.parcel_id)
        if existing is not None:
            raise ApiError(
                409,
                "parcel_already_reserved",
                f"parcel {request.parcel_id} of {carrier} already holds reservation {existing}",
                {"reservation_id": str(existing)},
            )
        held = await repository.held_compartments(conn, request.box_id)
        compartment, size = choose_compartment(layout, box["readings"], held, sizes, request.box_id)
        try:
            await repository.insert_reservation(
                conn,
                reservation_id=reservation_id,
                box_id=request.box_id,
                compartment=compartment,
                size_class=size.value,
                carrier=carrier,
                parcel_id=request.parcel_id,
                dimensions=(dims.height_mm, dims.width_mm, dims.depth_mm) if dims else None,
                created_by=key_id,
                hold_s=request.hold_minutes * 60.0,
            )
        except errors.UniqueViolation as exc:  # the index backs the lock up; never expected with it
            raise ApiError(
                409, "reservation_conflict", "another hold took this compartment at the same moment; retry"
            ) from exc
    return compartment


async def reserve(
    conn: AsyncConnection[Any],
    ctx: CommandContext,
    request: ReservationIn,
    *,
    carrier: str,
    key_id: str,
    heartbeat_timeout_s: float,
) -> ReservationOut:
    sizes = sizes_for(request)
    await sweep_expired(conn)
    reservation_id = uuid.uuid4()
    compartment = await _retried(
        f"the hold on box {request.box_id}",
        lambda: _hold(
            conn,
            request,
            sizes,
            reservation_id,
            carrier=carrier,
            key_id=key_id,
            heartbeat_timeout_s=heartbeat_timeout_s,
        ),
    )
    await _tell_box(
        conn,
        ctx,
        reservation_id,
        request.box_id,
        compartment,
        CommandAction.RESERVE_COMPARTMENT,
        f"reservation {reservation_id} by key {key_id}",
    )
    return await get_visible(conn, reservation_id, carrier)


async def get_visible(conn: AsyncConnection[Any], reservation_id: UUID, carrier: str | None) -> ReservationOut:
    """The reservation if ``carrier`` may see it (None: any); else 404 ``reservation_not_found``,
    the same answer as for an id that does not exist, so other carriers' ids leak nothing."""
    row = await repository.get_reservation(conn, reservation_id)
    if row is None or (carrier is not None and row["carrier"] != carrier):
        raise ApiError(404, "reservation_not_found", f"no reservation {reservation_id}")
    return reservation_out(row)


async def cancel(
    conn: AsyncConnection[Any], ctx: CommandContext, reservation_id: UUID, carrier: str | None, key_id: str
) -> ReservationOut:
    current = await get_visible(conn, reservation_id, carrier)
    if current.status != "active":
        raise ApiError(
            409,
            "reservation_not_active",
            f"reservation {reservation_id} is {current.status}",
            {"status": current.status},
        )
    async with conn.transaction():
        ended = await repository.cancel(conn, reservation_id)
    if ended is None:  # it expired or was cancelled between the read and the update
        return await cancel(conn, ctx, reservation_id, carrier, key_id)
    # Under the box's hold lock, as the sweeper's releases: a hold taken on the door since the
    # cancel committed gets no release after its reserve (the box would free the newer hold's door).
    await repository.lock_box_session(conn, ended["box_id"])
    try:
        if not await repository.superseded(conn, reservation_id):
            await _tell_box(
                conn,
                ctx,
                reservation_id,
                ended["box_id"],
                ended["compartment"],
                CommandAction.RELEASE_COMPARTMENT,
                f"reservation {reservation_id} cancelled by key {key_id}",
                connect_wait_s=0,  # broker down: failed at once; the periodic sweeper sends it later
            )
    finally:
        await repository.unlock_box_session(conn, ended["box_id"])
    return await get_visible(conn, reservation_id, carrier)


async def waste_pickups(
    conn: AsyncConnection[Any],
    *,
    lat: float,
    lon: float,
    radius_m: float,
    min_kg: float,
    max_total_kg: float | None,
    limit: int,
    heartbeat_timeout_s: float,
) -> WastePickupsOut:
    """Red boxes with waste at available boxes near the point, nearest first. With ``max_total_kg``
    (the van's spare allowance, e.g. its ADR limit), boxes are taken nearest first while they fit."""
    rows = await repository.waste_pickups(
        conn,
        lat=lat,
        lon=lon,
        radius_m=radius_m,
        bbox=bounding_box(lat, lon, radius_m),
        timeout_s=heartbeat_timeout_s,
        limit=limit * 8,
    )
    boxes: dict[str, WastePickup] = {}
    for row in rows:
        layout = _layout(row)
        door = layout.get(row["compartment"]) if layout else None
        capacity = door.red_box_capacity_kg if door else RED_BOX_MAX_KG
        deposited = float(row["deposited_kg"])
        weighed = None if row["weighed_kg"] is None else float(row["weighed_kg"])
        newer_reading = (
            weighed is not None
            and row["telemetry_ts"] is not None
            and (row["collected_ts"] is None or row["telemetry_ts"] > row["collected_ts"])
        )
        weight = max(deposited, weighed) if newer_reading and weighed is not None else deposited
        if weight < min_kg:
            continue
        fractions = {
            WasteFraction(k): round(float(v), 3) for k, v in (row["fractions"] or {}).items() if k in _FRACTION_VALUES
        }
        pickup = RedBoxPickup(
            compartment=row["compartment"],
            weight_kg=round(weight, 3),
            deposited_kg=round(deposited, 3),
            weighed_kg=weighed,
            capacity_kg=capacity,
            fill_ratio=round(weight / capacity, 4),
            deposits=int(row["deposits"]),
            fractions_kg=fractions,
            since=row["collected_ts"],
        )
        box = boxes.get(row["box_id"])
        if box is None:
            box = boxes[row["box_id"]] = WastePickup(
                box_id=row["box_id"],
                name=row["name"],
                latitude=row["latitude"],
                longitude=row["longitude"],
                distance_m=round(haversine_m(lat, lon, row["latitude"], row["longitude"]), 1),
                weight_kg=0.0,
                red_boxes=[],
            )
        box.red_boxes.append(pickup)
        box.weight_kg = round(box.weight_kg + pickup.weight_kg, 3)
    chosen: list[WastePickup] = []
    total = 0.0
    for box in sorted(boxes.values(), key=lambda b: (b.distance_m, b.box_id)):
        if max_total_kg is not None and total + box.weight_kg > max_total_kg:
            continue
        chosen.append(box)
        total += box.weight_kg
        if len(chosen) >= limit:
            break
    return WastePickupsOut(total_weight_kg=round(total, 3), boxes=chosen)


__all__ = [
    "SIZES_SMALLEST_FIRST",
    "CommandContext",
    "cancel",
    "capacity_along",
    "capacity_near",
    "choose_compartment",
    "get_visible",
    "reserve",
    "send_releases",
    "sizes_for",
    "sweep_expired",
    "waste_pickups",
]
