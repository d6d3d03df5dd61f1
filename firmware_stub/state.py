"""What the box knows about itself right now: doors, occupancy, service flags, red-box fill.

Where it sits in a message's journey (see ``shared/DESIGN.md``): inside the box, next to the
outbox. The simulator (or a demo driver) changes this state as people use the box and emits the
matching events; commands from the backend change it too; telemetry reads it. It lives in memory
only -- like a real box, which re-reads its sensors after a reboot -- and every method is
thread-safe (one lock), because commands are executed on the firmware's worker thread while the
simulator drives the box from its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from contract import BoxLayout, CompartmentKind, SizeClass
from contract.messages import CompartmentReading, RedBoxReading
from firmware_stub.errors import UnknownCompartmentError

__all__ = ["BoxState", "CompartmentState"]


@dataclass(frozen=True, slots=True)
class CompartmentState:
    """A snapshot of one door. ``weight_kg`` is the red box's fill (0 for parcel doors)."""

    id: int
    kind: CompartmentKind
    size_class: SizeClass | None
    occupied: bool = False
    in_service: bool = True
    door_open: bool = False
    parcel_id: str | None = None
    weight_kg: float = 0.0
    #: Held for a courier's reservation (``reserve_compartment``): offered for nothing else.
    reserved: bool = False


class BoxState:
    """The live state of every compartment of one box, plus the box-wide maintenance flag.

    Getters return immutable :class:`CompartmentState` snapshots; setters raise
    :class:`~firmware_stub.errors.UnknownCompartmentError` for a door the layout does not have.
    The state does not emit events: the caller decides what happened and emits it.
    """

    def __init__(self, layout: BoxLayout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._doors: dict[int, CompartmentState] = {
            c.id: CompartmentState(id=c.id, kind=c.kind, size_class=c.size_class) for c in layout.compartments
        }
        self._maintenance = False

    # ------------------------------------------------------------------ reading

    def get(self, compartment_id: int) -> CompartmentState | None:
        """The door's snapshot, or None if the box has no such door."""
        with self._lock:
            return self._doors.get(compartment_id)

    def __getitem__(self, compartment_id: int) -> CompartmentState:
        door = self.get(compartment_id)
        if door is None:
            raise UnknownCompartmentError(f"box has no compartment {compartment_id}")
        return door

    def snapshot(self) -> list[CompartmentState]:
        """Every door, in id order."""
        with self._lock:
            return [self._doors[cid] for cid in sorted(self._doors)]

    @property
    def maintenance(self) -> bool:
        with self._lock:
            return self._maintenance

    @maintenance.setter
    def maintenance(self, enabled: bool) -> None:
        with self._lock:
            self._maintenance = enabled

    def free_parcel_compartments(self, size_class: SizeClass | None = None) -> list[int]:
        """Ids of empty, closed, in-service, unreserved parcel doors (of ``size_class`` if given)."""
        return [
            d.id
            for d in self.snapshot()
            if d.kind is CompartmentKind.PARCEL
            and not d.occupied
            and d.in_service
            and not d.door_open
            and not d.reserved
            and (size_class is None or d.size_class is size_class)
        ]

    def occupied_parcel_compartments(self) -> list[int]:
        """Ids of parcel doors holding a parcel."""
        return [d.id for d in self.snapshot() if d.kind is CompartmentKind.PARCEL and d.occupied]

    def readings(self) -> list[CompartmentReading]:
        """Per-door readings for a :class:`~contract.messages.Telemetry` payload."""
        return [
            CompartmentReading(id=d.id, occupied=d.occupied, door_open=d.door_open, in_service=d.in_service)
            for d in self.snapshot()
        ]

    def red_box_readings(self) -> list[RedBoxReading]:
        """Red-box fill readings for a :class:`~contract.messages.Telemetry` payload."""
        return [
            RedBoxReading(compartment=d.id, weight_kg=round(d.weight_kg, 3))
            for d in self.snapshot()
            if d.kind is CompartmentKind.RED_BOX
        ]

    # ------------------------------------------------------------------ changing

    def _update(self, compartment_id: int, **changes: object) -> CompartmentState:
        with self._lock:
            door = self._doors.get(compartment_id)
            if door is None:
                raise UnknownCompartmentError(f"box has no compartment {compartment_id}")
            new = replace(door, **changes)  # type: ignore[arg-type]
            self._doors[compartment_id] = new
            return new

    def set_door(self, compartment_id: int, open_: bool) -> CompartmentState:
        """Record the door as open or closed."""
        return self._update(compartment_id, door_open=open_)

    def set_in_service(self, compartment_id: int, in_service: bool) -> CompartmentState:
        """Take the door out of service, or put it back."""
        return self._update(compartment_id, in_service=in_service)

    def set_occupied(self, compartment_id: int, occupied: bool, parcel_id: str | None = None) -> CompartmentState:
        """Record a parcel put in (``occupied=True``, with its id; this ends a hold on the door) or taken out."""
        if occupied:
            return self._update(compartment_id, occupied=True, parcel_id=parcel_id, reserved=False)
        return self._update(compartment_id, occupied=False, parcel_id=None)

    def set_reserved(self, compartment_id: int, reserved: bool) -> CompartmentState:
        """Hold the door for a reservation, or end the hold."""
        return self._update(compartment_id, reserved=reserved)

    def add_waste(self, compartment_id: int, weight_kg: float) -> CompartmentState:
        """Add ``weight_kg`` to a red box's fill."""
        with self._lock:
            door = self._doors.get(compartment_id)
            if door is None:
                raise UnknownCompartmentError(f"box has no compartment {compartment_id}")
            new = replace(door, weight_kg=door.weight_kg + weight_kg, occupied=True)
            self._doors[compartment_id] = new
            return new

    def empty_red_box(self, compartment_id: int) -> float:
        """A collector swapped the red box: fill back to 0; returns the weight taken away."""
        with self._lock:
            door = self._doors.get(compartment_id)
            if door is None:
                raise UnknownCompartmentError(f"box has no compartment {compartment_id}")
            self._doors[compartment_id] = replace(door, weight_kg=0.0, occupied=False)
            return door.weight_kg
