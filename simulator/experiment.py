"""What-if experiments: design points x replications, run on any executor, stored as they finish.

Where it sits: above the model (:mod:`simulator.run`) and the method (:mod:`accounting`), below the
CLI (``molo experiment``) and the backend's experiment jobs. An experiment file (TOML, see
``simulator/experiments/example.toml``) names a base scenario, the factors to vary (a list of points,
a full grid or a Latin hypercube), the replications per point (fixed, or sequential until the 95%
confidence intervals of named metrics are narrow enough) and the metrics to collect.

Randomness. One master seed. Replication r of *every* design point runs with the seed
``replication_seed(master, r)``; inside a run, the model draws from streams named by that seed, a
purpose and a box (:meth:`simulator.model.World.rng`). So replication r of two points shares every
random stream the two structures share (common random numbers), and differences between points are
paired. What stays identical is stated in docs/experiments.md.

Storage (``OUT/``): ``experiment.toml`` (the file as run), ``manifest.json`` (what identifies the
results: refused if a re-run's file would mix them), ``runs/<point>/<rep>.json`` (one per finished
replication, written atomically as it ends: a killed run resumes from them), and, after the run,
``results.csv``/``results.parquet`` (one row per point, replication, metric [, box]),
``summary.csv``/``.parquet`` and ``comparisons.csv``/``.parquet`` (see :func:`write_tables`).

Factors are scenario parameters (dotted, :mod:`simulator.params`), with two prefixes that are not:
``method.<key.path>`` is an override of the CO2 method at that point only (the simulated run is the
same, so its paired difference is exact), and ``layout.<field>`` (:data:`LAYOUT_FACTORS`) changes the
doors of every box of that point's network. Each point runs on its own network (its ``network.boxes``
and layout).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accounting import Method, apply_overrides, assess, summarize
from accounting.method import CATEGORIES, METRICS, MODES
from accounting.overrides import set_dotted
from contract.domain import Compartment, CompartmentKind, SizeClass
from network import Network, build_layout, geography_of
from simulator.impact import ImpactSink, method_for
from simulator.params import DEFAULT_SCENARIO, SCENARIO_DIR, Scenario, first_error, unknown_parameter
from simulator.run import EVENT_KINDS, network_for, run_batch
from simulator.stats import Interval, mean_interval, paired_difference, welch_difference

__all__ = [
    "ExperimentError",
    "ExperimentSpec",
    "Plan",
    "Point",
    "RunOutcome",
    "load_experiment",
    "plan_experiment",
    "replication_seed",
    "run_experiment",
    "run_replication",
]

log = logging.getLogger(__name__)
EXPERIMENT_DIR = Path(__file__).resolve().parent / "experiments"
#: The metrics a run can report besides summary fields: the method's figures (totals, per category).
IMPACT_SCENARIOS = ("baseline", "project", "avoided")
FORMAT_VERSION = 1
#: A factor ``method.<key.path>`` overrides the CO2 method at its point (``method.van_electric_share``).
METHOD_PREFIX = "method."
#: A factor ``layout.<field>`` changes every box of its point's network; the fields and what they do.
LAYOUT_PREFIX = "layout."
LAYOUT_FACTORS = {
    "parcel_doors_scale": "each size's parcel doors x this, rounded half up, at least 1 of a size the box has",
    "red_boxes": "red-box doors per box (an integer, 0 or more)",
    "red_box_capacity_kg": "the weight limit of every red box, kg (0 < x <= 100; default 4)",
}


class ExperimentError(ValueError):
    """A user error in an experiment file or folder: one line saying what, where and what is allowed."""


# ------------------------------------------------------------------------------------------ the file


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,63}$")
    #: Scenario overrides of this point (dotted keys).
    set: dict[str, Any] = Field(default_factory=dict)


class Design(_Model):
    kind: Literal["list", "grid", "lhs"] = "list"
    #: ``list``: the points, each with its overrides.
    points: list[PointSpec] = Field(default_factory=list)
    #: ``grid``: every combination of these values (a factor -> its levels).
    factors: dict[str, list[Any]] = Field(default_factory=dict)
    #: ``lhs``: a Latin hypercube over these [low, high] ranges (integers if both bounds are).
    ranges: dict[str, tuple[int | float, int | float]] = Field(default_factory=dict)
    samples: int = Field(default=10, ge=1, le=10_000)

    @model_validator(mode="after")
    def _shape(self) -> Design:
        given = {"list": bool(self.points), "grid": bool(self.factors), "lhs": bool(self.ranges)}
        if not given[self.kind]:
            need = {"list": "[[design.points]]", "grid": "[design.factors]", "lhs": "[design.ranges]"}[self.kind]
            raise ValueError(f"design kind {self.kind!r} needs {need}")
        for key, (low, high) in self.ranges.items():
            if low >= high:
                raise ValueError(f"range of {key!r} must be [low, high] with low < high")
        return self


class Replications(_Model):
    #: Fixed number per point; or leave unset and give ``min``/``max``/``half_width``.
    n: int | None = Field(default=None, ge=1, le=10_000)
    min: int = Field(default=5, ge=2, le=10_000)
    max: int = Field(default=50, ge=2, le=10_000)
    #: Sequential: add replications to a point until each named metric's 95% CI half-width is at most
    #: this (absolute, in the metric's unit), or ``max`` is reached.
    half_width: dict[str, float] = Field(default_factory=dict)
    confidence: float = Field(default=0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _shape(self) -> Replications:
        if self.n is None and not self.half_width:
            raise ValueError("give replications.n, or replications.half_width with min and max")
        if self.min > self.max:
            raise ValueError("replications.min must be <= replications.max")
        return self


class Metrics(_Model):
    #: Fields of the run summary, dotted (``parcels.collected``); ``a/b`` is the ratio of two fields.
    summary: list[str] = Field(default_factory=list)
    #: Figures of the method, dotted: ``avoided.kg_co2e_wtw`` (network totals) or
    #: ``hazardous_waste.avoided.trips`` (one category).
    impact: list[str] = Field(default_factory=list)
    #: Method figures per box (``avoided.kg_co2e_wtw``): tidy rows with the box id.
    per_box: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some(self) -> Metrics:
        if not (self.summary or self.impact or self.per_box):
            raise ValueError("name at least one metric in [metrics] summary, impact or per_box")
        return self


class ExperimentSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    #: A scenario file (relative to the experiment file), or a bundled one by name; default aalborg.
    scenario: str | None = None
    #: Overrides of the base scenario for every point (dotted keys).
    set: dict[str, Any] = Field(default_factory=dict)
    seed: int = 1
    days: float = Field(default=365.0, gt=0)
    warmup_days: float = Field(default=0.0, ge=0)
    #: The point the others are compared with (paired); default the first.
    baseline: str | None = None
    #: Overrides of the CO2 method (``key.path=value``), for impact metrics.
    method: list[str] = Field(default_factory=list)
    design: Design
    replications: Replications
    metrics: Metrics

    @model_validator(mode="after")
    def _warmup(self) -> ExperimentSpec:
        if self.warmup_days >= self.days:
            raise ValueError("warmup_days must be shorter than days")
        return self


@dataclass(frozen=True)
class Point:
    """One design point: its name, factor values, fully resolved scenario, its own method overrides
    (``method.*`` factors, applied after the experiment's) and box layout changes (``layout.*``)."""

    name: str
    factors: dict[str, Any]
    scenario: Scenario
    method: tuple[str, ...] = ()
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def network_key(self) -> str:
        """Points with equal keys run on the same network."""
        net = self.scenario.network
        given = {"file": str(net.file) if net.file else None, "boxes": net.boxes, "layout": self.layout}
        return _digest(json.dumps(given, sort_keys=True))

    def digest(self) -> str:
        """What this point's results depend on besides the experiment's settings."""
        text = self.scenario.model_dump_json()
        if self.method or self.layout:
            text += json.dumps({"method": list(self.method), "layout": self.layout}, sort_keys=True)
        return _digest(text)


@dataclass(frozen=True)
class Plan:
    """A validated experiment, ready to run."""

    spec: ExperimentSpec
    points: list[Point]
    #: The first point's network (what the manifest's identity names).
    network: Network
    source: str
    path: Path | None = None
    #: Every point's network by :attr:`Point.network_key`.
    networks: dict[str, Network] = field(default_factory=dict)

    def network_of(self, point: Point) -> Network:
        """The network ``point`` runs on."""
        return self.networks.get(point.network_key, self.network)

    def job(self, point: Point, replication: int) -> Job:
        """Replication ``replication`` (from 1) of ``point``, as a worker runs it."""
        return Job(
            point.name, replication, replication_seed(self.spec.seed, replication), point.scenario,
            self.network_of(point), self.spec.warmup_days, self.spec.metrics, (*self.spec.method, *point.method),
        )  # fmt: skip

    @property
    def baseline(self) -> str:
        return self.spec.baseline or self.points[0].name

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise ExperimentError(f"no design point {name!r}; the points are {', '.join(p.name for p in self.points)}")

    def identity(self) -> dict[str, Any]:
        """What the stored results depend on: a re-run may add replications, never change these."""
        return {
            "format": FORMAT_VERSION,
            "seed": self.spec.seed,
            "warmup_days": self.spec.warmup_days,
            "method": list(self.spec.method),
            "metrics": self.spec.metrics.model_dump(mode="json"),
            "points": {p.name: p.digest() for p in self.points},
            "network": _digest(self.network.model_dump_json()),
        }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def replication_seed(master: int, replication: int) -> int:
    """The model seed of replication ``replication`` (from 1) at every design point: independent
    across replications, the same across points (common random numbers)."""
    digest = hashlib.sha256(f"molo-experiment:{master}:{replication}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _line_of(source: str, needle: str) -> int | None:
    for number, line in enumerate(source.splitlines(), 1):
        if needle in line:
            return number
    return None


def _where(path: Path | None, source: str, needle: str | None) -> str:
    name = str(path) if path else "experiment"
    line = _line_of(source, needle) if needle else None
    return f"{name}:{line}" if line else name


def _scenario_data(spec: ExperimentSpec, base_dir: Path) -> dict[str, Any]:
    if spec.scenario is None:
        path = DEFAULT_SCENARIO
    else:
        candidates = [base_dir / spec.scenario, SCENARIO_DIR / spec.scenario, SCENARIO_DIR / f"{spec.scenario}.toml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            bundled = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
            raise ExperimentError(f"scenario {spec.scenario!r} not found (a path, or one of: {bundled})")
        path = found
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        # Start from the fully resolved scenario, so a factor may change one field of a table (say,
        # one carrier's van capacity) without restating the others.
        return Scenario.model_validate(data).model_dump(mode="json")
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ExperimentError(f"{path}: not a valid scenario: {_first_error(exc)}") from None


def _first_error(exc: Exception) -> str:
    return first_error(exc) if isinstance(exc, ValidationError) else str(exc)


def _resolve_point(
    base: dict[str, Any], overrides: Mapping[str, Any], plan_path: Path | None, source: str, name: str
) -> Scenario:
    data = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if problem := unknown_parameter(key, base):
            raise ExperimentError(f"{_where(plan_path, source, key)}: {problem}")
        try:
            set_dotted(data, key, value)
        except ValueError as exc:
            raise ExperimentError(f"{_where(plan_path, source, key)}: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        needle = next((k for k in overrides if loc.startswith(k) or k.startswith(loc)), None) if loc else None
        what = f"{loc}: {err['msg']}" if loc else str(err["msg"])
        given = f" (given {err['input']!r})" if loc and "input" in err and not isinstance(err["input"], dict) else ""
        raise ExperimentError(f"{_where(plan_path, source, needle)}: point {name!r}: {what}{given}") from None


def _design_points(design: Design, seed: int) -> list[tuple[str, dict[str, Any]]]:
    if design.kind == "list":
        names = [p.name for p in design.points]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ExperimentError(f"design points must have distinct names; repeated: {', '.join(dupes)}")
        return [(p.name, dict(p.set)) for p in design.points]
    if design.kind == "grid":
        keys = list(design.factors)
        combos = itertools.product(*(design.factors[k] for k in keys))
        return [
            (
                ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo, strict=True)),
                dict(zip(keys, combo, strict=True)),
            )
            for combo in combos
        ]
    from scipy.stats import qmc  # noqa: PLC0415 - only Latin hypercubes need it

    keys = list(design.ranges)
    sample = qmc.LatinHypercube(d=len(keys), seed=seed).random(design.samples)
    points: list[tuple[str, dict[str, Any]]] = []
    for i, row in enumerate(sample, 1):
        values: dict[str, Any] = {}
        for key, u in zip(keys, row, strict=True):
            low, high = design.ranges[key]
            value = low + float(u) * (high - low)
            integral = _given_as_int(design, key)
            values[key] = round(value) if integral else float(f"{value:.6g}")
        points.append((f"lhs-{i:03d}", values))
    return points


def _given_as_int(design: Design, key: str) -> bool:
    low, high = design.ranges[key]
    return isinstance(low, int) and isinstance(high, int)


def plan_experiment(spec: ExperimentSpec, *, path: Path | None = None, source: str = "") -> Plan:
    """Resolve every design point's scenario; :class:`ExperimentError` names the first problem."""
    base_dir = path.parent if path else Path.cwd()
    base = _scenario_data(spec, base_dir)
    common = {**spec.set, "simulation.days": spec.days}
    base_scenario = _resolve_point(base, common, path, source, "(base)")
    base = base_scenario.model_dump(mode="json")
    try:
        apply_overrides(Method(), list(spec.method))
    except (ValueError, ValidationError) as exc:
        raise ExperimentError(f"{_where(path, source, 'method')}: method override: {_first_error(exc)}") from None
    points = []
    for name, factors in _design_points(spec.design, spec.seed):
        own = {k: v for k, v in factors.items() if not k.startswith((METHOD_PREFIX, LAYOUT_PREFIX))}
        scenario = _resolve_point(base, own, path, source, name)
        method = _point_method(spec, factors, path, source, name)
        layout = _point_layout(factors, path, source, name)
        points.append(Point(name, factors, scenario, method, layout))
    if spec.baseline is not None and spec.baseline not in {p.name for p in points}:
        raise ExperimentError(
            f"{_where(path, source, 'baseline')}: baseline {spec.baseline!r} is not a design point "
            f"(points: {', '.join(p.name for p in points)})"
        )
    bare = {p.network_key: network_for(p.scenario) for p in points}
    if len({_digest(n.model_dump_json()) for n in bare.values()}) > 1 and not all(
        p.scenario.network.file == points[0].scenario.network.file for p in points
    ):
        raise ExperimentError("design points must share one network file (vary network.boxes to change its size)")
    networks: dict[str, Network] = {}
    for p in points:
        if p.network_key not in networks:
            networks[p.network_key] = _with_layout(bare[p.network_key], p.layout, path, source, p.name)
    first = points[0]
    _check_metrics(spec.metrics, first.scenario, networks[first.network_key], path, source)
    return Plan(spec, points, networks[first.network_key], source, path, networks)


def _numeric_leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _numeric_leaves(value, f"{prefix}{key}.")
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            yield f"{prefix}{key}"


def metric_names(scenario: Scenario, network: Network) -> dict[str, list[str]]:
    """The names each ``[metrics]`` list accepts (besides ``a/b`` ratios of them): the run summary's
    numeric fields, read from a one-hour run of ``scenario`` (its shape does not depend on the
    horizon), and the method's totals, per-category and per-mode figures and its headline (``per_box``
    takes the totals)."""
    probe = scenario.model_copy(update={"simulation": scenario.simulation.model_copy(update={"days": 1 / 24})})
    seen = _numeric_leaves(run_batch(probe, network=network).summary)
    summary = sorted({*seen, *(f"events.{kind}" for kind in EVENT_KINDS)})
    totals = [f"{s}.{m}" for s in IMPACT_SCENARIOS for m in METRICS]
    headline = [f"headline.{k}" for k in ("motorised_trips_avoided", "vkm_avoided", "kg_co2e_wtw_avoided")]
    modes = [f"modes.{mode}.{t}" for mode in MODES for t in totals]
    impact = [*totals, *(f"{c}.{t}" for c in CATEGORIES for t in totals), *headline, *modes]
    return {"summary": summary, "impact": impact, "per_box": totals}


def _check_metrics(metrics: Metrics, scenario: Scenario, network: Network, path: Path | None, source: str) -> None:
    """Every named metric exists, so a typo fails at planning, not after the first replication."""
    allowed = metric_names(scenario, network)
    targets = {"summary": metrics.summary, "impact": metrics.impact, "per_box": metrics.per_box}
    for kind, names in targets.items():
        known = set(allowed[kind])
        for name in names:
            for part in (p.strip() for p in name.split("/", 1)):
                if part in known:
                    continue
                close = difflib.get_close_matches(part, allowed[kind], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                examples = ", ".join(allowed[kind][:4])
                raise ExperimentError(
                    f"{_where(path, source, name)}: {part!r} is not one of the [metrics] {kind} names; {hint}"
                    f"({len(known)} names, e.g. {examples}; docs/experiments.md lists them)"
                )


def _point_method(
    spec: ExperimentSpec, factors: Mapping[str, Any], path: Path | None, source: str, name: str
) -> tuple[str, ...]:
    """The ``method.*`` factors of a point as method overrides, each checked against the method."""
    overrides: list[str] = []
    for key, value in factors.items():
        if not key.startswith(METHOD_PREFIX):
            continue
        override = f"{key.removeprefix(METHOD_PREFIX)}={json.dumps(value)}"
        try:
            apply_overrides(Method(), [*spec.method, *overrides, override])
        except (ValueError, ValidationError) as exc:
            raise ExperimentError(
                f"{_where(path, source, key)}: point {name!r}: method factor {key!r}: {_first_error(exc)} "
                f"(the method's parameters: accounting/assumptions.py, docs/methodology.md)"
            ) from None
        overrides.append(override)
    return tuple(overrides)


def _point_layout(factors: Mapping[str, Any], path: Path | None, source: str, name: str) -> dict[str, Any]:
    """The ``layout.*`` factors of a point, checked."""
    layout: dict[str, Any] = {}
    for key, value in factors.items():
        if not key.startswith(LAYOUT_PREFIX):
            continue
        field_name = key.removeprefix(LAYOUT_PREFIX)
        where = f"{_where(path, source, key)}: point {name!r}: {key!r}"
        if field_name not in LAYOUT_FACTORS:
            allowed = ", ".join(f"layout.{k}" for k in LAYOUT_FACTORS)
            raise ExperimentError(f"{where} is not a layout factor (allowed: {allowed})")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if field_name == "red_boxes":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif field_name == "red_box_capacity_kg":
            ok = number and 0 < value <= 100
        else:
            ok = number and value > 0
        if not ok:
            raise ExperimentError(f"{where}: {LAYOUT_FACTORS[field_name]}; given {value!r}")
        layout[field_name] = value
    return layout


def _scaled_doors(count: int, scale: float) -> int:
    return max(1, math.floor(count * scale + 0.5)) if count else 0


def _with_layout(network: Network, layout: Mapping[str, Any], path: Path | None, source: str, name: str) -> Network:
    """``network`` with every box's doors changed as ``layout`` (``layout.*`` factors) says."""
    if not layout:
        return network
    scale = float(layout.get("parcel_doors_scale", 1.0))
    capacity = layout.get("red_box_capacity_kg")
    boxes = []
    for box in network.boxes:
        sizes = [door.size_class for door in box.layout.parcel_compartments]
        a, b, c = (_scaled_doors(sizes.count(size), scale) for size in (SizeClass.A, SizeClass.B, SizeClass.C))
        red = int(layout.get("red_boxes", len(box.layout.red_boxes)))
        try:
            doors = build_layout(a, b, c, red).compartments
        except (ValueError, ValidationError):
            key = next(iter(layout))
            raise ExperimentError(
                f"{_where(path, source, f'{LAYOUT_PREFIX}{key}')}: point {name!r}: box {box.id} would have "
                f"{red + a + b + c} doors with this layout (1 to 64 allowed)"
            ) from None
        if capacity is not None:
            doors = [
                Compartment(id=d.id, kind=d.kind, capacity_kg=float(capacity))
                if d.kind is CompartmentKind.RED_BOX
                else d
                for d in doors
            ]
        boxes.append(box.model_copy(update={"layout": box.layout.model_copy(update={"compartments": doors})}))
    return network.model_copy(update={"boxes": boxes})


def load_experiment(path: Path) -> Plan:
    """Read, validate and plan an experiment file."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read the experiment file ({exc.strerror})") from None
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not valid TOML: {exc}") from None
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            msg = f"unknown setting {'.'.join(loc)!r} (allowed here: {', '.join(allowed)})"
        else:
            msg = f"{'.'.join(loc)}: {err['msg']}" if loc else str(err["msg"])
        raise ExperimentError(f"{_where(path, source, loc[-1] if loc else None)}: {msg}") from None
    return plan_experiment(spec, path=path, source=source)


def _allowed_fields(loc: Sequence[str]) -> list[str]:
    model: type[BaseModel] = ExperimentSpec
    for part in loc:
        annotation = model.model_fields.get(part)
        if (
            annotation is None
            or not isinstance(annotation.annotation, type)
            or not issubclass(annotation.annotation, BaseModel)
        ):
            break
        model = annotation.annotation
    return sorted(model.model_fields)


# ------------------------------------------------------------------------------------ one replication


@dataclass(frozen=True)
class Job:
    """One replication of one design point: everything a worker process needs."""

    point: str
    replication: int
    seed: int
    scenario: Scenario
    network: Network
    warmup_days: float
    metrics: Metrics
    method: tuple[str, ...]


def _lookup(tree: Any, dotted: str) -> float:
    """The number at ``dotted``; keys may hold dots themselves (``events.parcel.collected``), and an
    event kind the run never recorded counts 0."""
    node, rest = tree, dotted
    while True:
        if isinstance(node, Mapping) and rest in node:
            node = node[rest]
            break
        head, dot, tail = rest.partition(".")
        if isinstance(node, Mapping) and node is tree.get("events") and rest in EVENT_KINDS:
            return 0.0
        if not dot or not isinstance(node, Mapping) or head not in node:
            raise KeyError(dotted)
        node, rest = node[head], tail
    if node is None:
        return float("nan")
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise KeyError(dotted)
    return float(node)


def _metric(tree: Any, name: str) -> float:
    if "/" in name:
        num, den = (s.strip() for s in name.split("/", 1))
        d = _lookup(tree, den)
        return _lookup(tree, num) / d if d else float("nan")
    return _lookup(tree, name)


def run_replication(job: Job) -> dict[str, Any]:
    """Run one replication; its metrics (network and per box), deterministic for the job."""
    scenario = job.scenario.model_copy(
        update={"simulation": job.scenario.simulation.model_copy(update={"seed": job.seed})}
    )
    wants_impact = bool(job.metrics.impact or job.metrics.per_box)
    warmup = job.warmup_days * 86_400.0
    sink = _AfterWarmup(ImpactSink(scenario.simulation.start), warmup) if wants_impact else None
    result = run_batch(scenario, sink, network=job.network, warmup_days=job.warmup_days)
    values: dict[str, float] = {}
    per_box: dict[str, dict[str, float]] = {}
    for name in job.metrics.summary:
        values[name] = _metric(result.summary, name)
    if sink is not None:
        method = apply_overrides(method_for(scenario), list(job.method))
        geo = geography_of(job.network)
        impact = summarize(assess(sink.inner.counter.rows(), geo, method), ("box",) if job.metrics.per_box else ())
        zero = {s: dict.fromkeys(METRICS, 0.0) for s in IMPACT_SCENARIOS}  # a mode nobody used
        modes = {mode: impact["modes"].get(mode, zero) for mode in MODES}
        tree = {**impact["totals"], **impact["categories"], "headline": impact["headline"], "modes": modes}
        for name in job.metrics.impact:
            values[name] = _metric(tree, name)
        for name in job.metrics.per_box:
            per_box[name] = {g["key"]["box"]: _metric(g, name) for g in impact["groups"]}
    return {
        "point": job.point,
        "replication": job.replication,
        "seed": job.seed,
        "metrics": values,
        "per_box": per_box,
    }


@dataclass
class _AfterWarmup:
    inner: ImpactSink
    since: float

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        if t >= self.since:
            self.inner.record(t, box_id, kind, data)


def _timed(job: Job) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    return run_replication(job), time.perf_counter() - started


# ------------------------------------------------------------------------------------------ the runner


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _result_path(out: Path, point: str, replication: int) -> Path:
    return out / "runs" / point / f"{replication:04d}.json"


def stored_results(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Finished replications in ``out``: point -> replication -> result."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((out / "runs").glob("*/*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        found.setdefault(data["point"], {})[int(data["replication"])] = data
    return found


def _check_manifest(plan: Plan, out: Path) -> None:
    manifest = out / "manifest.json"
    identity = plan.identity()
    if manifest.exists():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old.get("identity") != identity:
            changed = sorted(k for k in identity if old.get("identity", {}).get(k) != identity[k])
            raise ExperimentError(
                f"{out} holds results of a different experiment (changed: {', '.join(changed)}); they would "
                f"mix: run into a new folder, or restore the file (only replication counts may change)"
            )
    elif (out / "runs").exists() and any((out / "runs").iterdir()):
        raise ExperimentError(f"{out} has runs but no manifest.json: not an experiment folder of this tool")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(manifest, json.dumps({"name": plan.spec.name, "identity": identity, **provenance()}, indent=2) + "\n")
    _write_atomic(out / "experiment.toml", plan.source or "")


def provenance() -> dict[str, Any]:
    """Project version and git revision, beside every result."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        project = version("molo-hubs")
    except PackageNotFoundError:
        project = "unknown"
    revision = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if found.returncode == 0:
            revision = found.stdout.strip()
    return {"project_version": project, "git_revision": revision, "python": sys.version.split()[0]}


@dataclass
class RunOutcome:
    """What :func:`run_experiment` did."""

    out: Path
    ran: int = 0
    reused: int = 0
    interrupted: bool = False
    replications: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    busy_seconds: float = 0.0


Progress = Callable[[int, int], None]


def _target_reps(plan: Plan, results: Mapping[str, Mapping[int, dict[str, Any]]]) -> dict[str, int]:
    """How many replications each point needs now (sequential: grow where a CI is too wide)."""
    reps = plan.spec.replications
    if reps.n is not None:
        return {p.name: reps.n for p in plan.points}
    wanted: dict[str, int] = {}
    for p in plan.points:
        have = results.get(p.name, {})
        n = len(have)
        if n < reps.min:
            wanted[p.name] = reps.min
            continue
        wide = False
        for metric, target in reps.half_width.items():
            vals = [r["metrics"][metric] for _, r in sorted(have.items())]
            if mean_interval(vals, reps.confidence).half_width > target:
                wide = True
        wanted[p.name] = min(reps.max, n + 1) if wide else n
    return wanted


def run_experiment(
    plan: Plan,
    out: Path,
    *,
    executor: Executor | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    max_jobs: int | None = None,
) -> RunOutcome:
    """Run what is missing of ``plan`` into ``out``; every finished replication is stored as it ends.

    ``executor``: any ``concurrent.futures.Executor`` (default: a process pool of ``workers``, or run in
    this process when ``workers`` is 1). ``max_jobs`` stops after that many new replications (tests).
    KeyboardInterrupt stops at once, cancels what has not started and keeps what finished.
    """
    for metric in plan.spec.replications.half_width:
        if metric not in (*plan.spec.metrics.summary, *plan.spec.metrics.impact):
            raise ExperimentError(f"replications.half_width names {metric!r}, which is not a collected metric")
    _check_manifest(plan, out)
    started = time.perf_counter()
    outcome = RunOutcome(out)
    results = stored_results(out)
    outcome.reused = sum(len(v) for v in results.values())
    own: Executor | None = None
    if executor is None and (workers or os.cpu_count() or 1) > 1:
        own = executor = ProcessPoolExecutor(max_workers=workers or os.cpu_count())
    pending: dict[Future[tuple[dict[str, Any], float]], Job] = {}
    timings = out / "timings.jsonl"
    try:
        while True:
            targets = _target_reps(plan, results)
            queued = {(j.point, j.replication) for j in pending.values()}
            todo = [
                (p, r)
                for p in plan.points
                for r in range(1, targets[p.name] + 1)
                if r not in results.get(p.name, {}) and (p.name, r) not in queued
            ]
            if max_jobs is not None:
                todo = todo[: max(0, max_jobs - outcome.ran - len(pending))]
            for point, rep in todo:
                job = plan.job(point, rep)
                if executor is None:
                    result, busy = _timed(job)
                    _store(out, timings, result, busy, results, outcome)
                    if progress:
                        progress(outcome.ran, outcome.ran + len(_missing(plan, results)))
                else:
                    pending[executor.submit(_timed, job)] = job
            if not pending:
                if executor is None and todo:
                    continue  # sequential rules may want more after these
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                result, busy = future.result()
                _store(out, timings, result, busy, results, outcome)
            if progress:
                progress(outcome.ran, outcome.ran + len(_missing(plan, results)))
    except KeyboardInterrupt:
        outcome.interrupted = True
        for future in pending:
            future.cancel()
        log.warning("interrupted: %d replications finished and stored; run again to go on", outcome.ran)
    finally:
        if own is not None:
            own.shutdown(wait=not outcome.interrupted, cancel_futures=True)
    outcome.replications = {p: len(r) for p, r in results.items()}
    outcome.wall_seconds = time.perf_counter() - started
    if not outcome.interrupted and (max_jobs is None or not _missing(plan, results)):
        write_tables(plan, out)
    return outcome


def _missing(plan: Plan, results: Mapping[str, Mapping[int, Any]]) -> list[tuple[str, int]]:
    targets = _target_reps(plan, results)
    return [(p.name, r) for p in plan.points for r in range(1, targets[p.name] + 1) if r not in results.get(p.name, {})]


def _store(
    out: Path,
    timings: Path,
    result: dict[str, Any],
    busy: float,
    results: dict[str, dict[int, dict[str, Any]]],
    outcome: RunOutcome,
) -> None:
    point, rep = result["point"], int(result["replication"])
    _write_atomic(_result_path(out, point, rep), json.dumps(result, sort_keys=True, indent=1) + "\n")
    with timings.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"point": point, "replication": rep, "seconds": round(busy, 4)}) + "\n")
    results.setdefault(point, {})[rep] = result
    outcome.ran += 1
    outcome.busy_seconds += busy


