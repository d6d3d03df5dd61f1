"""Unit tests of the firmware's pure parts: command execution, the command journal, box state and
the reconnect backoff. No broker, no network."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from contract import CompartmentKind, default_layout
from contract.messages import (
    Command,
    CommandAction,
    CommandResult,
    CompartmentFault,
    CompartmentRestored,
    DoorOpened,
    FaultKind,
)
from firmware_stub.backoff import Backoff
from firmware_stub.commands import MAX_DETAIL, CommandJournal, clip_detail, execute
from firmware_stub.db import DB_FILE
from firmware_stub.errors import UnknownCompartmentError
from firmware_stub.state import BoxState

TS = 1_767_225_600_000


def command(action: CommandAction, compartment: int | None = None, enabled: bool | None = None) -> Command:
    return Command(
        v=1,
        command_id=uuid.uuid4(),
        box_id="box-001",
        ts_ms=TS,
        action=action,
        compartment=compartment,
        enabled=enabled,
    )


# --------------------------------------------------------------------------- execute


def test_open_compartment_opens_the_door_and_emits_door_opened() -> None:
    """open_compartment on an in-service door succeeds, opens it, and yields a door.opened event."""
    state = BoxState(default_layout())
    outcome = execute(command(CommandAction.OPEN_COMPARTMENT, 5), state)
    assert outcome.result is CommandResult.SUCCEEDED
    assert outcome.events == [DoorOpened(compartment=5)]
    assert state[5].door_open is True


def test_open_unknown_or_out_of_service_compartment_is_rejected() -> None:
    """open_compartment is rejected, with a reason, for a missing door or one out of service."""
    state = BoxState(default_layout())
    missing = execute(command(CommandAction.OPEN_COMPARTMENT, 60), state)
    assert missing.result is CommandResult.REJECTED
    assert "no compartment 60" in (missing.detail or "")
    state.set_in_service(4, False)
    broken = execute(command(CommandAction.OPEN_COMPARTMENT, 4), state)
    assert broken.result is CommandResult.REJECTED
    assert "out of service" in (broken.detail or "")
    assert missing.events == broken.events == []
    assert state[4].door_open is False


def test_set_compartment_service_changes_state_and_emits_fault_or_restored() -> None:
    """Taking a door out of service emits compartment.fault(out_of_service); back in emits restored."""
    state = BoxState(default_layout())
    off = execute(command(CommandAction.SET_COMPARTMENT_SERVICE, 3, enabled=False), state)
    assert off.result is CommandResult.SUCCEEDED
    assert len(off.events) == 1
    assert isinstance(off.events[0], CompartmentFault)
    assert off.events[0].fault is FaultKind.OUT_OF_SERVICE
    assert state[3].in_service is False
    again = execute(command(CommandAction.SET_COMPARTMENT_SERVICE, 3, enabled=False), state)
    assert again.events == []
    on = execute(command(CommandAction.SET_COMPARTMENT_SERVICE, 3, enabled=True), state)
    assert on.events == [CompartmentRestored(compartment=3)]
    assert state[3].in_service is True


def test_maintenance_and_ping() -> None:
    """set_maintenance sets the box-wide flag; ping succeeds without touching state."""
    state = BoxState(default_layout())
    assert execute(command(CommandAction.SET_MAINTENANCE, enabled=True), state).result is CommandResult.SUCCEEDED
    assert state.maintenance is True
    pong = execute(command(CommandAction.PING), state)
    assert pong.result is CommandResult.SUCCEEDED
    assert pong.events == []


def test_clip_detail_fits_the_contract() -> None:
    """Ack details are cut to the contract's 500 characters and never contain NUL."""
    clipped = clip_detail("x\x00" + "y" * 1000)
    assert len(clipped) == MAX_DETAIL
    assert "\x00" not in clipped


# --------------------------------------------------------------------------- journal


def test_journal_remembers_acks_across_reopen(tmp_path: Path) -> None:
    """A finished command's ack bytes are found again after reopening the database."""
    cid = uuid.uuid4()
    journal = CommandJournal(tmp_path / DB_FILE)
    assert journal.get(cid) is None
    assert journal.begin(cid) is True
    assert journal.begin(cid) is False
    entry = journal.get(cid)
    assert entry is not None
    assert entry.done is False
    journal.finish(cid, b"ack-bytes")
    journal.close()
    reopened = CommandJournal(tmp_path / DB_FILE)
    entry = reopened.get(cid)
    assert entry is not None
    assert entry.done is True
    assert entry.ack == b"ack-bytes"
    reopened.close()


def test_journal_keeps_only_the_newest_entries(tmp_path: Path) -> None:
    """With max_entries=3, finishing a 5th command forgets the two oldest."""
    journal = CommandJournal(tmp_path / DB_FILE, max_entries=3)
    ids = [uuid.uuid4() for _ in range(5)]
    for cid in ids:
        journal.begin(cid)
        journal.finish(cid, cid.bytes)
    assert len(journal) == 3
    assert journal.get(ids[0]) is None
    assert journal.get(ids[4]) is not None
    journal.close()


# --------------------------------------------------------------------------- state


def test_state_tracks_parcels_and_red_boxes() -> None:
    """BoxState records parcels and red-box fill and reports them as telemetry readings."""
    state = BoxState(default_layout())
    free_before = state.free_parcel_compartments()
    state.set_occupied(free_before[0], True, parcel_id="P-1")
    state.add_waste(1, 0.5)
    state.add_waste(1, 0.25)
    assert state[free_before[0]].parcel_id == "P-1"
    assert state.occupied_parcel_compartments() == [free_before[0]]
    assert free_before[0] not in state.free_parcel_compartments()
    readings = {r.id: r for r in state.readings()}
    assert readings[free_before[0]].occupied is True
    assert {r.compartment: r.weight_kg for r in state.red_box_readings()} == {1: 0.75, 2: 0.0}
    assert state.empty_red_box(1) == 0.75
    assert all(state[c].kind is CompartmentKind.RED_BOX for c in (1, 2))


def test_state_refuses_unknown_compartments() -> None:
    """Changing a door the layout does not have raises UnknownCompartmentError."""
    state = BoxState(default_layout())
    assert state.get(99) is None
    with pytest.raises(UnknownCompartmentError):
        state.set_door(99, True)


# --------------------------------------------------------------------------- backoff


def test_backoff_ceiling_doubles_up_to_the_cap_and_resets() -> None:
    """Delay ceilings go base, 2*base, 4*base ... up to cap; every delay is below its ceiling."""
    backoff = Backoff(0.5, 4.0, random.Random(7))
    ceilings, delays = [], []
    for _ in range(6):
        ceilings.append(backoff.ceiling())
        delays.append(backoff.next_delay())
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_backoff_jitter_is_reproducible_with_a_seed_and_varies() -> None:
    """Two backoffs with the same seed give the same delays; the delays are not all equal."""
    first, second = Backoff(rng=random.Random(1)), Backoff(rng=random.Random(1))
    assert [first.next_delay() for _ in range(5)] == [second.next_delay() for _ in range(5)]
    many = Backoff(1.0, 1.0, random.Random(2))
    assert len({many.next_delay() for _ in range(10)}) == 10
