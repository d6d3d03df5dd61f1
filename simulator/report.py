"""Plots and one self-contained HTML report of an experiment's results folder (issue #10).

Where it sits: after the runner (:mod:`simulator.experiment`). It reads the stored replications
through the same functions that write ``summary.csv`` and ``comparisons.csv``, so every figure in the
report is a figure of those tables. ``molo experiment report DIR --html`` calls it, and so does
``molo experiment run`` at its end (unless ``--no-report``).

What it writes: ``OUT/plots/*.png`` (matplotlib's Agg canvas, no pyplot state, palette PNGs at a
modest resolution) and ``OUT/report.html``: one file with its CSS inline and every image a
``data:image/png;base64`` URI, no script, no link outside the page, so it opens offline, can be
mailed and can be committed.

What it shows, per network metric:

- the metric against each factor with its 95% confidence interval: a line with a band over the
  levels of a numeric factor (one line per combination of the other factors of a grid), points with
  error bars for levels that are not numbers, for Latin-hypercube samples and, one per design point,
  for list designs;
- the paired difference of every point against the baseline with its 95% CI, and beside it the
  unpaired (Welch) interval of the same difference: how much the common random numbers gained;
- the distribution over replications: a box plot per point with the replications as dots;
- the tables: mean and CI per point, and the paired differences.

Per per-box metric: a map of the boxes' positions (the points' networks, WGS84) coloured and sized by
the mean over replications of the box's figure, one panel per design point on one colour scale.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from PIL import Image

from network import FJORD_LINE
from simulator.experiment import Plan, comparison_rows, stored_results, summary_rows

__all__ = ["MAX_MAP_PANELS", "write_report"]

#: Resolution of the PNGs: readable on a screen, small enough to commit.
DPI = 80
#: A map shows at most this many design points (the baseline first).
MAX_MAP_PANELS = 12
_BLUE, _GREY, _LIGHT = "#1f5fa8", "#888888", "#9ecae1"
_COLOURS = ("#1f5fa8", "#d9730d", "#2e8b57", "#b03a6f", "#6a51a3", "#8c6d31", "#17becf", "#7f7f7f")

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0 auto;
       max-width: 1180px; padding: 1.5em 2em 4em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 2.2em; border-bottom: 2px solid #1f5fa8; }
h3 { margin-top: 1.6em; } .lede { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left; vertical-align: top; }
th { background: #f3f6fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
.figures figure.wide { flex: 1 1 100%; } .figures figure { flex: 1 1 40%; }
figcaption { color: #555; font-size: .9em; } nav ul { columns: 2; } code { font-size: .92em; }
.note { color: #555; font-size: .9em; }
"""


@dataclass(frozen=True)
class _Image:
    name: str
    png: bytes
    alt: str
    caption: str
    #: Shown across the page's whole width (else two side by side).
    wide: bool = True


# ---------------------------------------------------------------------------------------------- helpers


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "metric"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _fmt(value: Any) -> str:
    """A number as a person reads it: about four significant digits, thousands separated."""
    if value is None:
        return ""
    if not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    digits = 3 - math.floor(math.log10(abs(value)))
    if digits > 6:
        return f"{value:.3g}"
    return f"{value:,.{max(0, digits)}f}"


