"""The results side of what-if experiments (issue 10): plots, the self-contained HTML report, the CLI
that writes it, the factors the built-in studies need (``method.*``, ``layout.*``, and every point on
its own network) and the built-in studies themselves.

Experiments here are small (a few boxes, two weeks, three replications) so the file stays fast; they
run the real model, the real runner and the real report.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from simulator.experiment import (
    EXPERIMENT_DIR,
    ExperimentError,
    Job,
    Plan,
    comparison_rows,
    load_experiment,
    replication_seed,
    run_experiment,
    run_replication,
    stored_results,
)
from simulator.report import write_report

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GRID = """
name = "report-grid"
description = "Locker share x electric vans on 4 boxes"
seed = 11
days = 14
warmup_days = 2
[set]
"network.boxes" = 4
[design]
kind = "grid"
[design.factors]
"demand.locker_share" = [0.15, 0.3]
"method.van_electric_share" = [0.0, 1.0]
[replications]
n = 3
[metrics]
summary = ["parcels.collected", "parcels.turned_away/parcels.arrived"]
impact = ["avoided.kg_co2e_wtw"]
per_box = ["avoided.kg_co2e_wtw"]
"""

LIST = """
name = "report-list"
seed = 12
days = 14
warmup_days = 2
baseline = "base"
[set]
"network.boxes" = 3
[design]
kind = "list"
[[design.points]]
name = "base"
[[design.points]]
name = "share-30"
set = { "demand.locker_share" = 0.30 }
[[design.points]]
name = "half-doors"
set = { "layout.parcel_doors_scale" = 0.5 }
[replications]
n = 3
[metrics]
summary = ["parcels.collected", "waste.kg_deposited"]
impact = ["hazardous_waste.avoided.kg_co2e_wtw"]
"""


def write(tmp: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


class _Page(HTMLParser):
    """The parts of the report the tests look at: attributes, images, sections, table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[tuple[str, dict[str, str]]] = []  # (table class, {data-col: data-value or text})
        self._table: list[str] = []
        self._row: dict[str, str] | None = None
        self._cell: tuple[str, str | None] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table.append(a.get("class") or "")
        elif tag == "tr":
            self._row = {f"@{k.removeprefix('data-')}": v or "" for k, v in a.items() if k.startswith("data-")}
        elif tag == "td" and a.get("data-col"):
            self._cell = (a["data-col"] or "", a.get("data-value"))
            self._text = ""

    def handle_data(self, data: str) -> None:
        self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            col, value = self._cell
            self._row[col] = value if value is not None else self._text
            self._cell = None
        elif tag == "tr" and self._row:
            self.rows.append((self._table[-1] if self._table else "", self._row))
            self._row = None
        elif tag == "table" and self._table:
            self._table.pop()

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def parse(report: Path) -> tuple[str, _Page]:
    text = report.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return text, page


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path, Path]:
    """The 2 x 2 grid (a scenario factor and a method factor) run and reported once."""
    tmp = tmp_path_factory.mktemp("grid")
    plan = load_experiment(write(tmp, GRID))
    run_experiment(plan, tmp / "out", workers=1)
    return plan, tmp / "out", write_report(plan, tmp / "out")


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path, Path]:
    """The list design of three points (one a layout factor), no per-box metric, run and reported once."""
    tmp = tmp_path_factory.mktemp("list")
    plan = load_experiment(write(tmp, LIST))
    run_experiment(plan, tmp / "out", workers=1)
    return plan, tmp / "out", write_report(plan, tmp / "out")


# ------------------------------------------------------------------------------------------ the report


@pytest.mark.parametrize("which", ["grid", "listed"])
def test_report_is_one_html_file_with_every_image_embedded(which: str, request: pytest.FixtureRequest) -> None:
    """report.html is the only page written; no URL, no absolute or relative file reference, no script
    or stylesheet link remains, and every <img> is a data:image/png;base64 URI that decodes to a PNG."""
    _, out, report = request.getfixturevalue(which)
    assert report == out / "report.html"
    assert sorted(p.name for p in out.rglob("*") if p.suffix in {".html", ".css", ".js", ".svg"}) == ["report.html"]
    text, page = parse(report)
    for forbidden in ("http://", "https://", 'src="/', "file:", "<script", "<link", "url(", "@import"):
        assert forbidden not in text, forbidden
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "data", "poster"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:image/png;base64,", "#")), (tag, name, value[:60])
    images = page.attrs("img")
    assert len(images) >= 3 * 3  # three plots per metric, three metrics
    for img in images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.format == "PNG"
            assert decoded.width > 200
            assert decoded.height > 150
        assert img.get("alt")


