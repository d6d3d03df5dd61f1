"""Batch runs: build the world, run it in pure simulated time, and summarise.

``run_batch`` is what researchers call (and ``molo simulate``); it returns a :class:`RunResult` whose
``summary`` is deterministic for a given scenario (no wall-clock figures inside), so it can be stored
and compared (golden tests).
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import simpy

from network import Network, load_network
from simulator.model import DAY, Sink, World
from simulator.params import Scenario
from simulator.trace import CountingSink


@dataclass
class RunResult:
    summary: dict[str, Any]
    wall_seconds: float
    records: int


def network_for(scenario: Scenario) -> Network:
    """The scenario's network, cut to its first ``network.boxes`` boxes if set."""
    network = load_network(scenario.network.file)
    if scenario.network.boxes:
        network = network.model_copy(update={"boxes": network.boxes[: scenario.network.boxes]})
    return network


#: Allocations between young-generation collections while a batch run goes (CPython's default is 700).
#: A run allocates parcels, events and records by the hundred thousand and keeps many of them alive
#: for simulated days; collecting every 700 allocations walked that heap again and again (a third of a
#: 5,000-box run's time). The model does not depend on when garbage is collected.
GC_YOUNG_THRESHOLD = 100_000


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect cyclic garbage every ``GC_YOUNG_THRESHOLD`` allocations inside the block (the
    thresholds before are restored after it)."""
    before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


#: Called during a run with (simulated days done, days in all), once per simulated day and at the end.
Progress = Callable[[float, float], None]


def run_batch(
    scenario: Scenario,
    sink: Sink | None = None,
    network: Network | None = None,
    *,
    warmup_days: float = 0.0,
    progress: Progress | None = None,
) -> RunResult:
    """Run ``scenario`` to its horizon in simulated time; records go to ``sink``.

    With ``warmup_days``, the summary counts only what happens after the warm-up: its counters and
    occupancy integrals are reset then (the run itself, and every record the sink gets, is the same).
    With ``progress``, the run stops at every simulated midnight to report; that changes no result
    (SimPy's stop event only comes before the other events of that instant, which then run next).
    """
    env = simpy.Environment()
    world = World(env, scenario, network or network_for(scenario), sink if sink is not None else CountingSink())
    warmup = warmup_days * DAY
    if not 0 <= warmup < world.horizon:
        raise ValueError(f"warm-up of {warmup_days:g} days must be shorter than the run ({world.horizon / DAY:g} days)")
    if warmup > 0:
        env.process(_reset_at(env, world, warmup))
    started = time.perf_counter()
    with fewer_collections():
        if progress is None:
            env.run(until=world.horizon)
        else:
            days = world.horizon / DAY
            for day in range(1, math.ceil(days) + 1):
                env.run(until=min(day * DAY, world.horizon))
                progress(min(float(day), days), days)
    world.finish()
    return RunResult(summarize(world, since=warmup), time.perf_counter() - started, world.records)


def _reset_at(env: simpy.Environment, world: World, t: float) -> Any:
    """At ``t``, start the summary's counts afresh (the end of a warm-up)."""
    yield env.timeout(t)
    for b in world.boxes:
        b.occupied_area = 0.0
        b.last_change = env.now
    world.counters.values.clear()


def _r(x: float) -> float:
    return float(f"{x:.6g}")


#: Every kind the summary's ``events`` table can count (it lists those that happened at least once).
EVENT_KINDS: tuple[str, ...] = (
    "box.offline", "box.online", "compartment.fault", "compartment.restored", "parcel.collected",
    "parcel.deposited", "parcel.dropped_off", "parcel.expired", "parcel.picked_up", "parcel.redirected",
    "parcel.refused", "parcel.returned_to_depot", "van.trip", "waste.collected", "waste.deposited",
    "waste.refused",
)  # fmt: skip


def summarize(world: World, since: float = 0.0) -> dict[str, Any]:
    """KPIs of a finished run (rounded to 6 significant digits, so summaries compare exactly), counted
    from simulated time ``since`` (the end of a warm-up) to the horizon."""
    c = world.counters.values
    measured = world.horizon - since
    days = measured / DAY
    boxes = world.boxes
    doors = sum(len(b.size_of) for b in boxes)
    occupancy = sum(b.occupied_area for b in boxes) / measured if measured else 0.0
    arrived = c.get("parcels_arrived", 0.0)
    collected = c.get("parcel.collected", 0.0)
    carriers = sorted(world.scenario.delivery.carriers)
    return {
        "scenario": world.scenario.name,
        "seed": world.seed,
        "days": _r(days),
        "boxes": len(boxes),
        "parcel_doors": doors,
        "events": {k: int(v) for k, v in sorted(c.items()) if "." in k and ":" not in k},
        "parcels": {
            "arrived": int(arrived),
            "deposited": int(c.get("parcel.deposited", 0)),
            "collected": int(collected),
            # pickup windows that ran out; the parcels go back with the carrier's next van
            "window_ran_out": int(c.get("parcels_expired", 0)),
            "taken_back": int(c.get("parcel.expired", 0)),
            "turned_away": int(c.get("parcels_turned_away", 0)),  # validation mode: a full box refuses
            "redirected": int(c.get("parcel.redirected", 0)),
            "returned_to_depot": int(c.get("parcel.returned_to_depot", 0)),
            "mean_dwell_h": _r(c.get("dwell_h_sum", 0.0) / collected) if collected else None,
        },
        "sends": {
            "dropped_off": int(c.get("parcel.dropped_off", 0)),
            "picked_up": int(c.get("parcel.picked_up", 0)),
        },
        "occupancy": {
            "mean_occupied_doors_per_box": _r(occupancy / len(boxes)) if boxes else 0.0,
            "mean_utilisation": _r(occupancy / doors) if doors else 0.0,
        },
        "waste": {
            "deposits": int(c.get("waste.deposited", 0)),
            "refused": int(c.get("waste.refused", 0)),
            "kg_deposited": _r(c.get("waste_kg_deposited", 0.0)),
            "kg_collected_by_vans": _r(c.get("waste_kg_collected_van", 0.0)),
            "kg_collected_by_dedicated_trips": _r(c.get("waste_kg_collected_dedicated", 0.0)),
            "red_boxes_by_vans": int(c.get("red_boxes_collected_van", 0)),
            "red_boxes_by_dedicated_trips": int(c.get("red_boxes_collected_dedicated", 0)),
        },
        "trips": {
            "van_trips": int(c.get("van.trip", 0)),
            "van_km": {name: _r(c.get(f"van_km:{name}", 0.0)) for name in carriers},
            "dedicated_waste_km": _r(c.get("dedicated_km", 0.0)),
        },
        "faults": {
            "box_offline": int(c.get("box.offline", 0)),
            "door_jams": int(c.get("compartment.fault", 0)),
        },
    }


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True) + "\n"


def _replication(args: tuple[Scenario, int]) -> dict[str, Any]:
    scenario, seed = args
    update = {"simulation": scenario.simulation.model_copy(update={"seed": seed})}
    return run_batch(scenario.model_copy(update=update)).summary


def run_replications(scenario: Scenario, seeds: list[int], executor: Executor | None = None) -> list[dict[str, Any]]:
    """Summaries of ``scenario`` run once per seed, in seed order.

    ``executor`` is any ``concurrent.futures.Executor``: a ``ProcessPoolExecutor`` to use every core, or a
    cluster executor with the same interface (Dask's, Ray's) to fan out wider. Without one, runs in turn.
    """
    jobs = [(scenario, seed) for seed in seeds]
    if executor is None:
        return [_replication(job) for job in jobs]
    return list(executor.map(_replication, jobs))