def status(out: Path) -> dict[str, Any]:
    """What an experiment folder holds: the plan's points and their finished replications."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        raise ExperimentError(f"{out} is not an experiment folder (no manifest.json)")
    plan = load_experiment(out / "experiment.toml")
    results = stored_results(out)
    targets = _target_reps(plan, results)
    return {
        "name": plan.spec.name,
        "points": [
            {"point": p.name, "finished": len(results.get(p.name, {})), "target": targets[p.name]} for p in plan.points
        ],
        "complete": not _missing(plan, results),
    }


# ------------------------------------------------------------------------------------------- tables


def _rows(plan: Plan, results: Mapping[str, Mapping[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    factor_keys = sorted({k for p in plan.points for k in p.factors})
    for p in plan.points:
        factors = {k: p.factors.get(k) for k in factor_keys}
        for rep, res in sorted(results.get(p.name, {}).items()):
            for metric, value in res["metrics"].items():
                rows.append({"point": p.name, **factors, "replication": rep, "seed": res["seed"], "metric": metric,
                             "box": None, "value": value})  # fmt: skip
            for metric, boxes in res["per_box"].items():
                for box, value in sorted(boxes.items()):
                    rows.append({"point": p.name, **factors, "replication": rep, "seed": res["seed"],
                                 "metric": metric, "box": box, "value": value})  # fmt: skip
    return rows


def summary_rows(plan: Plan, results: Mapping[str, Mapping[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per point and network metric: n, mean, sd, CI."""
    conf = plan.spec.replications.confidence
    out: list[dict[str, Any]] = []
    for p in plan.points:
        reps = [r for _, r in sorted(results.get(p.name, {}).items())]
        for metric in (*plan.spec.metrics.summary, *plan.spec.metrics.impact):
            values = [r["metrics"][metric] for r in reps]
            if values:
                ci = mean_interval(values, conf)
                out.append({"point": p.name, **p.factors, "metric": metric, **_ci_fields(ci)})
    return out


