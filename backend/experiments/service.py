"""Experiment jobs: checking and sizing a submitted file, submitting it, cancelling it, reading its results.

Where it sits: under the endpoints (``backend/experiments/endpoints.py``), over the runner
(:mod:`simulator.experiment`), the repository and the queue. A submitted file is checked by the
runner itself (the same one-line :class:`~simulator.experiment.ExperimentError` messages as
``molo experiment run``), plus what only a server must refuse: a scenario that is not one of the
bundled ones and ``network.file`` (both would read files of the server), and a job larger than the
limits (:class:`Limits`).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procrastinate
from procrastinate.jobs import Status as JobStatus
from psycopg import AsyncConnection
from pydantic import ValidationError

import simulator
from backend.experiments import queue, repository
from backend.settings import Settings
from simulator.experiment import ExperimentError, ExperimentSpec, Plan, load_experiment
from simulator.params import SCENARIO_DIR
from simulator.run import network_for

__all__ = [
    "CheckedExperiment",
    "ExperimentTooLargeError",
    "Limits",
    "check_experiment",
    "job_dir",
    "read_table",
]

#: The project's root: the worker runs jobs from here, so a bundled network named relative to it (as the
#: built-in studies name simulator/experiments/networks/synthetic-200.toml) is found.
PROJECT_ROOT = Path(simulator.__file__).resolve().parent.parent
#: Where the network files a job may name live.
NETWORK_DIRS = (PROJECT_ROOT / "simulator" / "experiments" / "networks", PROJECT_ROOT / "network" / "data")
#: The file name an experiment is checked and run under (messages name it).
FILE_NAME = "experiment.toml"
#: The runner's tables, by the name the API serves them under.
TABLES = ("results", "summary", "comparisons")
#: The HTML report's file name in a results folder, unless the runner recorded another.
REPORT_FILE = "report.html"


class ExperimentTooLargeError(Exception):
    """A job over a limit: the message states the limit and the job's size."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Limits:
    """Per job: design points, runs (points x replications, the maximum for sequential
    replications) and simulated box-days (the sum over points of replications x days x boxes)."""

    max_points: int
    max_runs: int
    max_box_days: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.experiment_max_points, settings.experiment_max_runs, settings.experiment_max_box_days)


@dataclass(frozen=True)
class CheckedExperiment:
    plan: Plan
    points: int
    #: Replications per point at most (``n``, or ``max`` for sequential replications).
    replications_per_point: int
    #: What the runner wants at first: points x ``n``, or points x ``min``.
    replications_target: int
    box_days: int

    @property
    def replications_max(self) -> int:
        return self.points * self.replications_per_point


