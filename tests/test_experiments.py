"""What-if experiments (issue 10): design, seeds, replications, statistics, storage, executors, CLI.

Experiments here are small (a few boxes, a few weeks) so the suite stays fast; the statistical
checks (coverage of the confidence intervals, the gain from common random numbers) still use the
real model and the real runner, and could fail.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from scipy.stats import qmc  # noqa: F401  (the design code imports it lazily; fail here if missing)

from network import Box, FjordSide, Network, build_layout
from simulator.executors import dask_executor, ray_executor
from simulator.experiment import (
    ExperimentError,
    Job,
    Plan,
    comparison_rows,
    load_experiment,
    replication_seed,
    run_experiment,
    run_replication,
    stored_results,
    summary_rows,
)
from simulator.params import Scenario, resolve
from simulator.run import EVENT_KINDS
from simulator.stats import batch_means, mean_interval, paired_difference, welch_difference
from tests.test_sim_validation import VALIDATION, erlang_b

ROOT = Path(__file__).resolve().parent.parent

SMALL = """
name = "small"
seed = 7
days = 21
warmup_days = 3
baseline = "base"
[set]
"network.boxes" = 4
[design]
kind = "list"
[[design.points]]
name = "base"
[[design.points]]
name = "share-30"
set = {{ "demand.locker_share" = 0.30 }}
[replications]
n = {n}
[metrics]
summary = ["parcels.collected", "parcels.turned_away/parcels.arrived"]
impact = ["avoided.kg_co2e_wtw"]
per_box = ["avoided.kg_co2e_wtw"]
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "runs").glob("*/*.json"))}


# ------------------------------------------------------------------------------- seeds and designs


def test_replication_seeds_are_shared_by_points_and_differ_between_replications(tmp_path: Path) -> None:
    """Replication r has one seed at every point (common random numbers); seeds differ across r and
    across master seeds."""
    seeds = [replication_seed(7, r) for r in range(1, 201)]
    assert len(set(seeds)) == 200
    assert replication_seed(7, 3) == replication_seed(7, 3)
    assert replication_seed(8, 3) != replication_seed(7, 3)
    plan = load_experiment(write(tmp_path, SMALL.format(n=2)))
    assert [p.name for p in plan.points] == ["base", "share-30"]


def test_grid_is_every_combination_and_lhs_one_point_per_stratum(tmp_path: Path) -> None:
    """A grid of 3 x 2 levels gives 6 points; a Latin hypercube of 8 samples puts exactly one point in
    each eighth of every range, integers where both bounds are integers."""
    grid = (
        SMALL.format(n=2)
        .replace(
            '[design]\nkind = "list"\n[[design.points]]\nname = "base"\n[[design.points]]\nname = "share-30"\n'
            'set = { "demand.locker_share" = 0.30 }\n',
            '[design]\nkind = "grid"\n[design.factors]\n"demand.locker_share" = [0.1, 0.2, 0.3]\n'
            '"waste.ready_share" = [0.5, 0.8]\n',
        )
        .replace('baseline = "base"\n', "")
    )
    plan = load_experiment(write(tmp_path, grid))
    assert len(plan.points) == 6
    assert {(p.factors["demand.locker_share"], p.factors["waste.ready_share"]) for p in plan.points} == {
        (a, b) for a in (0.1, 0.2, 0.3) for b in (0.5, 0.8)
    }
    assert plan.points[0].scenario.demand.locker_share == 0.1
    lhs = grid.replace(
        '[design]\nkind = "grid"\n[design.factors]\n"demand.locker_share" = [0.1, 0.2, 0.3]\n'
        '"waste.ready_share" = [0.5, 0.8]\n',
        '[design]\nkind = "lhs"\nsamples = 8\n[design.ranges]\n"demand.locker_share" = [0.1, 0.5]\n'
        '"network.boxes" = [2, 10]\n',
    )
    plan = load_experiment(write(tmp_path, lhs, "lhs.toml"))
    shares = sorted(p.factors["demand.locker_share"] for p in plan.points)
    assert [math.floor((s - 0.1) / 0.05) for s in shares] == list(range(8))
    assert all(
        isinstance(p.factors["network.boxes"], int) and 2 <= p.factors["network.boxes"] <= 10 for p in plan.points
    )


