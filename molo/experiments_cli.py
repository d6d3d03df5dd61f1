"""``molo experiment run|status|report|compare``: what-if experiments from the command line.

Where it sits: on top of :mod:`simulator.experiment`. Every user error is one line on stderr and exit
code 2; Ctrl-C stops within seconds and keeps every finished replication (run again to go on).
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import Executor
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

from molo.cli_errors import positive

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Add ``experiment`` and its sub-commands to the CLI's sub-parsers."""
    p = sub.add_parser("experiment", help="what-if experiments: replications, confidence intervals, comparisons")
    verbs = p.add_subparsers(dest="verb", metavar="{run,status,report,compare}", required=True)

    run = verbs.add_parser("run", help="run (or resume) an experiment file")
    run.add_argument("file", type=Path, help="experiment TOML (see simulator/experiments/example.toml)")
    run.add_argument("--out", type=Path, default=None, help="results folder (default var/experiments/<name>)")
    run.add_argument(
        "--executor",
        choices=["local", "dask", "ray"],
        default="local",
        help="local processes (default), a Dask cluster (MOLO_DASK_SCHEDULER or a local one) or Ray",
    )
    run.add_argument("--workers", type=positive(int), default=None, help="worker processes (default: one per core)")
    run.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    run.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    run.set_defaults(func=cmd_run)

    status = verbs.add_parser("status", help="what an experiment folder holds")
    status.add_argument("dir", type=Path, help="the experiment's results folder")
    status.set_defaults(func=cmd_status)

    report = verbs.add_parser("report", help="the summary table: mean and 95%% CI per point and metric")
    report.add_argument("dir", type=Path, help="the experiment's results folder")
    report.add_argument("--html", action="store_true", help="also write DIR/report.html (self-contained) and plots/")
    report.set_defaults(func=cmd_report)

    compare = verbs.add_parser("compare", help="paired differences of every point against a baseline point")
    compare.add_argument("dir", type=Path, help="the experiment's results folder")
    compare.add_argument("--baseline", default=None, help="the point to compare with (default: the file's)")
    compare.set_defaults(func=cmd_compare)


def _fail(message: str) -> int:
    print(f"molo experiment: {message}", file=sys.stderr)
    return 2


def _executor(kind: str, workers: int | None, stack: ExitStack) -> Executor | None:
    if kind == "local":
        return None
    from simulator import executors  # noqa: PLC0415 - optional dependencies

    made: AbstractContextManager[Executor] = executors.open_executor(kind, workers)
    return stack.enter_context(made)


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every tenth of the work."""

    def __init__(self, plain: bool) -> None:
        self.bar: Any = None
        self.plain = plain or not sys.stderr.isatty()
        self.last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        if self.plain:
            tenth = math.floor(10 * done / total) if total else 10
            if tenth != self.last_tenth:
                self.last_tenth = tenth
                print(f"experiment: {done}/{total} replications", file=sys.stderr, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, unit="run", desc="replications", file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_run(args: argparse.Namespace) -> int:
    from simulator.experiment import ExperimentError, load_experiment, run_experiment  # noqa: PLC0415

    try:
        plan = load_experiment(args.file)
        out = args.out or Path("var") / "experiments" / plan.spec.name
        progress = _Progress(args.no_progress)
        with ExitStack() as stack:
            executor = _executor(args.executor, args.workers, stack)
            try:
                outcome = run_experiment(plan, out, executor=executor, workers=args.workers, progress=progress)
            finally:
                progress.close()
    except ExperimentError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    if outcome.interrupted:
        print(
            f"interrupted: {outcome.ran} replications finished and kept in {out}; run again to go on", file=sys.stderr
        )
        return 130
    print(
        f"{plan.spec.name}: {outcome.ran} replications run, {outcome.reused} reused, in {outcome.wall_seconds:.1f} s "
        f"({outcome.busy_seconds:.1f} s of model time) -> {out}"
    )
    return cmd_report(argparse.Namespace(dir=out, html=not args.no_report))


def cmd_status(args: argparse.Namespace) -> int:
    from simulator.experiment import ExperimentError, status  # noqa: PLC0415

    try:
        info = status(args.dir)
    except ExperimentError as exc:
        return _fail(str(exc))
    print(f"{info['name']}: {'complete' if info['complete'] else 'incomplete'}")
    for row in info["points"]:
        print(f"  {row['point']:<28} {row['finished']:>5} / {row['target']} replications")
    return 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return "" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from simulator.experiment import ExperimentError, load_experiment, stored_results, summary_rows  # noqa: PLC0415

    try:
        plan = _plan_of(args.dir, load_experiment, ExperimentError)
        rows = summary_rows(plan, stored_results(args.dir))
    except ExperimentError as exc:
        return _fail(str(exc))
    print(_table(rows, ["point", "metric", "n", "mean", "ci_low", "ci_high", "half_width"]))
    if getattr(args, "html", False):
        from simulator.report import write_report  # noqa: PLC0415 - matplotlib only when asked

        try:
            print(f"report: {write_report(plan, args.dir)}")
        except OSError as exc:
            return _fail(f"{exc.filename or args.dir}: cannot write the report ({exc.strerror or exc})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from simulator.experiment import ExperimentError, comparison_rows, load_experiment, stored_results  # noqa: PLC0415

    try:
        plan = _plan_of(args.dir, load_experiment, ExperimentError)
        rows = comparison_rows(plan, stored_results(args.dir), args.baseline)
    except ExperimentError as exc:
        return _fail(str(exc))
    print(f"paired differences (point - {args.baseline or plan.baseline}), 95% CI; unpaired half-width for comparison")
    print(_table(rows, ["point", "metric", "n", "mean", "ci_low", "ci_high", "half_width", "unpaired_half_width"]))
    return 0


def _plan_of(out: Path, load: Any, error: type[Exception]) -> Any:
    if not (out / "manifest.json").exists():
        raise error(f"{out} is not an experiment folder (no manifest.json); run `molo experiment run FILE --out {out}`")
    return load(out / "experiment.toml")
