"""Common random numbers: how much they narrow a what-if difference.

Method: the default scenario (50 boxes) for `--days` days, against a variant with smaller vans
(`delivery.carriers.*.van_capacity=40`: more van trips, more parcels brought back and redirected).
For replication r = 1..N the base runs with seed r and the variant twice: with seed r (paired: the same
random numbers wherever the structure is shared) and with seed 1000 + r (unpaired: independent). For
each metric the variance of the N paired differences is set against the variance of the N unpaired
ones; their ratio is what common random numbers buy (1 = nothing; the CI of a paired comparison is
sqrt(ratio) as wide). Metrics: summary fields of `molo simulate` (simulator/run.py).

Run: `uv run python bench/crn_variance.py [--replications 20] [--days 60]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from simulator.params import resolve
from simulator.run import run_batch

METRICS = (
    "parcels.collected",
    "parcels.mean_dwell_h",
    "parcels.redirected",
    "parcels.returned_to_depot",
    "parcels.taken_back",
)
SMALL_VANS = [f"delivery.carriers.{c}.van_capacity=40" for c in ("postnord", "gls", "dao", "bring", "dhl")]


def value(summary: dict[str, Any], dotted: str) -> float:
    node: Any = summary
    for part in dotted.split("."):
        node = node[part]
    return float(node)


def run(days: float, seed: int, extra: list[str]) -> dict[str, float]:
    scenario = resolve(overrides=[f"simulation.days={days}", f"simulation.seed={seed}", *extra])
    summary = run_batch(scenario).summary
    return {m: value(summary, m) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replications", type=int, default=20, help="replications (default 20)")
    parser.add_argument("--days", type=float, default=60.0, help="simulated days per run (default 60)")
    args = parser.parse_args()
    started = time.perf_counter()
    paired: dict[str, list[float]] = {m: [] for m in METRICS}
    unpaired: dict[str, list[float]] = {m: [] for m in METRICS}
    for r in range(1, args.replications + 1):
        base = run(args.days, r, [])
        same = run(args.days, r, SMALL_VANS)
        other = run(args.days, 1000 + r, SMALL_VANS)
        for m in METRICS:
            paired[m].append(same[m] - base[m])
            unpaired[m].append(other[m] - base[m])
    print(
        f"CRN variance: default scenario {args.days:g} days vs vans of 40, {args.replications} replications, "
        f"{3 * args.replications} runs in {time.perf_counter() - started:.0f} s"
    )
    print(f"{'metric':<24} {'mean diff':>10} {'var paired':>12} {'var unpaired':>13} {'ratio':>7}")
    for m in METRICS:
        vp, vu = statistics.variance(paired[m]), statistics.variance(unpaired[m])
        mean = statistics.fmean(paired[m])
        print(f"{m:<24} {mean:>10.2f} {vp:>12.3f} {vu:>13.3f} {vp / vu if vu else float('nan'):>7.3f}")


if __name__ == "__main__":
    main()
