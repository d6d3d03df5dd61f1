"""The world model: boxes, residents, carriers' vans and waste collection, in SimPy time.

Where it sits: the first step of a message's journey. The model does no I/O: every happening goes to a
*sink* as a record ``(t, box_id, kind, data)``. ``t`` is simulated seconds since the scenario start;
box events use the contract's event types and payload fields (so live mode hands them to a firmware
stub unchanged); everything else the simulation knows (van trips, refusals, redirects, faults) uses
kinds outside the contract (``van.trip``, ``parcel.redirected``, ...).

Randomness comes from ``random.Random`` streams derived from the seed, one per purpose and box, so a
run is reproducible byte for byte, and two scenarios share their random numbers wherever they share
their structure (common random numbers).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
import statistics
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import simpy
from scipy.special import gammaincinv  # the inverse of the regularised incomplete gamma function

from contract import CompartmentKind, SizeClass
from network import EARTH_RADIUS_KM, Box, Network, Site, haversine_km
from simulator.params import Carrier, Dist, Scenario

HOUR = 3600.0
DAY = 24 * HOUR
YEAR = 365.0 * DAY
SIZES = (SizeClass.A, SizeClass.B, SizeClass.C)
#: The door sizes a parcel of each size fits, smallest first.
FITS = {size: SIZES[i:] for i, size in enumerate(SIZES)}
ProcessGen = Generator[simpy.Event, Any, None]
MAX_DEPOSIT_KG = 10.0  # the contract's limit for one waste deposit
#: Pairs of points whose road km a world remembers (about 100 bytes each) before it starts afresh.
KM_CACHE_MAX = 1_000_000


class Sink(Protocol):
    """Receives every record of a run, in simulated-time order."""

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None: ...


def quantile(dist: Dist) -> Callable[[float], float]:
    """The inverse distribution function of ``dist``: a uniform ``u`` in [0, 1) to a value.

    Every random quantity of the model is drawn by inversion from one uniform, so a quantity always
    takes exactly one number from its stream, whatever its distribution and parameters (rejection
    samplers such as ``random.gammavariate`` take a varying count and put the stream out of step)."""
    mean = dist.mean
    if dist.kind == "exponential":
        return lambda u: -mean * math.log1p(-u)
    if dist.kind == "constant":
        return lambda u: mean
    if dist.kind == "uniform":
        low, span = float(dist.low or 0.0), float(dist.high or 0.0) - float(dist.low or 0.0)
        return lambda u: low + span * u
    sd = float(dist.sd or 0.0)
    if dist.kind == "lognormal":
        sigma2 = math.log(1 + (sd / mean) ** 2)
        mu, sigma = math.log(mean) - sigma2 / 2, math.sqrt(sigma2)
        inv = statistics.NormalDist().inv_cdf
        exp = math.exp
        return lambda u: exp(mu + sigma * inv(u if u > 0.0 else 5e-324))
    shape, scale = (mean / sd) ** 2, sd**2 / mean  # gamma
    return lambda u: float(gammaincinv(shape, u)) * scale


def sampler(dist: Dist, rng: random.Random) -> Callable[[], float]:
    """A function drawing from ``dist`` with ``rng``: one uniform per draw (:func:`quantile`)."""
    q, uniform = quantile(dist), rng.random
    return lambda: q(uniform())


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (inversion for small means, normal approximation above 500)."""
    if lam <= 0:
        return 0
    if lam > 500:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    threshold, k, p = math.exp(-lam), 0, rng.random()
    while p > threshold:
        k += 1
        p *= rng.random()
    return k


def _place_in_load(item: tuple[int, Parcel]) -> int:
    return item[0]


class Weights:
    """A fixed discrete distribution over keys (stable order), its cumulative weights summed once.

    :meth:`draw` is ``rng.choices(keys, weights)[0]`` without the per-call set-up: ``choices`` sums the
    weights with ``itertools.accumulate`` and takes ``keys[bisect(cumulative, random() * total, 0,
    n - 1)]``, and so does this, so it consumes the same random number and returns the same key."""

    __slots__ = ("cumulative", "keys", "last", "total")

    def __init__(self, weights: dict[Any, float]) -> None:
        self.keys = list(weights)
        self.cumulative = list(itertools.accumulate(weights[k] for k in self.keys))
        self.total = self.cumulative[-1] + 0.0
        if not 0.0 < self.total < math.inf:
            raise ValueError(f"weights must have a positive, finite total: {weights}")
        self.last = len(self.keys) - 1

    def draw(self, rng: random.Random) -> Any:
        return self.keys[bisect.bisect(self.cumulative, rng.random() * self.total, 0, self.last)]


