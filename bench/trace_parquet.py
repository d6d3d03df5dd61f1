"""What writing a run's trace to Parquet costs, against a counting sink, in the same process.

Method: the default scenario (a simulated year of the 50 Aalborg boxes, seed 1) run with a
CountingSink (the baseline: the model's own cost) and with a ParquetSink (typed columns, zstd),
alternately, `--repeats` times each; the wall time of each run includes writing the file. Printed:
the medians, the ratio Parquet/counting (the goal is at most 1.30), the file size, and the CSV sink
for comparison.

Run: `uv run python bench/trace_parquet.py [--repeats 3] [--days 365]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from simulator.params import resolve
from simulator.run import run_batch
from simulator.trace import CountingSink, FileSink, ParquetSink


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--days", type=float, default=365.0)
    args = parser.parse_args()
    scenario = resolve(overrides=[f"simulation.days={args.days}"])
    work = Path(tempfile.mkdtemp(prefix="molo-trace-"))
    times: dict[str, list[float]] = {"counting": [], "parquet": [], "csv": []}
    records = 0
    for i in range(args.repeats):
        for kind in list(times):
            started = time.perf_counter()
            if kind == "counting":
                result = run_batch(scenario, CountingSink())
            elif kind == "parquet":
                sink = ParquetSink(work / f"trace-{i}.parquet", scenario.simulation.start)
                result = run_batch(scenario, sink)
                sink.close()
            else:
                csv_sink = FileSink(work / f"trace-{i}.csv", scenario.simulation.start)
                result = run_batch(scenario, csv_sink)
                csv_sink.close()
            times[kind].append(time.perf_counter() - started)
            records = result.records
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"method: {scenario.simulation.days:g} simulated days of {scenario.name} (50 boxes), {records:,} records; "
        f"each sink run {args.repeats} times alternately in one process, wall time incl. writing; medians"
    )
    for kind, seconds in med.items():
        print(f"  {kind:<9} {seconds:6.2f} s   ({records / seconds:,.0f} records/s)")
    print(f"ratio parquet/counting: {med['parquet'] / med['counting']:.3f} (goal <= 1.30); "
          f"csv/counting: {med['csv'] / med['counting']:.3f}")  # fmt: skip
    size = (work / "trace-0.parquet").stat().st_size
    csv_size = (work / "trace-0.csv").stat().st_size
    print(f"file size: parquet {size / 1e6:.1f} MB, csv {csv_size / 1e6:.1f} MB")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
