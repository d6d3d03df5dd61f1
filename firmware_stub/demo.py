"""A plausible stream of happenings at one box, for running the firmware stub without the simulator.

Where it sits in a message's journey (see ``shared/DESIGN.md``): in place of the simulator, at the
very top. It makes couriers deposit parcels, residents collect them and drop hazardous waste into
the red boxes, and collectors empty full red boxes -- as a Poisson process of ``rate`` happenings
per second -- keeps :class:`~firmware_stub.state.BoxState` consistent with what it emits, and sends
a telemetry reading every ``telemetry_interval`` seconds (the heartbeat the backend watches).

This is a smoke-test generator, not a model: the simulator owns arrival rates, dwell times and
the CO2 accounting. The mix below is only meant to look like a box in use.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time

from contract import CompartmentKind, WasteFraction
from contract.messages import (
    EventPayload,
    ParcelCollected,
    ParcelDeposited,
    WasteCollected,
    WasteDeposited,
)
from firmware_stub.box import BoxFirmware

__all__ = ["CARRIERS", "DemoDriver"]

#: Carriers delivering to Danish parcel lockers (Homerunner is open to all of them; DOMAIN.md).
CARRIERS: tuple[str, ...] = ("gls", "postnord", "dao", "bring", "dhl")
#: The municipal waste company collects the red boxes (Nordværk in Aalborg; DOMAIN.md).
WASTE_COLLECTOR = "nordvaerk"
#: Relative weights of the happenings when all are possible.
_MIX: tuple[tuple[str, float], ...] = (("deposit", 0.45), ("collect", 0.40), ("waste", 0.15))
#: A collector comes for a red box once it is this full (share of its capacity).
_COLLECT_AT = 0.75


class DemoDriver:
    """Drives one started :class:`BoxFirmware` with random but consistent events."""

    def __init__(
        self,
        box: BoxFirmware,
        rng: random.Random,
        *,
        rate: float,
        telemetry_interval: float,
        mean_temperature_c: float = 8.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if rate < 0 or telemetry_interval < 0:
            raise ValueError("rate and telemetry_interval must be >= 0")
        self.box = box
        self.rng = rng
        self.rate = rate
        self.telemetry_interval = telemetry_interval
        self.mean_temperature_c = mean_temperature_c
        self._log = logger if logger is not None else logging.getLogger("firmware_stub.demo")
        self._next_event: float | None = None  # monotonic; None until the first tick
        self._next_telemetry = math.inf

    def step(self) -> EventPayload | None:
        """Make one random happening at the box, emit it and return it (None if nothing could happen)."""
        state = self.box.state
        full = [
            d
            for d in state.snapshot()
            if d.kind is CompartmentKind.RED_BOX and d.weight_kg >= _COLLECT_AT * self._capacity(d.id)
        ]
        if full:
            door = full[0]
            payload: EventPayload = WasteCollected(
                compartment=door.id, carrier=WASTE_COLLECTOR, weight_kg=round(state.empty_red_box(door.id), 3)
            )
            self.box.emit(payload)
            return payload
        choices = [(name, weight) for name, weight in _MIX if self._possible(name)]
        if not choices:
            return None
        name = self.rng.choices([n for n, _ in choices], weights=[w for _, w in choices])[0]
        payload = self._happen(name)
        self.box.emit(payload)
        return payload

    def _capacity(self, compartment_id: int) -> float:
        compartment = self.box.layout.get(compartment_id)
        return compartment.red_box_capacity_kg if compartment is not None else 4.0

    def _possible(self, name: str) -> bool:
        state = self.box.state
        if name == "deposit":
            return bool(state.free_parcel_compartments())
        if name == "collect":
            return bool(state.occupied_parcel_compartments())
        return bool(state.layout.red_boxes)

    def _happen(self, name: str) -> EventPayload:
        state, rng = self.box.state, self.rng
        if name == "deposit":
            cid = rng.choice(state.free_parcel_compartments())
            size = state[cid].size_class
            if size is None:  # only parcel doors are free parcel compartments
                raise RuntimeError(f"compartment {cid} has no size class")
            parcel_id = f"P-{rng.getrandbits(40):010x}"
            state.set_occupied(cid, True, parcel_id)
            return ParcelDeposited(
                compartment=cid,
                size_class=size,
                parcel_id=parcel_id,
                carrier=rng.choice(CARRIERS),
                weight_kg=round(rng.uniform(0.2, 10.0), 2),
            )
        if name == "collect":
            cid = rng.choice(state.occupied_parcel_compartments())
            parcel_id = state[cid].parcel_id or f"P-unknown-{cid}"
            state.set_occupied(cid, False)
            return ParcelCollected(compartment=cid, parcel_id=parcel_id)
        # waste: the emptiest red box; a few hundred grams, as households bring (DOMAIN.md)
        door = min((state[c.id] for c in state.layout.red_boxes), key=lambda d: d.weight_kg)
        weight = round(min(rng.uniform(0.1, 1.0), max(self._capacity(door.id) - door.weight_kg, 0.05)), 3)
        state.add_waste(door.id, weight)
        return WasteDeposited(compartment=door.id, fraction=rng.choice(list(WasteFraction)), weight_kg=weight)

    def temperature(self) -> float:
        """A plausible inside temperature for Aalborg (mean about 8 C, day-to-day spread)."""
        return round(min(max(self.rng.gauss(self.mean_temperature_c, 4.0), -50.0), 90.0), 1)

    def run(self, stop: threading.Event) -> None:
        """Emit happenings and telemetry until ``stop`` is set. Telemetry goes out at once first."""
        while not stop.is_set():
            wait = self.tick(time.monotonic()) - time.monotonic()
            # Sleep until the next happening (stop.wait returns at once on stop): a thousand idle
            # drivers must not wake every second, each waiting for the GIL.
            stop.wait(max(wait, 0.0))

    def tick(self, now: float) -> float:
        """Emit whatever is due at monotonic time ``now``; returns when the next thing is due (a
        fleet calls this for each of its boxes from one thread, see :class:`molo.fleet.Fleet`)."""
        if self._next_event is None:  # the first call: telemetry at once, the first happening later
            self._next_event = now + self.rng.expovariate(self.rate) if self.rate > 0 else math.inf
            self._next_telemetry = now if self.telemetry_interval > 0 else math.inf
        if now >= self._next_telemetry:
            seq = self.box.telemetry(temperature_c=self.temperature())
            self._log.debug("telemetry seq %d", seq)
            self._next_telemetry += self.telemetry_interval
        if now >= self._next_event:
            payload = self.step()
            if payload is not None:
                self._log.info("%s %s", payload.TYPE, payload.model_dump_json())
            self._next_event += self.rng.expovariate(self.rate)
        return min(self._next_event, self._next_telemetry)