def pick(rng: random.Random, weights: dict[Any, float] | Weights) -> Any:
    """A key of ``weights`` drawn with probability proportional to its weight (stable order)."""
    if isinstance(weights, Weights):
        return weights.draw(rng)
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


@dataclass(slots=True)
class Parcel:
    id: str
    size: SizeClass
    carrier: str
    box: int  # index of the box it is on its way to (its home, or another one after a redirect)
    #: The uniforms its resident's dwell and time of day are drawn from (by inversion), fixed when the
    #: parcel is created.
    dwell_u: float = 0.0
    hour_u: float = 0.0
    compartment: int = 0
    deposited_at: float = 0.0
    sending: bool = False
    home: int = -1  # the resident's box; a parcel that goes back to the depot is meant for it again

    def __post_init__(self) -> None:
        if self.home < 0:
            self.home = self.box


@dataclass
class BoxState:
    """What the model knows of one box; ``free`` holds free, in-service parcel doors per size (heaps)."""

    index: int
    box: Box
    free: dict[SizeClass, list[int]] = field(default_factory=dict)
    size_of: dict[int, SizeClass] = field(default_factory=dict)
    occupant: dict[int, Parcel] = field(default_factory=dict)
    jammed: set[int] = field(default_factory=set)
    red: dict[int, float] = field(default_factory=dict)  # red-box door -> kg inside
    red_capacity: dict[int, float] = field(default_factory=dict)
    ready_since: dict[int, float | None] = field(default_factory=dict)
    #: Parcels waiting for a carrier's van: expired deliveries and parcels residents sent.
    waiting: dict[str, list[Parcel]] = field(default_factory=dict)
    offline: bool = False
    sent: int = 0  # parcels its residents sent (numbers the ids)
    occupied_area: float = 0.0  # integral of occupied parcel doors over time
    last_change: float = 0.0

    @property
    def occupied(self) -> int:
        return len(self.occupant)