def _png(fig: Figure) -> bytes:
    """The figure as a small palette PNG."""
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    with Image.open(io.BytesIO(raw.getvalue())) as img:
        small = img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        out = io.BytesIO()
        small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _axes_grid(count: int, width: float, height: float, ncols: int = 3) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(ncols, count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _label(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tick(point: str) -> str:
    """A design point's name as a tick label: a grid point's factors one per line, each value whole."""
    lines = []
    for part in point.split(","):
        key, eq, value = part.partition("=")
        lines.append(f"{_label(key, 16)}={_label(value, 16)}" if eq else _label(part, 24))
    return "\n".join(lines)


def _point_axis(names: Sequence[str]) -> tuple[list[str], float, dict[str, Any]]:
    """Tick labels for one position per design point, the figure width they need (inches), and their
    style: side by side while that fits in 15 inches, else slanted."""
    ticks = [_tick(n) for n in names]
    longest = max((len(line) for t in ticks for line in t.split("\n")), default=1)
    width = len(ticks) * (0.065 * longest + 0.3) + 1.6
    if width <= 15:
        return ticks, max(5.0, width), {"fontsize": 8}
    slanted = {"rotation": 45, "ha": "right", "rotation_mode": "anchor", "fontsize": 7}
    return ticks, max(5.0, min(15.0, 0.35 * len(ticks) + 2)), slanted


# --------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class _Data:
    plan: Plan
    results: Mapping[str, Mapping[int, dict[str, Any]]]
    summary: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]

    @property
    def metrics(self) -> list[str]:
        return [*self.plan.spec.metrics.summary, *self.plan.spec.metrics.impact]

    @property
    def factor_keys(self) -> list[str]:
        keys: list[str] = []
        for p in self.plan.points:
            keys += [k for k in p.factors if k not in keys]
        return keys

    def stat(self, point: str, metric: str) -> dict[str, Any] | None:
        return next((r for r in self.summary if r["point"] == point and r["metric"] == metric), None)

    def values(self, point: str, metric: str) -> list[float]:
        return [r["metrics"][metric] for _, r in sorted(self.results.get(point, {}).items())]


# -------------------------------------------------------------------------------------------- the plots


def _factor_figure(data: _Data, metric: str) -> _Image:
    plan = data.plan
    keys = data.factor_keys if plan.spec.design.kind != "list" else []
    if not keys:
        return _per_point_figure(data, metric)
    fig, axes = _axes_grid(len(keys), 4.6, 3.3)
    for ax, key in zip(axes, keys, strict=True):
        others = [k for k in keys if k != key]
        numeric = all(_is_number(p.factors.get(key)) for p in plan.points)
        series: dict[tuple[Any, ...], list[tuple[Any, dict[str, Any]]]] = {}
        for p in plan.points:
            stat = data.stat(p.name, metric)
            if stat is not None:
                series.setdefault(tuple(p.factors.get(k) for k in others), []).append((p.factors.get(key), stat))
        if plan.spec.design.kind == "lhs" and len(keys) > 1:
            xs = [x for rows in series.values() for x, _ in rows]
            stats = [s for rows in series.values() for _, s in rows]
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[_finite(s["half_width"]) for s in stats], fmt="o",
                        color=_BLUE, ecolor=_LIGHT, capsize=2, markersize=4)  # fmt: skip
        elif numeric:
            for (other, rows), colour in zip(series.items(), itertools.cycle(_COLOURS)):
                rows.sort(key=lambda r: float(r[0]))
                x = np.array([float(v) for v, _ in rows])
                mean = np.array([s["mean"] for _, s in rows])
                low = np.array([_finite(s["ci_low"]) for _, s in rows])
                high = np.array([_finite(s["ci_high"]) for _, s in rows])
                name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, other, strict=True))
                ax.plot(x, mean, "o-", color=colour, markersize=4, label=name or None)
                ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
            if len(series) > 1:
                ax.legend(fontsize=7, frameon=False)
        else:
            levels: list[Any] = []
            for p in plan.points:
                if p.factors.get(key) not in levels:
                    levels.append(p.factors.get(key))
            width = 0.7 / max(1, len(series))
            for j, ((other, rows), colour) in enumerate(zip(series.items(), itertools.cycle(_COLOURS))):
                offset = (j - (len(series) - 1) / 2) * width
                xs_cat = [levels.index(v) + offset for v, _ in rows]
                name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, other, strict=True))
                ax.errorbar(xs_cat, [s["mean"] for _, s in rows], yerr=[_finite(s["half_width"]) for _, s in rows],
                            fmt="o", color=colour, capsize=3, markersize=4, label=name or None)  # fmt: skip
            ax.set_xticks(range(len(levels)), [_label(str(v), 18) for v in levels], rotation=20, fontsize=8)
            if len(series) > 1:
                ax.legend(fontsize=7, frameon=False)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(_label(metric, 40), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric}: mean and 95% CI against each factor", fontsize=10)
    factors = ", ".join(keys)
    return _Image(
        f"{_slug(metric)}-factors",
        _png(fig),
        f"{metric} against {factors}",
        f"Mean over replications and its 95% confidence interval (Student t) against {factors}.",
    )