def comparison_rows(
    plan: Plan, results: Mapping[str, Mapping[int, dict[str, Any]]], baseline: str | None = None
) -> list[dict[str, Any]]:
    """Per point (not the baseline) and metric: the paired difference point - baseline with its CI,
    and the unpaired (Welch) interval for comparison."""
    base = plan.point(baseline or plan.baseline).name
    conf = plan.spec.replications.confidence
    base_runs = results.get(base, {})
    out: list[dict[str, Any]] = []
    for p in plan.points:
        if p.name == base:
            continue
        runs = results.get(p.name, {})
        common = sorted(set(runs) & set(base_runs))
        for metric in (*plan.spec.metrics.summary, *plan.spec.metrics.impact):
            x = [runs[r]["metrics"][metric] for r in common]
            y = [base_runs[r]["metrics"][metric] for r in common]
            if len(common) < 2:
                continue
            paired = paired_difference(x, y, conf)
            unpaired = welch_difference(x, y, conf)
            out.append({"point": p.name, "baseline": base, "metric": metric, **_ci_fields(paired),
                        "unpaired_half_width": unpaired.half_width})  # fmt: skip
    return out


def _ci_fields(ci: Interval) -> dict[str, Any]:
    return {"n": ci.n, "mean": ci.mean, "sd": ci.sd, "ci_low": ci.low, "ci_high": ci.high, "half_width": ci.half_width}