@dataclass
class Counters:
    """Tallies the summary is built from."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount


class World:
    """The simulated network. Build it, then ``env.run(until=world.horizon)``."""

    def __init__(self, env: simpy.Environment, scenario: Scenario, network: Network, sink: Sink) -> None:
        self.env = env
        self.scenario = scenario
        self.network = network
        self.sink = sink
        self.seed = scenario.simulation.seed
        self.horizon = scenario.simulation.days * DAY
        self.counters = Counters()
        self.records = 0  # records sent to the sink
        self.boxes = [self._box_state(i, box) for i, box in enumerate(network.boxes)]
        self._road_factor = scenario.network.road_factor
        #: Road km between two points, by their coordinates: the same few thousand legs recur all year.
        self._km_cache: dict[tuple[float, float, float, float], float] = {}
        self._box_of = [b.box for b in self.boxes]  # by index
        self._lon_rad = [math.radians(box.lon) for box in self._box_of]
        self._by_lat = sorted((math.radians(box.lat), i) for i, box in enumerate(self._box_of))
        points: list[Box | Site] = [*network.boxes, *network.depots.values()]
        self._cos_max_lat = math.cos(math.radians(max(abs(point.lat) for point in points)))
        self._sizes = Weights({k: v for k, v in scenario.demand.size_mix.items() if v > 0})
        self._carrier_shares = Weights({n: c.share for n, c in scenario.delivery.carriers.items()} or {"direct": 1.0})
        self._fraction_shares = Weights({k: v.share for k, v in scenario.waste.fractions.items()})
        p = scenario
        start = p.simulation.start
        self._start_weekday = start.weekday()
        self._start_hour = start.hour + start.minute / 60 + start.second / 3600
        week = p.demand.weekday_profile
        self._weekday = [w / (sum(week) / 7) if sum(week) else 0.0 for w in week]
        hours = p.demand.hour_profile
        peak = max(hours) or 1.0
        self._hour_accept = [h / peak for h in hours]
        self._hour_mean = sum(hours) / 24 / peak  # mean acceptance of the thinning
        self._dwell = quantile(p.pickup.dwell_h)
        #: Residents' hour profile as a distribution over the day (pickups follow it): per hour its
        #: density relative to a flat day (mean 1), and the cumulative from midnight, in seconds.
        mean_hour = sum(hours) / 24
        self._activity = [h / mean_hour for h in hours] if mean_hour > 0 else [1.0] * 24
        self._activity_flat = len(set(self._activity)) == 1
        self._activity_at = [0.0, *itertools.accumulate(a * HOUR for a in self._activity)]
        self._window = p.pickup.window_h * HOUR
        self._vans = p.delivery.mode == "rounds"
        self._backlog: dict[str, list[Parcel]] = {name: [] for name in p.delivery.carriers}
        self._claimed: set[tuple[int, int]] = set()  # red boxes a dedicated trip is on its way to
        self._start_processes()

    # ------------------------------------------------------------------ set-up

    def _box_state(self, index: int, box: Box) -> BoxState:
        state = BoxState(index=index, box=box)
        for size in SIZES:
            state.free[size] = []
        for door in box.layout.compartments:
            if door.kind is CompartmentKind.RED_BOX:
                state.red[door.id] = 0.0
                state.red_capacity[door.id] = door.red_box_capacity_kg
                state.ready_since[door.id] = None
            elif door.size_class is not None:
                state.size_of[door.id] = door.size_class
                heapq.heappush(state.free[door.size_class], door.id)
        return state

    def rng(self, stream: str, box: int | None = None) -> random.Random:
        """The random stream for ``stream`` (and box): the same in every scenario with this seed."""
        return random.Random(f"{self.seed}:{stream}:{'' if box is None else self.network.boxes[box].id}")

    def _start_processes(self) -> None:
        s = self.scenario
        for b in self.boxes:
            hh = b.box.households
            if s.delivery.mode == "poisson":
                rate = hh * s.demand.parcels_per_household_year * s.demand.locker_share / YEAR
                self.env.process(self._poisson_deliveries(b, rate))
            self.env.process(
                self._resident_activity(b, hh * s.demand.sends_per_household_year / YEAR, "send", self._send)
            )
            self.env.process(
                self._resident_activity(
                    b, hh * s.waste.adoption * s.waste.deposits_per_user_year / YEAR, "waste", self._deposit_waste
                )
            )
            self.env.process(self._offline_faults(b))
            self.env.process(self._door_jams(b))
            if s.simulation.telemetry_interval_min > 0:
                self.env.process(self._telemetry(b, s.simulation.telemetry_interval_min * 60))
        if s.delivery.mode == "rounds":
            for name, carrier in s.delivery.carriers.items():
                self.env.process(self._carrier_rounds(name, carrier))

    # ------------------------------------------------------------------ records

    def _event(self, b: BoxState, kind: str, **data: Any) -> None:
        """A box event (the contract's kinds) of box ``b``, now."""
        self._record(b.box.id, kind, data)

    def _note(self, kind: str, box_id: str | None = None, **data: Any) -> None:
        """A happening outside the contract (van trips, refusals, redirects), now."""
        self._record(box_id, kind, data)

    def _record(self, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self.sink.record(self.env.now, box_id, kind, data)
        self.records += 1
        counts = self.counters.values
        counts[kind] = counts.get(kind, 0.0) + 1.0

    def _occupancy_changed(self, b: BoxState) -> None:
        """Integrate occupancy up to now (call before every change)."""
        now = self.env.now
        b.occupied_area += len(b.occupant) * (now - b.last_change)
        b.last_change = now

    @staticmethod
    def _id_prefix(*parts: str) -> str:
        """``parts`` joined as a parcel id's stem, hashed where the id would pass the contract's 64
        characters (box and carrier ids of up to 32 each)."""
        stem = "-".join(parts)
        return stem if len(stem) <= 48 else hashlib.blake2b(stem.encode(), digest_size=8).hexdigest()

    # ------------------------------------------------------------------ compartments

    def _release_door(self, b: BoxState, door: int) -> None:
        if door not in b.jammed:
            heapq.heappush(b.free[b.size_of[door]], door)

    def _place(self, b: BoxState, parcel: Parcel) -> bool:
        """Put ``parcel`` behind the lowest free in-service door of the smallest size that fits it;
        False if there is none."""
        free = b.free
        for size in FITS[parcel.size]:
            heap = free[size]
            if heap:
                door = heapq.heappop(heap)
                break
        else:
            return False
        self._occupancy_changed(b)
        parcel.box, parcel.compartment, parcel.deposited_at = b.index, door, self.env.now
        b.occupant[door] = parcel
        return True

    def _vacate(self, b: BoxState, parcel: Parcel) -> None:
        self._occupancy_changed(b)
        del b.occupant[parcel.compartment]
        self._release_door(b, parcel.compartment)

    # ------------------------------------------------------------------ parcels to residents

    def _deposit(self, b: BoxState, parcel: Parcel) -> bool:
        if not self._place(b, parcel):
            return False
        self._event(
            b,
            "parcel.deposited",
            compartment=parcel.compartment,
            size_class=parcel.size.value,
            parcel_id=parcel.id,
            carrier=parcel.carrier,
        )
        dwell = self._pickup_delay(self.env.now, parcel)
        if dwell < self._window:
            self.env.timeout(dwell, parcel).callbacks.append(self._collected)
        else:
            self.env.timeout(self._window, parcel).callbacks.append(self._expired)
        return True

    def _pickup_delay(self, t0: float, parcel: Parcel) -> float:
        """Clock seconds from the deposit at ``t0`` until the resident collects ``parcel``: on the day
        its dwell runs out, at the time of day its second number picks by the residents' hour profile
        (the next day if that time has passed). So pickups follow the profile, and a dwell keeps its
        day. With a flat profile, the dwell itself (validation mode)."""
        dwell = self._dwell(parcel.dwell_u) * HOUR
        if self._activity_flat:
            return dwell
        offset = self._start_hour * HOUR
        day = ((t0 + dwell + offset) // DAY) * DAY - offset  # the start of the day the dwell ends in
        at, u = self._activity_at, parcel.hour_u * DAY  # the profile's cumulative share of the day, scaled
        h = min(23, bisect.bisect_right(at, u) - 1)
        pickup = day + h * HOUR + (u - at[h]) / self._activity[h]
        return pickup - t0 if pickup >= t0 else pickup + DAY - t0

    def _collected(self, event: simpy.Event) -> None:
        """The resident came for the parcel (the event's value) before its window ran out."""
        parcel = cast(Parcel, event.value)
        b = self.boxes[parcel.box]
        self._vacate(b, parcel)
        self._event(b, "parcel.collected", compartment=parcel.compartment, parcel_id=parcel.id)
        self.counters.add("dwell_h_sum", (self.env.now - parcel.deposited_at) / HOUR)

    def _expired(self, event: simpy.Event) -> None:
        """The pickup window of the parcel (the event's value) ran out: it waits for its carrier's next
        van (or, without vans, goes back at once)."""
        parcel = cast(Parcel, event.value)
        b = self.boxes[parcel.box]
        self.counters.add("parcels_expired")
        if not self._vans:
            self._vacate(b, parcel)
            self._event(
                b, "parcel.expired", compartment=parcel.compartment, parcel_id=parcel.id, carrier=parcel.carrier
            )
            return
        b.waiting.setdefault(parcel.carrier, []).append(parcel)

    def _poisson_deliveries(self, b: BoxState, rate: float) -> ProcessGen:
        """Validation mode: parcels arrive one by one (Poisson); a full box turns them away."""
        rng = self.rng("poisson", b.index)
        carriers, sizes = self._carrier_shares, self._sizes
        if rate <= 0:
            return
        stem = self._id_prefix("P", b.box.id)
        for n in itertools.count(1):
            yield self.env.timeout(rng.expovariate(rate))
            size, carrier, u = pick(rng, sizes), pick(rng, carriers), rng.random()
            parcel = Parcel(f"{stem}-{n}", size, carrier, b.index, u, rng.random())
            self.counters.add("parcels_arrived")
            if not self._deposit(b, parcel):
                self.counters.add("parcels_turned_away")
                self._note(
                    "parcel.refused", b.box.id, parcel_id=parcel.id, size_class=parcel.size.value, reason="box_full"
                )

    # ------------------------------------------------------------------ residents: sends and waste

    def _resident_activity(
        self, b: BoxState, rate: float, stream: str, act: Callable[[BoxState, random.Random], None]
    ) -> ProcessGen:
        """Arrivals with the hour-of-day profile (thinning of a Poisson process at the peak rate)."""
        if rate <= 0 or self._hour_mean <= 0:
            return
        rng = self.rng(stream, b.index)
        peak = rate / self._hour_mean
        env, draw, uniform = self.env, rng.expovariate, rng.random
        accept, start_hour = self._hour_accept, self._start_hour
        while True:
            yield env.timeout(draw(peak))
            if uniform() < accept[int((start_hour + env.now / HOUR) % 24)]:  # by the hour of day
                act(b, rng)

    def _since_monday(self, t: float) -> float:
        """Seconds from the Monday 00:00 before the scenario start to simulated time ``t``."""
        return self._start_weekday * DAY + self._start_hour * HOUR + t

    def _weekday_now(self, t: float | None = None) -> int:
        return int(self._since_monday(self.env.now if t is None else t) // DAY) % 7

    def _send(self, b: BoxState, rng: random.Random) -> None:
        sizes, carriers = self._sizes, self._carrier_shares
        b.sent += 1
        parcel = Parcel(
            f"{self._id_prefix('S', b.box.id)}-{b.sent}", pick(rng, sizes), pick(rng, carriers), b.index, sending=True
        )
        if not self._place(b, parcel):
            self._note(
                "parcel.refused", b.box.id, parcel_id=parcel.id, size_class=parcel.size.value, reason="no_room_to_send"
            )
            return
        self._event(
            b,
            "parcel.dropped_off",
            compartment=parcel.compartment,
            size_class=parcel.size.value,
            parcel_id=parcel.id,
            carrier=parcel.carrier,
        )
        if self.scenario.delivery.mode == "poisson":  # no vans: the carrier fetches it after a day
            self.env.timeout(DAY).callbacks.append(lambda _e: self._picked_up(b, parcel))
        else:
            b.waiting.setdefault(parcel.carrier, []).append(parcel)

    def _picked_up(self, b: BoxState, parcel: Parcel) -> None:
        self._vacate(b, parcel)
        self._event(b, "parcel.picked_up", compartment=parcel.compartment, parcel_id=parcel.id, carrier=parcel.carrier)

    def _deposit_waste(self, b: BoxState, rng: random.Random) -> None:
        fractions = self.scenario.waste.fractions
        fraction = pick(rng, self._fraction_shares)
        weight = round(min(MAX_DEPOSIT_KG, max(0.01, sampler(fractions[fraction].weight_kg, rng)())), 3)
        doors = sorted(b.red, key=lambda d: (b.red[d], d))  # emptiest first
        door = next((d for d in doors if b.red[d] + weight <= b.red_capacity[d]), None)
        if door is None:
            self._note("waste.refused", b.box.id, fraction=fraction.value, weight_kg=weight, reason="red_box_full")
            return
        b.red[door] = round(b.red[door] + weight, 3)
        self._event(b, "waste.deposited", compartment=door, fraction=fraction.value, weight_kg=weight)
        self.counters.add("waste_kg_deposited", weight)
        if b.ready_since[door] is None and b.red[door] >= self.scenario.waste.ready_share * b.red_capacity[door]:
            since = self.env.now
            b.ready_since[door] = since
            self.env.timeout(self.scenario.waste.max_wait_h * HOUR).callbacks.append(
                lambda _e: self._waste_overdue(b, door, since)
            )

    # ------------------------------------------------------------------ faults and telemetry

    def _offline_faults(self, b: BoxState) -> ProcessGen:
        f = self.scenario.faults
        rng = self.rng("offline", b.index)
        duration = sampler(f.box_offline_h, rng)
        while True:
            yield self.env.timeout(rng.expovariate(1 / (f.box_offline_mtbf_days * DAY)))
            b.offline = True
            self._note("box.offline", b.box.id)
            yield self.env.timeout(duration() * HOUR)
            b.offline = False
            self._note("box.online", b.box.id)

    def _door_jams(self, b: BoxState) -> ProcessGen:
        f = self.scenario.faults
        rng = self.rng("jam", b.index)
        repair = sampler(f.repair_h, rng)
        while True:
            yield self.env.timeout(rng.expovariate(1 / (f.door_jam_mtbf_days * DAY)))
            # Two numbers per jam, whatever the occupancy: which free door (by position), how long.
            u, hours = rng.random(), repair()
            free = sorted(d for heap in b.free.values() for d in heap)
            if not free:
                continue
            door = free[int(u * len(free))]
            b.free[b.size_of[door]].remove(door)
            heapq.heapify(b.free[b.size_of[door]])
            b.jammed.add(door)
            self._event(b, "compartment.fault", compartment=door, fault="jammed_door")
            yield self.env.timeout(hours * HOUR)
            b.jammed.discard(door)
            heapq.heappush(b.free[b.size_of[door]], door)
            self._event(b, "compartment.restored", compartment=door)

    def _telemetry(self, b: BoxState, interval_s: float) -> ProcessGen:
        while True:
            self._event(
                b,
                "telemetry",
                power="mains",
                temperature_c=8.0,
                compartments=[
                    {"id": d, "occupied": d in b.occupant, "door_open": False, "in_service": d not in b.jammed}
                    for d in sorted(b.size_of)
                ],
                red_boxes=[{"compartment": d, "weight_kg": b.red[d]} for d in sorted(b.red)],
            )
            yield self.env.timeout(interval_s)

    # ------------------------------------------------------------------ carriers' van rounds

    def _carrier_rounds(self, name: str, carrier: Carrier) -> ProcessGen:
        depot = self.network.depots[carrier.depot]
        # Per box: one stream for how many parcels a round brings, one for what each parcel is
        # (size, its resident's dwell), so the n-th parcel of this carrier to a box is the same parcel
        # in every scenario that has it, however many other boxes, carriers or parcels there are.
        counts = [self.rng(f"demand:{name}", b.index) for b in self.boxes]
        kinds = [self.rng(f"parcel:{name}", b.index) for b in self.boxes]
        stems = [self._id_prefix("P", b.box.id, name) for b in self.boxes]
        numbers = [0] * len(self.boxes)
        sizes = self._sizes
        d = self.scenario.demand
        rates = [
            b.box.households * d.parcels_per_household_year * d.locker_share * carrier.share / YEAR for b in self.boxes
        ]
        last = 0.0
        for departure in self._round_times(carrier):
            if departure >= self.horizon:
                return
            yield self.env.timeout(max(0.0, departure - self.env.now))
            weight = self._weekday_integral(last, departure)
            last = departure
            # Parcels back at the depot (no room anywhere, or over capacity) go out first.
            load, self._backlog[name] = self._backlog[name], []
            arrived = 0
            for i, rate in enumerate(rates):
                n = poisson(counts[i], rate * weight)
                if not n:
                    continue
                kind = kinds[i]
                for k in range(numbers[i] + 1, numbers[i] + n + 1):
                    load.append(Parcel(f"{stems[i]}-{k}", pick(kind, sizes), name, i, kind.random(), kind.random()))
                numbers[i] += n
                arrived += n
            self.counters.add("parcels_arrived", arrived)
            for van_no, (stops, parcels) in enumerate(self._plan_vans(depot, carrier, name, load)):
                self.env.process(self._van_trip(name, carrier, van_no, depot, stops, parcels))

    def _round_times(self, carrier: Carrier) -> Iterator[float]:
        day = 0
        while True:
            weekday = (self._start_weekday + day) % 7
            if weekday in carrier.round_days:
                for hour in sorted(carrier.round_hours):
                    t = day * DAY + (hour - self._start_hour) * HOUR
                    if t >= self.env.now:
                        yield t
            day += 1

    def _weekday_integral(self, t0: float, t1: float) -> float:
        """Delivery volume between t0 and t1 in units of average-day-seconds (weekday-weighted)."""
        total, t = 0.0, t0
        offset = self._since_monday(0.0)
        while t < t1:
            day_end = (math.floor((t + offset) / DAY) + 1) * DAY - offset  # the next midnight
            step = min(t1, day_end) - t
            total += step * self._weekday[self._weekday_now(t)]
            t += step
        return total

    def _plan_vans(
        self, depot: Site, carrier: Carrier, name: str, load: list[Parcel]
    ) -> list[tuple[list[int], list[Parcel]]]:
        """Split the round into van trips: stops in nearest-neighbour order, cut where a van is full."""
        by_box: dict[int, list[Parcel]] = {}
        for parcel in load:
            by_box.setdefault(parcel.box, []).append(parcel)
        stops = set(by_box) | {b.index for b in self.boxes if b.waiting.get(name)}
        order = self._nearest_neighbour(depot.lat, depot.lon, stops)
        vans: list[tuple[list[int], list[Parcel]]] = []
        current: list[int] = []
        parcels: list[Parcel] = []
        cap = carrier.van_capacity
        for stop in order:
            mine = by_box.get(stop, [])
            # A stop with more parcels than a van holds is served by several vans.
            for chunk in [mine[i : i + cap] for i in range(0, len(mine), cap)] or [[]]:
                if current and len(parcels) + len(chunk) > cap:
                    vans.append((current, parcels))
                    current, parcels = [], []
                current.append(stop)
                parcels += chunk
        if current:
            vans.append((current, parcels))
        return vans

    def _nearest_neighbour(self, lat: float, lon: float, stops: set[int]) -> list[int]:
        """Stops in nearest-neighbour order from (lat, lon): each next stop is the one with the least
        ``_km`` from here, ties to the lower index.

        Exact, but without trying every stop at every step. Two lower bounds of a great-circle distance
        between points at most ``_max_lat`` from the equator, each taken a hair low (1e-9) so rounding
        can never hide an equal or nearer stop: the Earth's radius times the latitude difference
        (radians), and R * cos(max lat) * dl * (1 - dl^2 / 24) for a longitude difference ``dl``
        (radians), since h >= cos(lat1) cos(lat2) sin^2(dl / 2) in the haversine formula, asin(x) >= x
        and sin(x) >= x - x^3 / 6. With the stops sorted by latitude the search walks outward from
        here's latitude and stops once the first bound exceeds the best ``_km`` found; a stop whose
        second bound exceeds it (less 1e-9 km for rounding near zero) is passed over without computing
        its distance.
        """
        boxes, lon_rad = self._box_of, self._lon_rad
        chosen = [key for key in self._by_lat if key[1] in stops]
        lats, index = [lat for lat, _ in chosen], [i for _, i in chosen]  # by latitude (radians)
        inf, scale = math.inf, EARTH_RADIUS_KM * self._road_factor * (1 - 1e-9)
        lon_scale = scale * self._cos_max_lat
        order: list[int] = []
        here = (lat, lon)
        while index:
            lat_here, lon_here = math.radians(here[0]), math.radians(here[1])
            hi = bisect.bisect_left(lats, lat_here)
            lo, n = hi - 1, len(index)
            bound_hi = (lats[hi] - lat_here) * scale if hi < n else inf
            bound_lo = (lat_here - lats[lo]) * scale if lo >= 0 else inf
            best, best_i, best_pos = inf, -1, -1
            while True:
                if bound_hi <= bound_lo:
                    if bound_hi > best:
                        break
                    pos, hi = hi, hi + 1
                    bound_hi = (lats[hi] - lat_here) * scale if hi < n else inf
                else:
                    if bound_lo > best:
                        break
                    pos, lo = lo, lo - 1
                    bound_lo = (lat_here - lats[lo]) * scale if lo >= 0 else inf
                i = index[pos]
                dl = abs(lon_rad[i] - lon_here)
                if dl * (1 - dl * dl / 24) * lon_scale - 1e-9 > best:
                    continue
                d = self._km(here, boxes[i])
                if d < best or (d == best and i < best_i):
                    best, best_i, best_pos = d, i, pos
            order.append(best_i)
            del lats[best_pos], index[best_pos]
            here = (boxes[best_i].lat, boxes[best_i].lon)
        return order

    def _km(self, here: tuple[float, float], box: Box | Site) -> float:
        """Road km: straight line times the road factor (scenario.network.road_factor); remembered
        per pair of points (up to a bound, then forgotten and remembered anew)."""
        key = (here[0], here[1], box.lat, box.lon)
        km = self._km_cache.get(key)
        if km is None:
            if len(self._km_cache) >= KM_CACHE_MAX:
                self._km_cache.clear()
            km = self._km_cache[key] = haversine_km(here[0], here[1], box.lat, box.lon) * self._road_factor
        return km

    def _van_trip(
        self, name: str, carrier: Carrier, van_no: int, depot: Site, stops: list[int], parcels: list[Parcel]
    ) -> ProcessGen:
        """Drive one van: deliver, take back expired and sent parcels, take red boxes if there is room."""
        started = self.env.now
        here = (depot.lat, depot.lon)
        km = 0.0
        # The parcels for delivery, by the stop each is headed for, with their place in the load (the
        # order they are tried in, and go back to the depot in); a redirect moves one to a later stop.
        heading: dict[int, list[tuple[int, Parcel]]] = {}
        for place, parcel in enumerate(parcels):
            heading.setdefault(parcel.box, []).append((place, parcel))
        unloaded: set[int] = set()  # places of the parcels delivered
        carried = len(parcels)  # everything occupying van space
        waste_kg, waste_boxes, delivered, picked = 0.0, 0, 0, 0
        radius = self.scenario.delivery.redirect_radius_km
        for position, stop in enumerate(stops):
            b = self.boxes[stop]
            leg = self._km(here, b.box)
            km += leg
            yield self.env.timeout(leg / carrier.speed_kmh * HOUR)
            here = (b.box.lat, b.box.lon)
            # 1. unload: this box's own parcels first, then ones redirected here, into free doors
            here_now = sorted(heading.pop(stop, ()), key=_place_in_load)
            own = [item for item in here_now if item[1].home == stop]
            redirected = [item for item in here_now if item[1].home != stop]
            failed: list[tuple[int, Parcel]] = []
            for place, parcel in own + redirected:
                if self._deposit(b, parcel):
                    unloaded.add(place)
                    carried -= 1
                    delivered += 1
                elif parcel.home == stop:
                    failed.append((place, parcel))
            # 2. load what waits for this carrier (expired deliveries, residents' sends), as far as the
            #    van has room; that frees doors
            waiting = b.waiting.pop(name, [])
            room = max(0, carrier.van_capacity - carried)
            for parcel in waiting[:room]:
                self._vacate(b, parcel)
                kind = "parcel.picked_up" if parcel.sending else "parcel.expired"
                self._event(b, kind, compartment=parcel.compartment, parcel_id=parcel.id, carrier=name)
                carried += 1
                picked += 1
            if waiting[room:]:
                b.waiting[name] = waiting[room:]
            # 3. own parcels that did not fit: into the doors just freed, else to the next box of the
            #    round within the redirect radius, else they stay on board (back to the depot)
            for place, parcel in failed:
                if self._deposit(b, parcel):
                    unloaded.add(place)
                    carried -= 1
                    delivered += 1
                    continue
                nxt = next((s for s in stops[position + 1 :] if self._km(here, self.boxes[s].box) <= radius), None)
                if nxt is not None:
                    self._note("parcel.redirected", b.box.id, parcel_id=parcel.id, carrier=name)
                    parcel.box = nxt
                    heading.setdefault(nxt, []).append((place, parcel))
            # 3. red boxes ready for collection, if the van has room and dangerous-goods allowance
            for door in sorted(b.red):
                ready = b.ready_since[door] is not None
                weight = b.red[door]
                if ready and carried < carrier.van_capacity and waste_kg + weight <= carrier.hazardous_limit_kg:
                    self._collect_red_box(b, door, name, "van")
                    waste_kg += weight
                    waste_boxes += 1
                    carried += 1
            yield self.env.timeout(carrier.stop_min * 60)
        back = self._km(here, depot)
        km += back
        yield self.env.timeout(back / carrier.speed_kmh * HOUR)
        for parcel in (p for place, p in enumerate(parcels) if place not in unloaded):
            parcel.box = parcel.home  # the next round tries the resident's own box again
            self._note("parcel.returned_to_depot", self.boxes[parcel.home].box.id, parcel_id=parcel.id, carrier=name)
            self._backlog[name].append(parcel)
        self._note(
            "van.trip",
            None,
            carrier=name,
            van=van_no,
            vehicle=carrier.vehicle,
            trip="round",
            depart_s=round(started, 3),
            km=round(km, 3),
            stops=len(stops),
            delivered=delivered,
            picked_up=picked,
            waste_kg=round(waste_kg, 3),
            red_boxes=waste_boxes,
            boxes=[self.boxes[s].box.id for s in stops],
        )
        self.counters.add(f"van_km:{name}", km)

    # ------------------------------------------------------------------ waste collection

    def _collect_red_box(self, b: BoxState, door: int, carrier: str, how: str) -> None:
        weight = b.red[door]
        self._event(b, "waste.collected", compartment=door, carrier=carrier, weight_kg=round(weight, 3))
        self.counters.add(f"waste_kg_collected_{how}", weight)
        self.counters.add(f"red_boxes_collected_{how}")
        b.red[door] = 0.0
        b.ready_since[door] = None

    def _waste_overdue(self, b: BoxState, door: int, since: float) -> None:
        if b.ready_since[door] != since:
            return  # a van took it in time
        self.env.process(self._dedicated_trip())

    def _dedicated_trip(self) -> ProcessGen:
        """The waste operator fetches every overdue red box in one trip from its site."""
        w = self.scenario.waste
        site = self.network.depots[w.dedicated_operator]
        due = [
            (b.index, d)
            for b in self.boxes
            for d, since in sorted(b.ready_since.items())
            if since is not None
            and self.env.now - since >= w.max_wait_h * HOUR - 1e-6
            and (b.index, d) not in self._claimed
        ]
        if not due:
            return
        self._claimed.update(due)
        overdue = {i for i, _ in due}
        started, here, km = self.env.now, (site.lat, site.lon), 0.0
        collected, kg = 0, 0.0
        order = self._nearest_neighbour(site.lat, site.lon, overdue)
        for stop in order:
            b = self.boxes[stop]
            leg = self._km(here, b.box)
            km += leg
            yield self.env.timeout(leg / w.dedicated_speed_kmh * HOUR)
            here = (b.box.lat, b.box.lon)
            for door in sorted(b.red):
                if (stop, door) in self._claimed:
                    self._claimed.discard((stop, door))
                    if b.ready_since[door] is None:
                        continue  # a van took it while the truck was on its way
                    kg += b.red[door]
                    collected += 1
                    self._collect_red_box(b, door, w.dedicated_operator, "dedicated")
        back = self._km(here, site)
        km += back
        yield self.env.timeout(back / w.dedicated_speed_kmh * HOUR)
        self._note(
            "van.trip",
            None,
            carrier=w.dedicated_operator,
            van=0,
            vehicle=w.dedicated_vehicle,
            trip="dedicated_waste",
            depart_s=round(started, 3),
            km=round(km, 3),
            stops=len(order),
            delivered=0,
            picked_up=0,
            waste_kg=round(kg, 3),
            red_boxes=collected,
            boxes=[self.boxes[s].box.id for s in order],
        )
        self.counters.add("dedicated_km", km)

    # ------------------------------------------------------------------ end of run

    def finish(self) -> None:
        """Close the time integrals at the horizon."""
        for b in self.boxes:
            b.occupied_area += b.occupied * (self.env.now - b.last_change)
            b.last_change = self.env.now