def _per_point_figure(data: _Data, metric: str) -> _Image:
    points = [p.name for p in data.plan.points if data.stat(p.name, metric) is not None]
    stats = [data.stat(p, metric) or {} for p in points]
    ticks, width, style = _point_axis(points)
    fig = Figure(figsize=(width, 3.4), layout="constrained")
    ax = fig.add_subplot()
    colours = [_GREY if p == data.plan.baseline else _BLUE for p in points]
    ax.bar(range(len(points)), [s["mean"] for s in stats], color=colours, alpha=0.35, width=0.6)
    ax.errorbar(range(len(points)), [s["mean"] for s in stats], yerr=[_finite(s["half_width"]) for s in stats],
                fmt="o", color=_BLUE, ecolor="#222", capsize=4, markersize=4)  # fmt: skip
    ax.set_xticks(range(len(points)), ticks, **style)
    ax.set_ylabel(_label(metric, 40), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{metric}\nmean and 95% CI per design point", fontsize=9)
    return _Image(
        f"{_slug(metric)}-points",
        _png(fig),
        f"{metric} per design point",
        "Mean over replications per design point (bar; the baseline in grey) with its 95% confidence interval.",
    )


def _difference_figure(data: _Data, metric: str) -> _Image | None:
    rows = [r for r in data.comparisons if r["metric"] == metric]
    if not rows:
        return None
    ticks, width, style = _point_axis([r["point"] for r in rows])
    fig = Figure(figsize=(width + 0.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    means = [r["mean"] for r in rows]
    ax.errorbar(x - 0.12, means, yerr=[_finite(r["half_width"]) for r in rows], fmt="o", color=_BLUE, capsize=4,
                markersize=5, label="paired (common random numbers)")  # fmt: skip
    ax.errorbar(x + 0.12, means, yerr=[_finite(r["unpaired_half_width"]) for r in rows], fmt="none",
                ecolor=_GREY, capsize=4, linestyle="--", label="unpaired (Welch), for comparison")  # fmt: skip
    ax.axhline(0.0, color="#444", linewidth=0.8)
    ax.set_xticks(x, ticks, **style)
    ax.set_ylabel(f"Δ {_label(metric, 36)}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{metric}\npaired difference against the baseline, 95% CI", fontsize=9)
    return _Image(
        f"{_slug(metric)}-differences",
        _png(fig),
        f"paired differences of {metric} against {data.plan.baseline}",
        f"Paired difference against the baseline {data.plan.baseline!r} with its 95% CI (solid), and the "
        "unpaired (Welch) interval of the same difference (dashed): the narrower the solid interval, the "
        "more the common random numbers gained.",
        wide=width > 6.5,
    )


def _distribution_figure(data: _Data, metric: str) -> _Image:
    points = [p.name for p in data.plan.points if data.values(p.name, metric)]
    values = [data.values(p, metric) for p in points]
    ticks, width, style = _point_axis(points)
    fig = Figure(figsize=(width, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(values, positions=range(len(points)), widths=0.5, showfliers=False,
               medianprops={"color": _BLUE})  # fmt: skip
    jitter = np.random.default_rng(0)
    for i, vals in enumerate(values):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(vals)), vals, s=12, color="#d9730d", alpha=0.7, zorder=3)
    ax.set_xticks(range(len(points)), ticks, **style)
    ax.set_ylabel(_label(metric, 40), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{metric}\nthe replications", fontsize=9)
    return _Image(
        f"{_slug(metric)}-distribution",
        _png(fig),
        f"distribution of {metric} over replications",
        "Every replication's value (dots) with the quartiles per design point (box; whiskers to 1.5 IQR).",
        wide=width > 6.5,
    )


def _box_means(data: _Data, point: str, metric: str) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for _, run in sorted(data.results.get(point, {}).items()):
        for box, value in run["per_box"].get(metric, {}).items():
            if value is not None and math.isfinite(value):
                per.setdefault(box, []).append(value)
    return {box: statistics.fmean(v) for box, v in per.items()}


def _map_figure(data: _Data, metric: str) -> _Image | None:
    plan = data.plan
    positions = {b.id: (b.lat, b.lon) for net in (plan.network, *plan.networks.values()) for b in net.boxes}
    ordered = sorted(plan.points, key=lambda p: p.name != plan.baseline)
    shown = [(p.name, _box_means(data, p.name, metric)) for p in ordered[:MAX_MAP_PANELS]]
    shown = [(name, means) for name, means in shown if means]
    if not shown:
        return None
    every = [v for _, means in shown for v in means.values()]
    low, high = min(every), max(every)
    norm: Normalize = (
        TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high) if low < 0 < high else Normalize(vmin=low, vmax=high)
    )
    cmap = "RdBu" if low < 0 < high else "viridis"
    biggest = max(abs(low), abs(high)) or 1.0
    lats = [lat for lat, _ in positions.values()]
    lons = [lon for _, lon in positions.values()]
    pad = 0.01
    fig, axes = _axes_grid(len(shown), 4.2, 3.6)
    mappable = None
    for ax, (name, means) in zip(axes, shown, strict=True):
        boxes = sorted(b for b in means if b in positions)
        ys = [positions[b][0] for b in boxes]
        xs = [positions[b][1] for b in boxes]
        vals = [means[b] for b in boxes]
        ax.plot([lon for lon, _ in FJORD_LINE], [lat for _, lat in FJORD_LINE], color="#7fb3d5", linewidth=2,
                zorder=1)  # fmt: skip
        mappable = ax.scatter(xs, ys, c=vals, s=[12 + 110 * abs(v) / biggest for v in vals], cmap=cmap, norm=norm,
                              edgecolors="#333", linewidths=0.4, zorder=2)  # fmt: skip
        ax.set_xlim(min(lons) - pad, max(lons) + pad)
        ax.set_ylim(min(lats) - pad, max(lats) + pad)
        ax.set_aspect(1 / math.cos(math.radians(statistics.fmean(lats))))
        ax.set_title(f"{_label(name, 40)}{' (baseline)' if name == plan.baseline else ''}", fontsize=9)
        ax.tick_params(labelsize=7)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.8, label=_label(metric, 40))
    fig.suptitle(f"{metric} per box, mean over replications", fontsize=10)
    more = len(plan.points) - len(shown)
    return _Image(
        f"map-{_slug(metric)}",
        _png(fig),
        f"map of {metric} per box",
        f"Each box at its position (longitude, latitude; the Limfjord in blue), coloured and sized by the mean "
        f"of its {metric} over the replications; one panel per design point, one colour scale."
        + (f" The first {len(shown)} points are shown ({more} more in results.csv)." if more > 0 else ""),
    )


# --------------------------------------------------------------------------------------------- the page


def _img(image: _Image) -> str:
    src = "data:image/png;base64," + base64.b64encode(image.png).decode("ascii")
    return (
        f'<figure class="{"wide" if image.wide else "plot"}"><img src="{src}" alt="{html.escape(image.alt)}">'
        f"<figcaption>{html.escape(image.caption)}</figcaption></figure>"
    )


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if _is_number(value):
                cells.append(f'<td class="num" data-col="{html.escape(key)}" data-value="{value!r}">{_fmt(value)}</td>')
            else:
                cells.append(f'<td data-col="{html.escape(key)}">{html.escape(_fmt(value))}</td>')
        attrs = "".join(
            f' data-{name}="{html.escape(str(row[name]))}"' for name in ("point", "metric", "baseline") if name in row
        )
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_SUMMARY_COLUMNS = [("point", "point"), ("n", "n"), ("mean", "mean"), ("sd", "sd"), ("ci_low", "95% CI low"),
                    ("ci_high", "95% CI high"), ("half_width", "half-width")]  # fmt: skip
_COMPARISON_COLUMNS = [("point", "point"), ("n", "pairs"),
                       ("mean", "mean difference"), ("ci_low", "95% CI low"), ("ci_high", "95% CI high"),
                       ("half_width", "half-width (paired)"), ("unpaired_half_width", "half-width (unpaired)"),
                       ("crn_gain", "unpaired / paired")]  # fmt: skip


def _settings(data: _Data, out: Path) -> str:
    spec = data.plan.spec
    manifest: dict[str, Any] = {}
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    busy = 0.0
    if (out / "timings.jsonl").exists():
        for line in (out / "timings.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                busy += float(json.loads(line)["seconds"])
    reps = sum(len(r) for r in data.results.values())
    if spec.replications.n is not None:
        wanted = f"{spec.replications.n} per point"
    else:
        targets = ", ".join(f"{k} ≤ {v:g}" for k, v in spec.replications.half_width.items())
        wanted = f"sequential, {spec.replications.min} to {spec.replications.max} per point until {targets}"
    rows = [
        ("design", f"{spec.design.kind}, {len(data.plan.points)} points; baseline {data.plan.baseline}"),
        ("replications", f"{reps} stored ({wanted}); {busy:,.0f} s of model time"),
        ("horizon", f"{spec.days:g} simulated days, of which the first {spec.warmup_days:g} are warm-up"),
        ("master seed", f"{spec.seed} (common random numbers: replication r has one seed at every point)"),
        ("scenario", f"{spec.scenario or 'aalborg'}; for every point: {json.dumps(spec.set) if spec.set else '-'}"),
        ("method", ", ".join(spec.method) or "the default method (docs/methodology.md)"),
        ("project", f"{manifest.get('project_version', '?')}, git {manifest.get('git_revision', '?')[:12]}, "
                    f"Python {manifest.get('python', '?')}"),
    ]  # fmt: skip
    return (
        '<table class="settings"><tbody>'
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )


def _design_table(data: _Data) -> str:
    listed = data.plan.spec.design.kind == "list"
    keys = [] if listed else data.factor_keys
    rows = []
    for p in data.plan.points:
        net = data.plan.network_of(p)
        row: dict[str, Any] = {"point": p.name, **{k: p.factors.get(k) for k in keys}}
        if listed:  # a list point may change any number of parameters: one line each
            row["changes"] = "; ".join(f"{k} = {json.dumps(v)}" for k, v in p.factors.items()) or "none (the base)"
        row["boxes"] = len(net.boxes)
        row["replications"] = len(data.results.get(p.name, {}))
        rows.append(row)
    factors = [("changes", "changes from the base")] if listed else [(k, k) for k in keys]
    columns = [("point", "point"), *factors, ("boxes", "boxes"), ("replications", "replications")]
    return _table(rows, columns, "design")


def write_report(plan: Plan, out: Path) -> Path:
    """Write ``out/plots/*.png`` and the self-contained ``out/report.html``; return the report's path."""
    results = stored_results(out)
    comparisons = [
        {**r, "crn_gain": r["unpaired_half_width"] / r["half_width"] if r["half_width"] > 0 else math.nan}
        for r in comparison_rows(plan, results)
    ]
    data = _Data(plan, results, summary_rows(plan, results), comparisons)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    spec = plan.spec
    sections: list[str] = []
    toc: list[str] = []
    written: list[_Image] = []
    for i, metric in enumerate(data.metrics, 1):
        anchor = f"metric-{i}-{_slug(metric)}"
        toc.append(f'<li><a href="#{anchor}">{html.escape(metric)}</a></li>')
        images = [_factor_figure(data, metric), _difference_figure(data, metric), _distribution_figure(data, metric)]
        shown = [im for im in images if im is not None]
        written += shown
        stats = [r for r in data.summary if r["metric"] == metric]
        diffs = [r for r in data.comparisons if r["metric"] == metric]
        sections.append(
            f'<section class="metric" id="{anchor}" data-metric="{html.escape(metric)}">'
            f"<h2>{html.escape(metric)}</h2>"
            + '<div class="figures">' + "".join(_img(im) for im in shown)
            + "</div>"
            + "<h3>Mean and 95% CI per point</h3>"
            + _table(stats, _SUMMARY_COLUMNS, "summary")
            + f"<h3>Paired differences against {html.escape(plan.baseline)}</h3>"
            + (_table(diffs, _COMPARISON_COLUMNS, "comparisons") if diffs else '<p class="note">none</p>')
            + "</section>"
        )  # fmt: skip
    for metric in spec.metrics.per_box:
        anchor = f"per-box-{_slug(metric)}"
        toc.append(f'<li><a href="#{anchor}">{html.escape(metric)} per box (map)</a></li>')
        image = _map_figure(data, metric)
        if image is not None:
            written.append(image)
        sections.append(
            f'<section class="per-box" id="{anchor}" data-metric="{html.escape(metric)}">'
            f"<h2>{html.escape(metric)} per box</h2>"
            + (_img(image) if image is not None else '<p class="note">no per-box values stored</p>')
            + "</section>"
        )
    for image in written:
        (plots / f"{image.name}.png").write_bytes(image.png)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(spec.name)}: experiment report</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(spec.name)}</h1>"
        f'<p class="lede">{html.escape(spec.description or "What-if experiment")}</p>'
        + _settings(data, out)
        + "<nav><h2>Contents</h2><ul>" + "".join(toc) + "</ul></nav>"
        + "<h2>Design points</h2>" + _design_table(data)
        + "".join(sections)
        + '<h2>How to read this</h2><p class="note">Every interval is a 95% Student-t confidence interval over '
        "independent replications. Replication r of every design point uses the same random streams (common "
        "random numbers), so the differences against the baseline are paired; the unpaired (Welch) half-width "
        "beside each is what independent runs would have given. The tables hold the values of summary.csv and "
        "comparisons.csv in this folder; results.csv has every replication (and every box). Method: "
        "docs/methodology.md; experiments: docs/experiments.md.</p>"
        + "</body></html>\n"
    )  # fmt: skip
    report = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(report)
    return report