@pytest.mark.parametrize("which", ["grid", "listed"])
def test_report_has_a_section_per_metric_and_the_tables_of_the_csv_files(
    which: str, request: pytest.FixtureRequest
) -> None:
    """One section per network metric; the comparison tables hold exactly comparisons.csv's rows and
    values (paired mean, CI, half-widths), and the summary tables summary.csv's."""
    plan, out, report = request.getfixturevalue(which)
    _, page = parse(report)
    sections = [a.get("data-metric") for a in page.attrs("section") if a.get("class") == "metric"]
    assert sections == [*plan.spec.metrics.summary, *plan.spec.metrics.impact]
    shown = {(r["@point"], r["@metric"]): r for cls, r in page.rows if cls == "comparisons"}
    expected = csv_rows(out / "comparisons.csv")
    assert len(expected) == (len(plan.points) - 1) * len(sections)
    assert set(shown) == {(r["point"], r["metric"]) for r in expected}
    for row in expected:
        cells = shown[(row["point"], row["metric"])]
        assert cells["@baseline"] == row["baseline"] == plan.baseline
        for col in ("n", "mean", "ci_low", "ci_high", "half_width", "unpaired_half_width"):
            assert float(cells[col]) == float(row[col]), (row["point"], row["metric"], col)
    summary = {(r["@point"], r["@metric"]): r for cls, r in page.rows if cls == "summary"}
    for row in csv_rows(out / "summary.csv"):
        cells = summary[(row["point"], row["metric"])]
        for col in ("n", "mean", "sd", "ci_low", "ci_high", "half_width"):
            assert float(cells[col]) == float(row[col]), (row["point"], row["metric"], col)


def test_map_plot_exists_when_per_box_metrics_are_collected(
    grid: tuple[Plan, Path, Path], listed: tuple[Plan, Path, Path]
) -> None:
    """With a per-box metric the report has its map (plots/map-*.png, embedded in a per-box section);
    without one there is neither."""
    plan, out, report = grid
    maps = sorted((out / "plots").glob("map-*.png"))
    assert [m.name for m in maps] == ["map-avoided-kg-co2e-wtw.png"]
    text, page = parse(report)
    embedded = base64.b64encode(maps[0].read_bytes()).decode()
    assert embedded in text
    assert [
        a.get("data-metric") for a in page.attrs("section") if a.get("class") == "per-box"
    ] == plan.spec.metrics.per_box
    _, out, report = listed
    assert not list((out / "plots").glob("map-*.png"))
    assert 'class="per-box"' not in report.read_text(encoding="utf-8")


def test_every_plot_is_written_as_a_png_and_embedded(grid: tuple[Plan, Path, Path]) -> None:
    """plots/ holds one PNG per image of the page, byte for byte the image the page embeds."""
    _, out, report = grid
    _, page = parse(report)
    embedded = sorted(
        hashlib.sha256(base64.b64decode((a["src"] or "").split(",", 1)[1])).hexdigest() for a in page.attrs("img")
    )
    files = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "plots").glob("*.png"))
    assert files == embedded
    assert all(p.stat().st_size < 150_000 for p in (out / "plots").glob("*.png"))


