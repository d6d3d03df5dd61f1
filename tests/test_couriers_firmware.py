"""The firmware's side of reservations: reserve_compartment / release_compartment on a box state,
and the courier fitting rules. No broker, no network."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from backend.couriers.fit import bounding_box, fitting_sizes, haversine_m
from contract import SizeClass, default_layout
from contract.domain import Dimensions
from contract.errors import ContractError
from contract.messages import Command, CommandAction, CommandResult, decode_command
from firmware_stub.commands import execute
from firmware_stub.state import BoxState

TS = 1_767_225_600_000


def command(action: CommandAction, compartment: int | None) -> Command:
    return Command(v=1, command_id=uuid.uuid4(), box_id="box-001", ts_ms=TS, action=action, compartment=compartment)


def test_reserve_holds_a_free_parcel_door_and_release_ends_it() -> None:
    """reserve_compartment holds an empty door (no longer offered as free); again is harmless;
    release_compartment frees it; releasing a free door also succeeds."""
    state = BoxState(default_layout())
    assert execute(command(CommandAction.RESERVE_COMPARTMENT, 5), state).result is CommandResult.SUCCEEDED
    assert state[5].reserved
    assert 5 not in state.free_parcel_compartments()
    again = execute(command(CommandAction.RESERVE_COMPARTMENT, 5), state)
    assert (again.result, again.detail) == (CommandResult.SUCCEEDED, "compartment 5 was already reserved")
    assert execute(command(CommandAction.RELEASE_COMPARTMENT, 5), state).result is CommandResult.SUCCEEDED
    assert not state[5].reserved
    assert 5 in state.free_parcel_compartments()
    assert execute(command(CommandAction.RELEASE_COMPARTMENT, 5), state).detail == "compartment 5 was not reserved"


@pytest.mark.parametrize(
    ("prepare", "door", "detail"),
    [
        (lambda s: None, 1, "compartment 1 is not a parcel door"),
        (lambda s: s.set_occupied(6, True, "P-1"), 6, "compartment 6 is occupied"),
        (lambda s: s.set_in_service(7, False), 7, "compartment 7 is out of service"),
        (lambda s: None, 60, "box box-001 has no compartment 60"),
    ],
)
def test_reserve_is_rejected_for_red_box_occupied_broken_or_missing_doors(
    prepare: Callable[[BoxState], object], door: int, detail: str
) -> None:
    """A red-box door, an occupied door, one out of service, or one the box lacks cannot be held."""
    state = BoxState(default_layout())
    prepare(state)
    outcome = execute(command(CommandAction.RESERVE_COMPARTMENT, door), state)
    assert (outcome.result, outcome.detail) == (CommandResult.REJECTED, detail)


def test_a_parcel_put_in_ends_the_hold() -> None:
    """When the reserving courier's parcel goes into the held door, the hold is over."""
    state = BoxState(default_layout())
    execute(command(CommandAction.RESERVE_COMPARTMENT, 8), state)
    state.set_occupied(8, True, "P-8")
    assert not state[8].reserved


def test_reserve_and_release_commands_need_a_compartment() -> None:
    """The contract refuses reserve/release commands without a compartment."""
    for action in (CommandAction.RESERVE_COMPARTMENT, CommandAction.RELEASE_COMPARTMENT):
        raw = (
            f'{{"v":1,"command_id":"{uuid.uuid4()}","box_id":"box-001","ts_ms":{TS},"action":"{action.value}"}}'
        ).encode()
        with pytest.raises(ContractError):
            decode_command(raw)


@pytest.mark.parametrize(
    ("size", "dims", "expected"),
    [
        (SizeClass.A, None, [SizeClass.A, SizeClass.B, SizeClass.C]),
        (SizeClass.C, None, [SizeClass.C]),
        (None, Dimensions(height_mm=640, width_mm=80, depth_mm=380), [SizeClass.A, SizeClass.B, SizeClass.C]),
        (None, Dimensions(height_mm=400, width_mm=380, depth_mm=640), [SizeClass.C]),
        (None, Dimensions(height_mm=420, width_mm=380, depth_mm=640), []),
    ],
)
def test_fitting_sizes_smallest_first_in_any_orientation(
    size: SizeClass | None, dims: Dimensions | None, expected: list[SizeClass]
) -> None:
    """A parcel fits every size whose compartment holds it in some orientation, smallest first."""
    assert fitting_sizes(size, dims) == expected


def test_distance_and_bounding_box() -> None:
    """Haversine distance is right to a metre for a degree of latitude, and the bounding box of a
    radius contains every point at that distance."""
    assert haversine_m(57.0, 9.9, 58.0, 9.9) == pytest.approx(111_195, abs=1)
    lat_min, lat_max, lon_min, lon_max = bounding_box(57.05, 9.92, 2000)
    assert haversine_m(57.05, 9.92, lat_max, 9.92) >= 2000
    assert haversine_m(57.05, 9.92, 57.05, lon_max) >= 2000
    assert lat_min < 57.05 < lat_max
    assert lon_min < 9.92 < lon_max
