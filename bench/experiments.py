"""The experiment runner at study size: wall time with 1 and 2 local workers and a 2-worker Dask
LocalCluster, parallel efficiency, and the runner's overhead against the bare runs.

Method: an experiment of `--points` design points (a grid over the locker share and the red-box
ready share) x `--reps` replications x `--days` simulated days of the 50 Aalborg boxes, metrics: the
summary's collected parcels and the method's avoided CO2 (network and per box). Bare runs: the same
replication jobs called in turn in this process, without the runner (no storage, no tables), timed
as the baseline. Then the runner with 1 worker (in this process), 2 local worker processes, and a
2-worker Dask LocalCluster, each into a fresh folder. Overhead = runner(1 worker) / bare - 1 (goal
under 5%), and, robust to other load on the machine, the runner's own share of the 1-worker run
(its wall time against the time spent inside the replications, both in that run); parallel
efficiency = T(1) / (2 x T(2)). The issue's full size is 20 x 30 x 365 days. `--only` runs some of
the four (e.g. `--only two` for the whole study's wall time with 2 local workers, the way a
researcher would run it here); figures that need a part left out are not printed.

Run: `uv run python bench/experiments.py [--points 20] [--reps 30] [--days 365] [--only bare,one,two,dask]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from simulator.executors import dask_executor
from simulator.experiment import load_experiment, run_experiment, run_replication

PARTS = ("bare", "one", "two", "dask")
LEVELS = {"demand.locker_share": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5],
          "waste.ready_share": [0.3, 0.5, 0.7, 0.9]}  # fmt: skip


def experiment_text(points: int, reps: int, days: float) -> str:
    shares = LEVELS["demand.locker_share"][: max(1, min(10, points // 2 if points > 1 else 1))]
    ready = LEVELS["waste.ready_share"][: max(1, points // len(shares))]
    return f"""
name = "bench"
seed = 2026
days = {days}
[design]
kind = "grid"
[design.factors]
"demand.locker_share" = {shares}
"waste.ready_share" = {ready}
[replications]
n = {reps}
[metrics]
summary = ["parcels.collected"]
impact = ["avoided.kg_co2e_wtw"]
per_box = ["avoided.kg_co2e_wtw"]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--skip-dask", action="store_true", help="the same as leaving dask out of --only")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    if unknown := parts - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.skip_dask:
        parts.discard("dask")
    work = Path(tempfile.mkdtemp(prefix="molo-bench-exp-"))
    path = work / "bench.toml"
    path.write_text(experiment_text(args.points, args.reps, args.days))
    plan = load_experiment(path)
    jobs = [plan.job(p, r) for p in plan.points for r in range(1, args.reps + 1)]  # what the runner runs
    print(f"method: {len(plan.points)} points x {args.reps} replications x {args.days:g} days of 50 boxes "
          f"= {len(jobs)} runs; machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    timings: dict[str, float] = {}
    if "bare" in parts:
        started = time.perf_counter()
        for job in jobs:
            run_replication(job)
        timings["bare"] = time.perf_counter() - started
        print(f"bare runs, in turn, no runner: {timings['bare']:.1f} s ({timings['bare'] / len(jobs):.2f} s per run)")
    local = (("one", "runner, 1 worker", {"workers": 1}), ("two", "runner, 2 local workers", {"workers": 2}))
    for part, label, kwargs in local:
        if part not in parts:
            continue
        out = work / label.replace(" ", "_").replace(",", "")
        started = time.perf_counter()
        outcome = run_experiment(plan, out, **kwargs)  # type: ignore[arg-type]
        timings[part] = time.perf_counter() - started
        print(f"{label}: {timings[part]:.1f} s ({outcome.busy_seconds:.1f} s inside the replications)")
        if part == "one":
            # Load-robust: the runner's own time is the wall time it spent outside the replications,
            # both measured in the same run.
            print(f"runner's own time in that run: {100 * (timings[part] / outcome.busy_seconds - 1):+.1f}%")
        shutil.rmtree(out)
    if "dask" in parts:
        out = work / "dask"
        started = time.perf_counter()
        with dask_executor(2) as executor:
            run_experiment(plan, out, executor=executor)
        timings["dask"] = time.perf_counter() - started
        print(f"runner, 2-worker Dask LocalCluster (cluster start included): {timings['dask']:.1f} s")
    if "one" in timings and "bare" in timings:
        overhead = timings["one"] / timings["bare"] - 1
        print(f"runner overhead against the bare runs: {100 * overhead:+.1f}% (goal under 5%)")
    if "one" in timings and "two" in timings:
        print(f"parallel efficiency, 2 local workers: {timings['one'] / (2 * timings['two']):.2f}")
    if "one" in timings and "dask" in timings:
        print(f"parallel efficiency, 2 Dask workers: {timings['one'] / (2 * timings['dask']):.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
