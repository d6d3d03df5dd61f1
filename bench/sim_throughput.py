"""Simulator throughput: simulated events per second, beside a bare SimPy loop of as many events.

Method (printed with the results):
- Model: the default scenario (``simulator.params.resolve()``: Aalborg, seed 1, carriers' van rounds,
  no telemetry) for ``--days`` simulated days, run by ``simulator.run.run_batch`` into a
  ``CountingSink`` (records are counted, nothing is kept or written). 50 boxes = the bundled network;
  any other size = ``simulator.synthetic.synthetic_network(n)`` (jittered copies of the 50 boxes, same
  households and layouts, same depots). An event is one record the model emits (box events, van trips,
  refusals, faults). Time = ``RunResult.wall_seconds`` (``env.run`` to the horizon; building the world
  is not timed). Rate = records / time.
- Bare SimPy baseline, same process, right after each model run: ``--bare-per-box`` x boxes generator
  processes (default 12 per box: the model keeps about 11.6 events pending per box on average, measured
  580 at 50 boxes and 53,000 at 5,000, so SimPy's event heap has the model's size), each looping
  ``yield env.timeout(rng.expovariate(1.0))`` and incrementing a shared counter; the run stops at the
  same number of timeouts as the model emitted records. The model itself takes about one SimPy step per
  record (0.98 at 50 boxes, 1.03 at 5,000). Rate = events / ``env.run`` time. Both loops run with the
  garbage collector set as ``run_batch`` sets it (``simulator.run.fewer_collections``).
- Overhead ratio = model events/s / bare events/s: the share of SimPy's own speed the model keeps.
- Each size runs ``--repeat`` times (model and bare interleaved, ``gc.collect()`` before each timed
  part); medians are reported with min and max. Record counts must be equal in every repeat (the run
  is deterministic).
- ``--days`` is one value for every size or one per ``--boxes`` entry. The default is 365 days for 50
  boxes and 91 for 5,000: a year of 5,000 boxes emits ~36 M records and takes ~20 min per run on the
  reference machine, so the repeats use a quarter. The rate is per event; "wall s / sim year" scales
  the measured time linearly to 365 days and is marked as scaled when it is.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import simpy

from network import Network, load_network
from simulator.params import resolve
from simulator.run import GC_YOUNG_THRESHOLD, fewer_collections, run_batch
from simulator.synthetic import synthetic_network
from simulator.trace import CountingSink

BUNDLED_BOXES = 50


@dataclass
class Run:
    boxes: int
    days: float
    records: int
    model_s: float
    bare_events: int
    bare_s: float

    @property
    def model_rate(self) -> float:
        return self.records / self.model_s

    @property
    def bare_rate(self) -> float:
        return self.bare_events / self.bare_s

    @property
    def ratio(self) -> float:
        return self.model_rate / self.bare_rate


def network_of(boxes: int) -> Network:
    """The bundled network for 50 boxes, a synthetic one of that size otherwise."""
    base = load_network()
    if boxes == len(base.boxes):
        return base
    return synthetic_network(boxes, base)


def run_model(network: Network, days: float) -> tuple[int, float]:
    """Records emitted and wall seconds of ``env.run`` for the default scenario over ``days``."""
    scenario = resolve(overrides=[f"simulation.days={days}"])
    gc.collect()
    result = run_batch(scenario, CountingSink(), network)
    return result.records, result.wall_seconds


def run_bare(processes: int, events: int, seed: int = 0) -> tuple[int, float]:
    """A bare SimPy loop: ``processes`` processes yielding exponential timeouts until ``events`` of them
    have been processed in total. Returns the events counted and the wall seconds of ``env.run``."""
    env = simpy.Environment()
    rng = random.Random(seed)
    done = env.event()
    count = [0]

    def proc() -> Any:
        draw = rng.expovariate
        while True:
            yield env.timeout(draw(1.0))
            count[0] += 1
            if count[0] == events:
                done.succeed()

    for _ in range(processes):
        env.process(proc())
    gc.collect()
    started = time.perf_counter()
    with fewer_collections():  # the collector set as run_batch sets it, so both loops are alike
        env.run(until=done)
    return count[0], time.perf_counter() - started


def _spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}}  (min {min(values):{fmt}}, max {max(values):{fmt}}, n={len(values)})"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", default="50,5000", help="network sizes, comma-separated (default 50,5000)")
    parser.add_argument(
        "--days", default="365,91", help="simulated days: one value, or one per --boxes entry (default 365,91)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bare-per-box", type=int, default=12, help="bare-loop processes per box (default 12)")
    args = parser.parse_args()
    sizes = _ints(args.boxes)
    days_list = _floats(args.days)
    if len(days_list) == 1:
        days_list *= len(sizes)
    if len(days_list) != len(sizes):
        parser.error("--days needs one value or one per --boxes entry")
    plan = list(zip(sizes, days_list, strict=True))

    print(
        f"{datetime.now(UTC):%Y-%m-%d}; machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SimPy {version('simpy')}; repeats: {args.repeat}"
    )
    print(
        "method: model = default scenario (seed 1, van rounds, no telemetry) via run_batch into a CountingSink; "
        "event = one emitted record; time = env.run only.\n"
        f"        bare = {args.bare_per_box} SimPy processes per box, each `yield env.timeout(expovariate(1))` "
        "+ counter, stopped at the model's record count; same process, after each model run;\n"
        "        both with the collector as run_batch sets it (young generation every "
        f"{GC_YOUNG_THRESHOLD:,} allocations).\n"
        "        ratio = model events/s / bare events/s; medians (min, max) over the repeats."
    )
    networks = {n: network_of(n) for n in sizes}
    runs: list[Run] = []
    for i in range(args.repeat):
        for boxes, days in plan:
            records, model_s = run_model(networks[boxes], days)
            bare_events, bare_s = run_bare(args.bare_per_box * boxes, records)
            run = Run(boxes, days, records, model_s, bare_events, bare_s)
            runs.append(run)
            print(
                f"  run {i + 1} {boxes:>6,} boxes x {days:g} d: {records:>11,} events in {model_s:8.2f} s = "
                f"{run.model_rate:>9,.0f} ev/s | bare {bare_events:,} in {bare_s:6.2f} s = "
                f"{run.bare_rate:>9,.0f} ev/s | ratio {run.ratio:.3f}",
                flush=True,
            )
    consistent = True
    for boxes, days in plan:
        mine = [r for r in runs if r.boxes == boxes and r.days == days]
        counts = {r.records for r in mine}
        consistent &= len(counts) == 1
        year = statistics.median([r.model_s for r in mine]) * 365 / days
        print(
            f"{boxes:,} boxes, {days:g} simulated days, {mine[0].records:,} events per run"
            f"{'' if len(counts) == 1 else ' (RECORD COUNTS DIFFER: ' + str(sorted(counts)) + ')'}:"
        )
        print(f"  model (events/s)      : {_spread([r.model_rate for r in mine])}")
        print(f"  bare SimPy (events/s) : {_spread([r.bare_rate for r in mine])}")
        print(f"  overhead ratio        : {_spread([r.ratio for r in mine], '.3f')}   model / bare, per repeat")
        print(
            f"  wall s / sim year     : {year:10,.1f}"
            + ("" if days == 365 else f"   (scaled linearly from {days:g} days)")
        )
    return 0 if consistent else 1


if __name__ == "__main__":
    raise SystemExit(main())
