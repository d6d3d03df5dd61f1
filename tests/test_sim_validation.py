"""Statistical validation of the world model against queueing theory, with tolerances from the theory.

Where it sits: tests of ``simulator.model`` on long runs of its validation mode. With
``delivery.mode = "poisson"`` parcels arrive at a box one by one as a Poisson process of rate lambda and
are turned away when no door fits; with one size class (``build_layout(c, 0, 0)``, ``size_mix = {A: 1}``),
a pickup window far longer than any dwell (no expiry), and sends, waste and faults off, each box is an
M/G/c/c loss system: c servers (doors), no queue, holding time = the dwell, with mean 1/mu.

Theory (Erlang's loss formula; e.g. Kleinrock, *Queueing Systems* I, section 3.6). With offered load
a = lambda / mu:

- Blocking. The stationary probability that all c doors are busy is Erlang B,
  B(c, a) = (a^c / c!) / sum_{k=0..c} a^k / k!, computed by the stable recursion
  B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)). Poisson arrivals see time averages (PASTA), so B is
  also the share of parcels turned away. B is insensitive to the dwell distribution beyond its mean
  (checked here with an exponential and a lognormal dwell).
- Occupancy. Little's law, L = lambda_eff W, with lambda_eff = lambda (1 - B) accepted parcels per
  hour and W = 1/mu gives the mean number of occupied doors L = a (1 - B) (the run's summary
  ``occupancy.mean_occupied_doors_per_box``).
- Dwell. A parcel's acceptance does not depend on its own dwell, so collected parcels' mean dwell is
  1/mu (summary ``parcels.mean_dwell_h``).

Tolerances. Each run has 20 boxes; the model draws every box's randomness from its own stream (named
by seed and box id) and in this mode boxes do not interact, so the 20 boxes are 20 independent
replications. The standard error (SE) of each estimate is the standard deviation of the 20 per-box
estimates / sqrt(20) (batch means with independent batches). A check passes if
|estimate - theory| < 4 SE and the estimate is within a relative sanity bound. For a correct model a
4 SE miss has probability about 1 in 16,000 for a normal estimate, or about 1 in 1,300 allowing for
the SE itself being estimated from 20 values (Student-t, 19 degrees of freedom); the seed is fixed,
so the outcome is reproducible. A further assertion that each SE is small (a few per cent of the
theoretical value at most) keeps the test able to fail. Biases the theory ignores are well under one
SE here: the boxes start empty (relative bias about W / horizon = 0.1% for the occupancy) and parcels
still in a box at the horizon are missing from the dwell mean (about L of several thousand per box).

The configuration is the shipped scenario ``simulator/scenarios/validation.toml`` (each box here
gets ``lambda`` and the dwell on top of it).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import simpy

from network import Box, FjordSide, Network, build_layout
from simulator.model import World
from simulator.params import resolve
from simulator.run import summarize

VALIDATION = Path(__file__).resolve().parent.parent / "simulator" / "scenarios" / "validation.toml"

HOUR = 3600.0
BOXES = 20
DAYS = 365.0


def erlang_b(c: int, a: float) -> float:
    """Erlang B by the recursion B(k) = a B(k-1) / (k + a B(k-1)), B(0) = 1."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


@dataclass
class BoxTally:
    arrived: int = 0
    refused: int = 0
    dwell_h_sum: float = 0.0
    collected: int = 0
    since: dict[str, float] = field(default_factory=dict)


class TallySink:
    """Per-box tallies of arrivals, refusals and collected parcels' dwell (keeps no records)."""

    def __init__(self) -> None:
        self.boxes: dict[str, BoxTally] = {}
        self.kinds: set[str] = set()
        self.sizes: set[str] = set()

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self.kinds.add(kind)
        assert box_id is not None
        tally = self.boxes.setdefault(box_id, BoxTally())
        if kind in ("parcel.deposited", "parcel.refused"):
            self.sizes.add(data["size_class"])
        if kind == "parcel.deposited":
            tally.arrived += 1
            tally.since[data["parcel_id"]] = t
        elif kind == "parcel.refused":
            tally.arrived += 1
            tally.refused += 1
        elif kind == "parcel.collected":
            tally.collected += 1
            tally.dwell_h_sum += (t - tally.since.pop(data["parcel_id"])) / HOUR