def _flat(overrides: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key an override table sets, with its value, including inside table values."""
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        yield dotted, value
        if isinstance(value, Mapping):
            yield from _flat(value, dotted + ".")


def bundled_networks() -> list[str]:
    """The network files a job may name (as ``network.file``), relative to the project's root."""
    return sorted(p.relative_to(PROJECT_ROOT).as_posix() for d in NETWORK_DIRS for p in d.glob("*.toml"))


def _bundled_network(value: Any) -> Path | None:
    """The bundled network file ``value`` names (relative to the project's root), else None."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return None
    path = (PROJECT_ROOT / value).resolve()
    inside = any(path.is_relative_to(d.resolve()) for d in NETWORK_DIRS)
    return path if inside and path.suffix == ".toml" and path.is_file() else None


def _design_size(spec: ExperimentSpec) -> int:
    design = spec.design
    if design.kind == "list":
        return len(design.points)
    if design.kind == "grid":
        return math.prod(len(levels) for levels in design.factors.values())
    return design.samples


def _server_rules(spec: ExperimentSpec) -> dict[str, Path]:
    """What a file may do on the command line but not on a server: a base scenario that is not a bundled
    one, a network file that is not a bundled one (both would read the server's files). The bundled
    network files it names, by the value it gives."""
    bundled = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    if spec.scenario is not None and spec.scenario.removesuffix(".toml") not in bundled:
        raise ExperimentError(
            f"{FILE_NAME}: scenario {spec.scenario!r}: over the API the base scenario is one of the bundled "
            f"scenarios ({', '.join(bundled)}); change it with [set] and the design"
        )
    given = [*_flat(spec.set), *(kv for p in spec.design.points for kv in _flat(p.set))]
    given += [(k, level) for k, levels in spec.design.factors.items() for level in levels]
    given += [(k, None) for k in spec.design.ranges]
    networks: dict[str, Path] = {}
    for key, value in given:
        if key != "network.file" and not key.startswith("network.file."):
            continue
        path = _bundled_network(value) if key == "network.file" else None
        if path is None:
            raise ExperimentError(
                f"{FILE_NAME}: {key} = {value!r}: over the API network.file is one of the bundled networks "
                f"({', '.join(bundled_networks())}), given relative to the project, or unset (the bundled "
                "Aalborg network; network.boxes takes its first N boxes)"
            )
        networks[value] = path
    return networks


def _as_checked_here(source: str, networks: Mapping[str, Path]) -> str:
    """The file with its bundled network paths made absolute, for checking in this process whatever its
    working directory (the worker runs the file as given, from the project's root)."""
    for value, path in networks.items():
        for quote in ('"', "'"):
            source = source.replace(f"{quote}{value}{quote}", f"{quote}{path.as_posix()}{quote}")
    return source


def _size(spec: ExperimentSpec, limits: Limits) -> tuple[int, int]:
    points = _design_size(spec)
    reps = spec.replications.n if spec.replications.n is not None else spec.replications.max
    if points > limits.max_points:
        raise ExperimentTooLargeError(
            f"experiment too large: {points:,} design points; the limit per job is {limits.max_points:,} "
            "(MOLO_EXPERIMENT_MAX_POINTS)",
            {"points": points, "limit": limits.max_points, "setting": "MOLO_EXPERIMENT_MAX_POINTS"},
        )
    if points * reps > limits.max_runs:
        raise ExperimentTooLargeError(
            f"experiment too large: {points:,} points x {reps:,} replications = {points * reps:,} runs; "
            f"the limit per job is {limits.max_runs:,} runs (MOLO_EXPERIMENT_MAX_RUNS)",
            {"points": points, "replications": reps, "runs": points * reps, "limit": limits.max_runs,
             "setting": "MOLO_EXPERIMENT_MAX_RUNS"},
        )  # fmt: skip
    return points, reps


def _box_days(plan: Plan, reps: int, limits: Limits) -> int:
    boxes_of: dict[int, int] = {}
    total = 0
    for p in plan.points:
        cut = p.scenario.network.boxes
        if cut not in boxes_of:
            boxes_of[cut] = len(network_for(p.scenario).boxes)
        total += reps * math.ceil(plan.spec.days * boxes_of[cut])
    if total > limits.max_box_days:
        boxes = sorted(set(boxes_of.values()))
        shown = str(boxes[0]) if len(boxes) == 1 else f"{boxes[0]}-{boxes[-1]}"
        raise ExperimentTooLargeError(
            f"experiment too large: {len(plan.points):,} points x {reps:,} replications x {plan.spec.days:g} days x "
            f"{shown} boxes = {total:,} simulated box-days; the limit per job is {limits.max_box_days:,} box-days "
            "(MOLO_EXPERIMENT_MAX_BOX_DAYS)",
            {"points": len(plan.points), "replications": reps, "days": plan.spec.days, "box_days": total,
             "limit": limits.max_box_days, "setting": "MOLO_EXPERIMENT_MAX_BOX_DAYS"},
        )  # fmt: skip
    return total


def check_experiment(source: str, limits: Limits) -> CheckedExperiment:
    """Check and size an experiment file submitted as text (blocking: planning resolves every point).

    :class:`ExperimentError`: the runner's one-line message (naming ``experiment.toml`` and the line);
    :class:`ExperimentTooLargeError`: a limit, the job's size and the setting that raises it.
    """
    spec: ExperimentSpec | None = None
    with contextlib.suppress(tomllib.TOMLDecodeError, ValidationError):  # the runner below says what and where
        spec = ExperimentSpec.model_validate(tomllib.loads(source))
    networks: dict[str, Path] = {}
    if spec is not None:
        networks = _server_rules(spec)
        _size(spec, limits)  # before planning, which is work in proportion to the points
    with tempfile.TemporaryDirectory(prefix="molo-experiment-") as tmp:
        path = Path(tmp) / FILE_NAME
        path.write_text(_as_checked_here(source, networks), encoding="utf-8")
        try:
            plan = load_experiment(path)
        except ExperimentError as exc:
            raise ExperimentError(str(exc).replace(str(path), FILE_NAME)) from None
    if spec is None:  # the runner took what pydantic refused: never, but then nothing here was checked
        raise ExperimentError(f"{FILE_NAME}: not a valid experiment file")
    for metric in plan.spec.replications.half_width:  # the runner checks this when it starts
        if metric not in (*plan.spec.metrics.summary, *plan.spec.metrics.impact):
            raise ExperimentError(f"replications.half_width names {metric!r}, which is not a collected metric")
    points, reps = _size(plan.spec, limits)
    box_days = _box_days(plan, reps, limits)
    first = plan.spec.replications.n if plan.spec.replications.n is not None else plan.spec.replications.min
    return CheckedExperiment(plan, points, reps, points * first, box_days)


async def submit(
    conn: AsyncConnection[Any],
    app: procrastinate.App,
    checked: CheckedExperiment,
    source: str,
    submitted_by: str | None,
) -> int:
    """Store the experiment and queue its job, in one transaction; the experiment's id."""
    spec = checked.plan.spec
    async with conn.transaction():
        experiment_id = await repository.insert(
            conn,
            name=spec.name,
            description=spec.description,
            source=source,
            points=checked.points,
            replications_target=checked.replications_target,
            replications_max=checked.replications_max,
            box_days=checked.box_days,
            submitted_by=submitted_by,
        )
        job_id = await queue.defer(app, conn, experiment_id)
        await repository.set_job(conn, experiment_id, job_id)
    return experiment_id


async def cancel(conn: AsyncConnection[Any], app: procrastinate.App, experiment_id: int) -> repository.Row | None:
    """Cancel: a queued job at once, a running one by its worker within seconds (finished replications
    kept). The row afterwards, or None if there is no such experiment. An ended job is left as it is."""
    async with conn.transaction():
        row = await repository.get(conn, experiment_id, for_update=True)
        if row is None or row["status"] in repository.FINAL:
            return row
        await repository.request_cancel(conn, experiment_id)
        if row["job_id"] is not None:
            await queue.cancel(app, conn, int(row["job_id"]))
            job_status = await app.job_manager.get_job_status_async(int(row["job_id"]), connection=conn)
            if job_status is JobStatus.CANCELLED:  # it had not started: no worker will see it
                await repository.finish(conn, experiment_id, "cancelled")
    return await repository.get(conn, experiment_id)


# ------------------------------------------------------------------------------------------ results


def job_dir(root: Path, experiment_id: int) -> Path:
    """The results folder of an experiment job."""
    return root / str(experiment_id)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_table(out: Path, name: str) -> list[dict[str, Any]] | None:
    """The rows of the runner's table ``name`` (its Parquet file, typed), NaN and infinities as None
    (JSON has neither); None if the runner has not written it."""
    path = out / f"{name}.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq  # noqa: PLC0415 - only for results

    return [{k: _finite(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]


def report_file(out: Path, recorded: str | None) -> Path | None:
    """The HTML report of a results folder, if the runner wrote one."""
    name = Path(recorded or REPORT_FILE).name  # a file of the folder, never a path elsewhere
    path = out / name
    return path if path.is_file() else None