def write_tables(plan: Plan, out: Path) -> dict[str, Path]:
    """Write results, summary and comparisons as CSV and Parquet, and the resolved parameters."""
    import pyarrow as pa  # noqa: PLC0415 - only when tables are written
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    results = stored_results(out)
    written: dict[str, Path] = {}
    for name, rows in (
        ("results", _rows(plan, results)),
        ("summary", summary_rows(plan, results)),
        ("comparisons", comparison_rows(plan, results)),
    ):
        cells = [{k: _cell(v) for k, v in row.items()} for row in rows]
        table = pa.Table.from_pylist(cells) if cells else pa.table({"point": pa.array([], pa.string())})
        pq.write_table(table, out / f"{name}.parquet")
        pacsv.write_csv(table, out / f"{name}.csv")
        written[name] = out / f"{name}.csv"
    params = {
        "experiment": plan.spec.model_dump(mode="json"),
        "points": {p.name: {"factors": p.factors, "scenario": p.scenario.model_dump(mode="json")} for p in plan.points},
        "seeds": {str(r): replication_seed(plan.spec.seed, r) for r in range(1, max(_counts(results), default=0) + 1)},
        **provenance(),
    }
    _write_atomic(out / "parameters.json", json.dumps(params, indent=2, sort_keys=True) + "\n")
    return written


def _cell(value: Any) -> Any:
    """A table cell: a factor value that is a list or a table (a carrier's round days) as its JSON."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _counts(results: Mapping[str, Mapping[int, Any]]) -> Iterable[int]:
    return (max(r) for r in results.values() if r)