@dataclass
class Estimate:
    """A pooled estimate and its standard error from independent per-box replications."""

    value: float
    se: float

    def check(self, theory: float, rel: float) -> None:
        assert abs(self.value - theory) < 4 * self.se, (self.value, theory, self.se)
        assert abs(self.value - theory) < rel * theory, (self.value, theory)


def estimate(value: float, per_box: list[float]) -> Estimate:
    return Estimate(value, statistics.stdev(per_box) / math.sqrt(len(per_box)))


def loss_system(c: int, lam_per_h: float, dwell_h: dict[str, Any]) -> tuple[dict[str, Any], TallySink, World]:
    """Run BOXES independent c-door boxes for DAYS in validation mode; the summary, tallies and world."""
    boxes = [
        Box(
            id=f"val-{i:03d}",
            name=f"Validation {i}",
            area="Test",
            side=FjordSide.SOUTH,
            lat=57.04 + 0.001 * i,
            lon=9.95,
            households=1,
            layout=build_layout(c, 0, 0),
        )
        for i in range(BOXES)
    ]
    scenario = resolve(
        VALIDATION,
        [
            f"demand.parcels_per_household_year={lam_per_h * 24 * 365!r}",
            *(f"pickup.dwell_h.{k}={json.dumps(v)}" for k, v in dwell_h.items()),
            f"simulation.days={DAYS}",
        ],
    )
    env = simpy.Environment()
    sink = TallySink()
    world = World(env, scenario, Network(boxes=boxes, depots={}, recycling_stations=[]), sink)
    env.run(until=world.horizon)
    world.finish()
    return summarize(world), sink, world


CASES = [
    pytest.param(8, 0.6, {"kind": "exponential", "mean": 10.0}, id="c8-a6-exponential"),
    pytest.param(3, 0.5, {"kind": "exponential", "mean": 4.0}, id="c3-a2-exponential"),
    pytest.param(8, 0.6, {"kind": "lognormal", "mean": 10.0, "sd": 15.0}, id="c8-a6-lognormal"),
]


def test_erlang_b_recursion_matches_the_closed_form() -> None:
    """The test's Erlang B recursion equals (a^c/c!) / sum a^k/k! (and B(8, 6) is about 0.122)."""
    for c, a in ((1, 0.5), (3, 2.0), (8, 6.0), (20, 15.0)):
        closed = (a**c / math.factorial(c)) / sum(a**k / math.factorial(k) for k in range(c + 1))
        assert erlang_b(c, a) == pytest.approx(closed, rel=1e-12)
    assert erlang_b(8, 6.0) == pytest.approx(0.1217, abs=5e-4)


@pytest.mark.parametrize(("c", "lam_per_h", "dwell_h"), CASES)
def test_loss_system_matches_erlang_b_and_littles_law(c: int, lam_per_h: float, dwell_h: dict[str, Any]) -> None:
    """Share of parcels turned away = Erlang B(c, a); mean occupied doors = a (1 - B) (Little's law);
    mean dwell of collected parcels = 1/mu; each within 4 standard errors (and a few per cent)."""
    summary, sink, world = loss_system(c, lam_per_h, dwell_h)
    mean_dwell = float(dwell_h["mean"])
    a = lam_per_h * mean_dwell
    blocking = erlang_b(c, a)
    tallies = [sink.boxes[b.box.id] for b in world.boxes]
    parcels = summary["parcels"]

    # the run is the system the theory is about: enough arrivals, no expiry, sends, waste or faults
    assert parcels["arrived"] >= 50_000
    assert parcels["window_ran_out"] == 0
    assert sink.kinds == {"parcel.deposited", "parcel.refused", "parcel.collected"}
    assert sink.sizes == {"A"}
    assert summary["parcel_doors"] == c * BOXES
    assert sum(t.arrived for t in tallies) == parcels["arrived"]

    turned_away = estimate(parcels["turned_away"] / parcels["arrived"], [t.refused / t.arrived for t in tallies])
    occupancy = estimate(
        summary["occupancy"]["mean_occupied_doors_per_box"], [b.occupied_area / world.horizon for b in world.boxes]
    )
    dwell = estimate(parcels["mean_dwell_h"], [t.dwell_h_sum / t.collected for t in tallies])

    assert turned_away.se < 0.05 * blocking
    assert occupancy.se < 0.01 * a * (1 - blocking)
    assert dwell.se < 0.02 * mean_dwell
    turned_away.check(blocking, rel=0.1)
    occupancy.check(a * (1 - blocking), rel=0.03)
    dwell.check(mean_dwell, rel=0.03)