def test_report_in_headless_chromium_fetches_nothing(grid: tuple[Plan, Path, Path]) -> None:
    """Opened from disk in headless Chromium with every non-file request blocked, the report asks for
    nothing outside itself, shows every image (decoded, non-zero size) and a table per metric; a
    screenshot is saved to test-artifacts/experiment-report.png."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    from playwright.sync_api import Route, sync_playwright

    _, _, report = grid
    url = report.resolve().as_uri()
    attempted: list[str] = []

    def guard(route: Route) -> None:
        if route.request.url == url:
            route.continue_()
        else:
            attempted.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", guard)
            page.goto(url)
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            assert sizes
            assert all(done and width > 200 for done, width in sizes), sizes
            assert page.locator("section.metric table.summary").count() == 3
            assert page.locator("h1").inner_text() == "report-grid"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "experiment-report.png"), full_page=True)
        finally:
            browser.close()
    assert attempted == []
    assert (ARTIFACTS / "experiment-report.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_run_writes_the_report_unless_told_not_to_and_report_html_writes_it(tmp_path: Path) -> None:
    """`molo experiment run` ends with the summary table and the report's path (report.html written);
    with --no-report there is no report; `molo experiment report DIR --html` then writes it and prints
    the table and the path; without --html it prints only the table."""
    path = write(tmp_path, LIST.replace("n = 3", "n = 2").replace("days = 14", "days = 7"))

    def molo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "molo.cli", "experiment", *args], capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip

    done = molo("run", str(path), "--out", str(tmp_path / "a"), "--workers", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"report: {tmp_path / 'a' / 'report.html'}" in done.stdout
    assert "half_width" in done.stdout  # the summary table is still printed
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000
    done = molo("run", str(path), "--out", str(tmp_path / "b"), "--workers", "1", "--no-progress", "--no-report")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "b" / "report.html").exists()
    assert "report:" not in done.stdout
    plain = molo("report", str(tmp_path / "b"))
    assert plain.returncode == 0
    assert "report:" not in plain.stdout
    assert not (tmp_path / "b" / "report.html").exists()
    done = molo("report", str(tmp_path / "b"), "--html")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(plain.stdout.rstrip("\n"))
    assert done.stdout.strip().endswith(f"report: {tmp_path / 'b' / 'report.html'}")
    assert (tmp_path / "b" / "report.html").exists()


# ---------------------------------------------------------------------------- factors the studies need


def test_each_point_runs_on_its_own_number_of_boxes(tmp_path: Path) -> None:
    """A network.boxes factor gives each point its own network: 2 and 5 boxes run, measured and
    reported per box; the boxes both points have keep their ids (and random streams)."""
    text = GRID.replace('"demand.locker_share" = [0.15, 0.3]\n"method.van_electric_share" = [0.0, 1.0]',
                        '"network.boxes" = [2, 5]').replace('"network.boxes" = 4\n', "")  # fmt: skip
    plan = load_experiment(write(tmp_path, text))
    sizes = [len(plan.network_of(p).boxes) for p in plan.points]
    assert sizes == [2, 5]
    small, large = (
        run_replication(Job(p.name, 1, replication_seed(1, 1), p.scenario, plan.network_of(p), 2.0,
                            plan.spec.metrics.model_copy(update={"summary": ["boxes", "parcel_doors"]}), ()))
        for p in plan.points
    )  # fmt: skip
    assert (small["metrics"]["boxes"], large["metrics"]["boxes"]) == (2, 5)
    assert set(small["per_box"]["avoided.kg_co2e_wtw"]) < set(large["per_box"]["avoided.kg_co2e_wtw"])
    assert len(large["per_box"]["avoided.kg_co2e_wtw"]) == 5


def test_method_factors_vary_the_method_per_point_and_leave_the_run_alone(grid: tuple[Plan, Path, Path]) -> None:
    """method.van_electric_share as a factor: points differing only in it have the same scenario and
    the same simulated run (every summary metric equal replication by replication, a paired difference
    of exactly 0), while the method's figure differs, with a paired interval narrower than the unpaired
    one (3 replications: the t quantile of 2 degrees of freedom keeps both wide)."""
    plan, out, _ = grid
    by_name = {p.name: p for p in plan.points}
    diesel, electric = (
        by_name["locker_share=0.15,van_electric_share=0.0"],
        by_name["locker_share=0.15,van_electric_share=1.0"],
    )
    assert diesel.scenario == electric.scenario
    assert (diesel.method, electric.method) == (("van_electric_share=0.0",), ("van_electric_share=1.0",))
    results = stored_results(out)
    for rep in (1, 2, 3):
        assert (
            results[diesel.name][rep]["metrics"]["parcels.collected"]
            == results[electric.name][rep]["metrics"]["parcels.collected"]
        )
        assert results[diesel.name][rep]["seed"] == results[electric.name][rep]["seed"]
    rows = {(r["point"], r["metric"]): r for r in comparison_rows(plan, stored_results(out))}
    same = rows[(electric.name, "parcels.collected")]
    assert (same["mean"], same["half_width"]) == (0.0, 0.0)
    co2 = rows[(electric.name, "avoided.kg_co2e_wtw")]
    assert co2["ci_high"] < 0  # electric vans make the avoided door stops worth less (home delivery)
    assert co2["half_width"] < co2["unpaired_half_width"]


def test_a_factor_with_a_list_value_is_written_to_the_tables(tmp_path: Path) -> None:
    """A list point that sets a carrier's round days (a list) runs, and results.csv and summary.csv carry
    the value as its JSON text (CSV has no list type)."""
    text = LIST.replace('"layout.parcel_doors_scale" = 0.5', '"delivery.carriers.gls.round_days" = [1, 3]')
    text = (
        text.replace("n = 3", "n = 2")
        .replace("days = 14", "days = 7")
        .replace('"network.boxes" = 3', '"network.boxes" = 2')
    )
    plan = load_experiment(write(tmp_path, text))
    run_experiment(plan, tmp_path / "out", workers=1)
    rows = csv_rows(tmp_path / "out" / "results.csv")
    assert {r["delivery.carriers.gls.round_days"] for r in rows if r["point"] == "half-doors"} == {"[1, 3]"}
    assert (tmp_path / "out" / "summary.csv").exists()


@pytest.mark.parametrize(
    ("factor", "expected"),
    [
        (
            '"method.van_electric_share" = [0.0, 2.0]',
            r"method factor 'method.van_electric_share'.*less than or equal to 1",
        ),
        ('"method.baseline.wast" = ["mixed"]', r"method factor 'method.baseline.wast'"),
        ('"layout.doors" = [2]', r"'layout.doors' is not a layout factor \(allowed: layout.parcel_doors_scale"),
        ('"layout.red_box_capacity_kg" = [0, 4]', r"weight limit of every red box.*given 0"),
        ('"layout.red_boxes" = [1.5]', r"red-box doors per box.*given 1.5"),
        ('"layout.parcel_doors_scale" = [9.0]', r"would have \d+ doors with this layout \(1 to 64 allowed\)"),
    ],
)
def test_bad_method_and_layout_factors_get_one_clear_line(tmp_path: Path, factor: str, expected: str) -> None:
    """A method or layout factor the model does not have, or a value out of range, is refused naming
    the file and line and what is allowed."""
    text = GRID.replace('"demand.locker_share" = [0.15, 0.3]\n"method.van_electric_share" = [0.0, 1.0]', factor)
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError, match=expected) as caught:
        load_experiment(path)
    assert str(caught.value).startswith(f"{path}:")
    assert "\n" not in str(caught.value)


def test_layout_factors_change_every_box_and_the_identity(tmp_path: Path) -> None:
    """layout.parcel_doors_scale, layout.red_boxes and layout.red_box_capacity_kg change every box of
    the point's network (rounded half up, at least one door of each size); a point without them keeps
    the identity digest of its scenario alone, so older result folders stay valid."""
    text = GRID.replace(
        '"demand.locker_share" = [0.15, 0.3]\n"method.van_electric_share" = [0.0, 1.0]',
        '"layout.parcel_doors_scale" = [1.0, 0.5]\n"layout.red_boxes" = [2, 3]\n"layout.red_box_capacity_kg" = [6.0]',
    )
    plan = load_experiment(write(tmp_path, text))
    base = load_experiment(write(tmp_path, GRID.replace('"method.van_electric_share" = [0.0, 1.0]', ""), "b.toml"))
    original = base.network_of(base.points[0]).boxes[0].layout
    for point in plan.points:
        layout = plan.network_of(point).boxes[0].layout
        assert len(layout.red_boxes) == point.factors["layout.red_boxes"]
        assert {d.capacity_kg for d in layout.red_boxes} == {6.0}
        for size in ("A", "B", "C"):
            before = sum(1 for d in original.parcel_compartments if d.size_class == size)
            after = sum(1 for d in layout.parcel_compartments if d.size_class == size)
            assert after == max(1, math.floor(before * point.factors["layout.parcel_doors_scale"] + 0.5))
    assert len({p.digest() for p in plan.points}) == 4
    plain = base.points[0]
    assert (
        base.identity()["points"][plain.name]
        == hashlib.sha256(plain.scenario.model_dump_json().encode()).hexdigest()[:16]
    )


# ----------------------------------------------------------------------------------- built-in studies

STUDIES = sorted(p for p in EXPERIMENT_DIR.glob("*.toml") if p.stem != "example")


def test_there_is_a_built_in_study_for_each_question() -> None:
    """The shipped studies cover the number of boxes, van visits, doors, adoption, electric vans, red
    boxes and fallback, and the baseline."""
    assert [p.stem for p in STUDIES] == sorted(
        ["adoption", "baseline", "boxes", "doors", "electric-vans", "red-boxes", "van-visits"]
    )


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_built_in_study_plans_and_its_committed_report_matches(path: Path) -> None:
    """Each study file is a valid experiment whose header says what it took; its committed report in
    docs/studies/<name>/ is self-contained and has every design point of the file, with a
    summary.csv of the same points and metrics."""
    plan = load_experiment(path)
    assert re.search(r"took \d", path.read_text(encoding="utf-8")), "say in the header what the run took"
    folder = ROOT / "docs" / "studies" / path.stem
    summary = csv_rows(folder / "summary.csv")
    assert {r["point"] for r in summary} == {p.name for p in plan.points}
    assert {r["metric"] for r in summary} == {*plan.spec.metrics.summary, *plan.spec.metrics.impact}
    text, page = parse(folder / "report.html")
    assert "http://" not in text
    assert "https://" not in text
    assert all((a["src"] or "").startswith("data:image/png;base64,") for a in page.attrs("img"))
    assert {r["point"] for cls, r in page.rows if cls == "design"} == {p.name for p in plan.points}


def test_docs_studies_stay_small() -> None:
    """Everything under docs/studies together stays under 5 MB."""
    total = sum(p.stat().st_size for p in (ROOT / "docs" / "studies").rglob("*") if p.is_file())
    assert total < 5_000_000, total