def test_a_factor_may_change_one_carriers_field(tmp_path: Path) -> None:
    """`delivery.carriers.gls.van_capacity` as a factor changes that field only: the other carriers and
    gls's share stay as the scenario has them."""
    text = SMALL.format(n=2).replace('"demand.locker_share" = 0.30', '"delivery.carriers.gls.van_capacity" = 150')
    plan = load_experiment(write(tmp_path, text))
    base, other = (p.scenario.delivery.carriers for p in plan.points)
    assert other["gls"].van_capacity == 150
    assert other["gls"].share == base["gls"].share
    assert sorted(other) == sorted(base)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('"demand.locker_share" = 0.30', '"demand.lockr_share" = 0.30'), "did you mean 'demand.locker_share'"),
        (('"demand.locker_share" = 0.30', '"demand.locker_share" = 1.7'), "less than or equal to 1"),
        (('"demand.locker_share" = 0.30', '"delivery.carriers.gls.share" = 0.9'), "carrier shares must sum to 1"),
        (("[replications]\nn = 2", "[replications]\nn = 2\nrepeats = 3"), "unknown setting 'replications.repeats'"),
        (('baseline = "base"', 'baseline = "nope"'), "baseline 'nope' is not a design point"),
        (('"network.boxes" = 4', '"network.boxes" = -1'), "network.boxes"),
        (('summary = ["parcels.collected"', 'summary = ["parcels.colected"'), "did you mean 'parcels.collected'"),
        (("parcels.turned_away/parcels.arrived", "parcels.turned_away/parcels.arived"), "'parcels.arived'"),
        (('impact = ["avoided.kg_co2e_wtw"]', 'impact = ["avoided.co2"]'), "'avoided.co2' is not one of the"),
        (('per_box = ["avoided.kg_co2e_wtw"]', 'per_box = ["parcel_delivery.avoided.trips"]'), "per_box names"),
    ],
)
def test_bad_experiment_files_get_one_clear_line(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    """Each mistake is refused with one line naming file:line and what is allowed: exit code 2 from
    the CLI, no traceback."""
    text = SMALL.format(n=2).replace(*change)
    assert text != SMALL.format(n=2)
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_experiment(path)
    done = subprocess.run(
        [sys.executable, "-m", "molo.cli", "experiment", "run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"molo experiment: {path}"), done.stderr


def test_event_counts_are_metrics_and_an_event_that_never_happened_counts_zero(tmp_path: Path) -> None:
    """``events.<kind>`` reads the summary's events table (kinds hold dots themselves); a kind the run
    never recorded is 0, not an error; every kind a run records is one the planner accepts."""
    text = SMALL.format(n=1).replace(
        'summary = ["parcels.collected", "parcels.turned_away/parcels.arrived"]',
        'summary = ["events.parcel.collected", "events.waste.refused", "parcels.collected"]',
    )
    plan = load_experiment(write(tmp_path, text))
    out = tmp_path / "out"
    run_experiment(plan, out, workers=1)
    result = json.loads(next((out / "runs").glob("base/*.json")).read_text())
    metrics = result["metrics"]
    assert metrics["events.parcel.collected"] == metrics["parcels.collected"] > 0
    assert metrics["events.waste.refused"] == 0.0  # 4 boxes, 18 counted days: no red box fills up
    recorded = json.loads((ROOT / "tests" / "golden" / "aalborg_14d.json").read_text())["events"]
    assert set(recorded) <= set(EVENT_KINDS)


def test_the_headline_and_trips_by_mode_are_metrics(tmp_path: Path) -> None:
    """An experiment collects the method's headline and any mode's figures: the headline is the
    whole number of the motorised trips avoided, which are the vans', trucks' and cars' together;
    walking and cycling count apart, and a mode nobody used (no red box went by truck) is 0."""
    names = ["headline.motorised_trips_avoided", "avoided.trips", "modes.van.avoided.trips",
             "modes.car.avoided.trips", "modes.truck.avoided.trips", "modes.walk_cycle.project.trips"]  # fmt: skip
    text = SMALL.format(n=1).replace('impact = ["avoided.kg_co2e_wtw"]', f"impact = {json.dumps(names)}")
    out = tmp_path / "out"
    run_experiment(load_experiment(write(tmp_path, text)), out, workers=1)
    m = json.loads(next((out / "runs").glob("base/*.json")).read_text())["metrics"]
    assert m["headline.motorised_trips_avoided"] == round(m["avoided.trips"])
    parts = m["modes.van.avoided.trips"] + m["modes.car.avoided.trips"] + m["modes.truck.avoided.trips"]
    assert m["avoided.trips"] == pytest.approx(parts, abs=1e-5)
    assert m["modes.walk_cycle.project.trips"] > 0
    assert m["modes.truck.avoided.trips"] == 0.0


def test_missing_experiment_file_is_one_line(tmp_path: Path) -> None:
    """A file that does not exist: exit 2 and one line, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "molo.cli", "experiment", "run", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "cannot read the experiment file" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------ statistics


def test_intervals_use_student_t() -> None:
    """mean_interval is mean +- t(0.975, n-1) s / sqrt(n); paired and Welch intervals of known data."""
    ci = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert ci.mean == 2.5
    assert ci.half_width == pytest.approx(3.182446305 * 1.290994449 / 2, rel=1e-9)
    paired = paired_difference([2.0, 3.0, 5.0], [1.0, 2.0, 3.0])
    assert paired.mean == pytest.approx(4 / 3)
    welch = welch_difference([2.0, 3.0, 5.0], [1.0, 2.0, 3.0])
    assert welch.half_width > paired.half_width
    assert math.isinf(mean_interval([5.0]).half_width)


def test_batch_means_drop_the_warmup_and_cover_the_mean() -> None:
    """Batch means of a series with a transient: the warm-up is dropped, the interval covers the
    stationary mean, and the batches are reported."""
    import random

    rng = random.Random(3)
    series = [100.0 - 90.0 * math.exp(-i / 200) + rng.gauss(0, 5) for i in range(6000)]
    result = batch_means(series, batches=20, warmup=1500)
    assert (result.batches, result.batch_size, result.dropped) == (20, 225, 1500)
    assert result.interval.covers(100.0)
    assert abs(result.lag1) < 0.5
    unwarmed = batch_means(series, batches=20)
    assert unwarmed.interval.mean < 98.5  # the transient (about -3 on average) biases a run that keeps its start
    assert result.interval.mean - unwarmed.interval.mean > 2.0


# ------------------------------------------------------------------- runs, storage, resume, executors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    """The small experiment run once in this process, as the reference."""
    tmp = tmp_path_factory.mktemp("reference")
    plan = load_experiment(write(tmp, SMALL.format(n=3)))
    outcome = run_experiment(plan, tmp / "out", workers=1)
    assert outcome.ran == 6
    return plan, tmp / "out"


def test_results_are_stored_as_tidy_tables(uninterrupted: tuple[Plan, Path]) -> None:
    """results.csv/.parquet hold one row per point, replication, metric (and box for per-box metrics),
    with the factor values; the summary and the comparisons are written too, and the parameters."""
    import pyarrow.parquet as pq

    _, out = uninterrupted
    table = pq.read_table(out / "results.parquet").to_pylist()
    network = [r for r in table if r["box"] is None]
    assert len(network) == 2 * 3 * 3
    boxes = {r["box"] for r in table if r["box"] is not None}
    assert len(boxes) == 4
    assert {r["demand.locker_share"] for r in table} == {None, 0.3}
    assert (out / "results.csv").read_text().splitlines()[0].startswith('"point"')
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert {(r["point"], r["metric"]) for r in summary} == {
        (p, m)
        for p in ("base", "share-30")
        for m in ("parcels.collected", "parcels.turned_away/parcels.arrived", "avoided.kg_co2e_wtw")
    }
    params = json.loads((out / "parameters.json").read_text())
    assert params["points"]["share-30"]["scenario"]["demand"]["locker_share"] == 0.3
    assert params["seeds"]["1"] == replication_seed(7, 1)
    assert len(params["git_revision"]) in (7, 40) or params["git_revision"] == "unknown"


def test_process_pool_gives_byte_identical_results(uninterrupted: tuple[Plan, Path], tmp_path: Path) -> None:
    """The same experiment on a pool of 2 processes stores byte-identical replication files."""
    plan, reference = uninterrupted
    with ProcessPoolExecutor(2) as pool:
        run_experiment(plan, tmp_path / "pool", executor=pool)
    assert run_files(tmp_path / "pool") == run_files(reference)


def test_dask_local_cluster_gives_byte_identical_results(uninterrupted: tuple[Plan, Path], tmp_path: Path) -> None:
    """On a 2-worker Dask LocalCluster (distributed's own executor) the files are byte-identical."""
    plan, reference = uninterrupted
    with dask_executor(2) as executor:
        run_experiment(plan, tmp_path / "dask", executor=executor)
    assert run_files(tmp_path / "dask") == run_files(reference)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_ray_gives_byte_identical_results(uninterrupted: tuple[Plan, Path], tmp_path: Path) -> None:
    """On a local 2-CPU Ray instance the files are byte-identical."""
    plan, reference = uninterrupted
    with ray_executor(2) as executor:
        run_experiment(plan, tmp_path / "ray", executor=executor)
    assert run_files(tmp_path / "ray") == run_files(reference)


def test_resumed_run_runs_only_what_is_missing(uninterrupted: tuple[Plan, Path], tmp_path: Path) -> None:
    """Stopped after 2 replications, the same file into the same folder runs the other 4 and ends with
    exactly the files of the uninterrupted run."""
    plan, reference = uninterrupted
    first = run_experiment(plan, tmp_path / "resumed", workers=1, max_jobs=2)
    assert first.ran == 2
    assert not (tmp_path / "resumed" / "summary.csv").exists()
    second = run_experiment(plan, tmp_path / "resumed", workers=1)
    assert (second.ran, second.reused) == (4, 2)
    assert run_files(tmp_path / "resumed") == run_files(reference)


def test_a_changed_file_is_refused_for_an_old_folder(uninterrupted: tuple[Plan, Path], tmp_path: Path) -> None:
    """Rerunning into a folder whose results came from a different seed or metric set is refused;
    more replications of the same experiment are fine."""
    _, original = uninterrupted
    reference = tmp_path / "copy"
    shutil.copytree(original, reference)  # the module's reference run stays as it is
    text = (reference / "experiment.toml").read_text()
    with pytest.raises(ExperimentError, match=r"different experiment.*seed"):
        run_experiment(load_experiment(write(tmp_path, text.replace("seed = 7", "seed = 8"))), reference)
    more = load_experiment(write(tmp_path, text.replace("n = 3", "n = 4"), "more.toml"))
    outcome = run_experiment(more, reference, workers=1)
    assert (outcome.ran, outcome.reused) == (2, 6)


def test_ctrl_c_keeps_finished_replications_and_a_rerun_completes(tmp_path: Path) -> None:
    """SIGINT to `molo experiment run` stops it within seconds (exit 130) with the finished replications
    kept; running it again finishes the rest, and the files equal an uninterrupted run's."""
    path = write(tmp_path, SMALL.format(n=8).replace("days = 21", "days = 40"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "molo.cli", "experiment", "run", str(path), "--out", str(out), "--workers", "2",
               "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((out / "runs").glob("*/*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - stopped < 15
    assert proc.returncode == 130, err
    kept = len(stored_results(out).get("base", {})) + len(stored_results(out).get("share-30", {}))
    assert 2 <= kept < 16
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{16 - kept} replications run, {kept} reused" in done.stdout
    reference = tmp_path / "reference"
    run_experiment(load_experiment(path), reference, workers=2)
    assert run_files(out) == run_files(reference)


def test_sequential_replications_stop_once_the_interval_is_narrow(tmp_path: Path) -> None:
    """With a half-width target, each point gets replications until its 95% CI is at most the target
    (or the maximum is reached), and no more."""
    text = SMALL.format(n=2).replace(
        "[replications]\nn = 2", '[replications]\nmin = 3\nmax = 12\nhalf_width = { "parcels.collected" = 40.0 }'
    )
    plan = load_experiment(write(tmp_path, text))
    run_experiment(plan, tmp_path / "seq", workers=2)
    results = stored_results(tmp_path / "seq")
    for point, runs in results.items():
        values = [r["metrics"]["parcels.collected"] for _, r in sorted(runs.items())]
        ci = mean_interval(values)
        assert ci.half_width <= 40.0 or len(values) == 12, (point, len(values), ci)
        if len(values) > 3:  # one fewer would not have been enough
            assert mean_interval(values[:-1]).half_width > 40.0, (point, len(values))


def test_common_random_numbers_narrow_the_paired_interval(uninterrupted: tuple[Plan, Path]) -> None:
    """For a real factor (locker share 15% vs 30%), the paired interval of the difference in avoided CO2
    is narrower than the unpaired one: the replications are positively correlated."""
    plan, out = uninterrupted
    rows = {r["metric"]: r for r in comparison_rows(plan, stored_results(out))}
    co2 = rows["avoided.kg_co2e_wtw"]
    assert co2["n"] == 3
    assert co2["half_width"] < co2["unpaired_half_width"] / 2, co2


# ----------------------------------------------------------------------------------- coverage


def _loss_plan(c: int, lam_per_h: float, mean_dwell_h: float, days: float, warmup: float) -> tuple[Scenario, Network]:
    box = Box(id="val-001", name="Validation", area="Test", side=FjordSide.SOUTH, lat=57.04, lon=9.95, households=1,
              layout=build_layout(c, 0, 0))  # fmt: skip
    scenario = resolve(
        VALIDATION,
        [
            f"simulation.days={days!r}",
            f"demand.parcels_per_household_year={lam_per_h * 24 * 365!r}",
            f"pickup.dwell_h.mean={mean_dwell_h!r}",
        ],
    )
    return scenario, Network(boxes=[box], depots={}, recycling_stations=[])


def _coverage_experiment(master: int) -> tuple[float, float]:
    """One experiment of 10 replications of an M/M/4/4 box (a = 2): the CI's bounds of the share
    turned away."""
    from simulator.experiment import Metrics

    scenario, network = _loss_plan(4, 2.0, 1.0, days=15.0, warmup=1.0)
    metrics = Metrics(summary=["parcels.turned_away/parcels.arrived"])
    values = [
        run_replication(Job("mmcc", r, replication_seed(master, r), scenario, network, 1.0, metrics, ()))["metrics"][
            "parcels.turned_away/parcels.arrived"
        ]
        for r in range(1, 11)
    ]
    ci = mean_interval(values)
    return ci.low, ci.high


def test_confidence_intervals_cover_erlang_b_95_percent_of_the_time() -> None:
    """Over 400 independent experiments (10 replications each of an M/M/4/4 loss system in the model's
    validation mode), the nominal 95% CI of the share turned away covers Erlang B(4, 2) in 95% +- 3%
    of them."""
    truth = erlang_b(4, 2.0)
    with ProcessPoolExecutor(2) as pool:
        bounds = list(pool.map(_coverage_experiment, range(1, 401), chunksize=10))
    covered = sum(1 for low, high in bounds if low <= truth <= high)
    assert 0.92 * 400 <= covered <= 0.98 * 400, covered
    widths = sorted(high - low for low, high in bounds)
    assert widths[200] < 0.05  # informative intervals (B is about 0.095), so covering is not trivial


def test_the_runner_reports_every_point_and_metric(uninterrupted: tuple[Plan, Path]) -> None:
    """summary_rows gives n, mean and a finite CI for every point and network metric."""
    plan, out = uninterrupted
    rows = summary_rows(plan, stored_results(out))
    assert len(rows) == 2 * 3
    assert all(r["n"] == 3 and math.isfinite(r["half_width"]) for r in rows)


@pytest.fixture(autouse=True)
def _no_stray_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "ray" in request.node.name:
        import ray

        assert not ray.is_initialized()


def test_example_file_plans(tmp_path: Path) -> None:
    """The commented example in simulator/experiments/ is a valid experiment."""
    plan = load_experiment(ROOT / "simulator" / "experiments" / "example.toml")
    assert [p.name for p in plan.points] == ["base", "share-25"]
    assert plan.baseline == "base"
