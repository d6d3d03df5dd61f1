"""What the method consumes: the boxes' events counted per day, box and carrier.

Where it sits: between the event stream and ``accounting.method``. The backend reads these counts from
the ``activity_daily`` rollup in the database (migrations 0004 and 0008, kept by a trigger on the
events on both storage flavours); the simulator counts its own records with :class:`ActivityCounter`. Both hand the same
:class:`BoxDay` values to the method, which is why the API and the simulator cannot disagree on the
same events.

A day is the UTC date of the device timestamp (every event carries one). ``carrier`` is the event's
carrier, or None for events that name none (a resident's pickup or waste drop-off).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import Any

#: The event types the method reads; all others (doors, faults, telemetry) carry no trips.
COUNTED_TYPES: tuple[str, ...] = (
    "parcel.deposited",
    "parcel.collected",
    "parcel.expired",
    "parcel.dropped_off",
    "parcel.picked_up",
    "waste.deposited",
    "waste.collected",
)


@dataclass(slots=True)
class BoxDay:
    """One box's counted events on one day for one carrier (or, carrier None, for residents)."""

    day: date
    box_id: str
    carrier: str | None
    deposited_a: int = 0  # parcel.deposited by size class
    deposited_b: int = 0
    deposited_c: int = 0
    collected: int = 0  # parcel.collected
    expired: int = 0  # parcel.expired: taken back by the carrier's van
    dropped_off: int = 0  # parcel.dropped_off: a resident sends a parcel
    picked_up: int = 0  # parcel.picked_up: the carrier's van takes a sent parcel
    waste_deposits: int = 0  # waste.deposited
    waste_deposit_kg: float = 0.0
    waste_collections: int = 0  # waste.collected (a red box taken)
    waste_collected_kg: float = 0.0

    @property
    def parcels_delivered(self) -> int:
        return self.deposited_a + self.deposited_b + self.deposited_c

    @property
    def van_visit(self) -> bool:
        """A carrier's van stopped here: it delivered, took parcels away or took a red box."""
        return self.parcels_delivered > 0 or self.expired > 0 or self.picked_up > 0 or self.waste_collections > 0


#: The columns of a :class:`BoxDay`, in order (the database aggregate has the same).
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(BoxDay))
Key = tuple[date, str, str | None]  # (day, box, carrier)


DAY_MS = 86_400_000


def utc_day(ts_ms: int) -> date:
    """The UTC date of an epoch-millisecond device timestamp."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).date()


class ActivityCounter:
    """Counts events into :class:`BoxDay` values, exactly as the ``activity_daily`` aggregate does."""

    def __init__(self) -> None:
        self._days: dict[Key, BoxDay] = {}
        self._dates: dict[int, date] = {}  # utc_day by whole days since the epoch

    def add(self, ts_ms: int, box_id: str, type_: str, payload: dict[str, Any]) -> None:
        """Count one event (others than ``COUNTED_TYPES`` are ignored)."""
        if type_ not in COUNTED_TYPES:
            return
        carrier = payload.get("carrier")
        day = self._dates.get(ts_ms // DAY_MS)
        if day is None:
            day = self._dates[ts_ms // DAY_MS] = utc_day(ts_ms)
        key = (day, box_id, carrier if isinstance(carrier, str) else None)
        d = self._days.get(key)
        if d is None:
            d = self._days[key] = BoxDay(*key)
        if type_ == "parcel.deposited":
            size = payload.get("size_class")
            if size == "A":
                d.deposited_a += 1
            elif size == "B":
                d.deposited_b += 1
            else:
                d.deposited_c += 1
        elif type_ == "parcel.collected":
            d.collected += 1
        elif type_ == "parcel.expired":
            d.expired += 1
        elif type_ == "parcel.dropped_off":
            d.dropped_off += 1
        elif type_ == "parcel.picked_up":
            d.picked_up += 1
        elif type_ == "waste.deposited":
            d.waste_deposits += 1
            d.waste_deposit_kg += float(payload.get("weight_kg") or 0.0)
        else:  # waste.collected
            d.waste_collections += 1
            d.waste_collected_kg += float(payload.get("weight_kg") or 0.0)

    def rows(self) -> list[BoxDay]:
        """The counts, ordered by (day, box, carrier)."""
        return [self._days[k] for k in sorted(self._days, key=lambda k: (k[0], k[1], k[2] or ""))]
