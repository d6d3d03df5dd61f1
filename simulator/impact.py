"""Avoided trips and CO2 of a simulated run, by the project's one method (``accounting``).

Where it sits: beside the batch runner. :func:`run_impact` runs the hub scenario and applies the method
to its box events, exactly as the backend applies it to ingested events (the headline figures).
With common random numbers it also runs the same scenario and seed with vans that take no red boxes
(the waste company collects every one), so the dedicated-round baseline the method estimates from the
hub run can be checked against a simulated one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from accounting import ActivityCounter, Method, apply_overrides, assess, summarize
from accounting.assumptions import WASTE_BASELINES
from accounting.method import METRICS
from contract.messages import PAYLOAD_BY_TYPE
from network import Network, geography_of
from simulator.params import Scenario
from simulator.run import Progress, network_for, run_batch
from simulator.trace import Record, to_ms

#: The chained share of recycling-station trips that :func:`sensitivity` shows beside the method's own
#: (half the trips made on the way to somewhere else; an assumption).
CHAINED_SHARE = 0.5


def method_for(scenario: Scenario, overrides: list[str] | None = None) -> Method:
    """The headline method with the scenario's road factor and waste operator (so it measures
    distances as the simulated vans drive them), then ``overrides`` (``key.path=value``), which win.
    For the default scenario this is the backend's default method."""
    base = Method()
    base = base.model_copy(
        update={
            "road_factor": scenario.network.road_factor,
            "waste": base.waste.model_copy(update={"operator": scenario.waste.dedicated_operator}),
        }
    )
    return apply_overrides(base, overrides or [])


@dataclass
class ImpactSink:
    """Counts box events for the method (as ``activity_daily`` does in the database) and sums the
    simulated van km (which the method does not see; for comparison only)."""

    start: datetime
    counter: ActivityCounter = field(default_factory=ActivityCounter)
    van_km: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._start_ms = to_ms(self.start, 0.0)  # to_ms(start, t) is this plus round(t * 1000)

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        if box_id is not None and kind in PAYLOAD_BY_TYPE:
            self.counter.add(self._start_ms + round(t * 1000), box_id, kind, data)
        elif kind == "van.trip":
            key = "dedicated_waste" if data["trip"] == "dedicated_waste" else "rounds"
            self.van_km[key] = self.van_km.get(key, 0.0) + float(data["km"])


def _sink_of(
    scenario: Scenario, network: Network, records: Iterable[Record] | None, progress: Progress | None = None
) -> ImpactSink:
    """The method's counts of ``records`` (a saved run), or of a new run of ``scenario``."""
    sink = ImpactSink(scenario.simulation.start)
    if records is None:
        run_batch(scenario, sink, network=network, progress=progress)
    else:
        for t, box_id, kind, data in records:
            sink.record(t, box_id, kind, data)
    return sink


def _no_van_collection(scenario: Scenario) -> Scenario:
    carriers = {n: c.model_copy(update={"hazardous_limit_kg": 0.0}) for n, c in scenario.delivery.carriers.items()}
    return scenario.model_copy(update={"delivery": scenario.delivery.model_copy(update={"carriers": carriers})})


def _waste_by_box(no_vans: dict[str, Any], hub: dict[str, Any]) -> list[dict[str, Any]]:
    """Per box: hazardous-waste project figures without and with the vans, and the difference."""

    def waste(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {g["key"]["box"]: g["project"] for g in summary["groups"] if g["key"]["category"] == "hazardous_waste"}

    a, b = waste(no_vans), waste(hub)
    zero = dict.fromkeys(METRICS, 0.0)
    return [
        {"box": box, "no_van_collection": a.get(box, zero), "hub": b.get(box, zero),
         "avoided": {k: round(a.get(box, zero)[k] - b.get(box, zero)[k], 6) for k in METRICS}}
        for box in sorted(set(a) | set(b))
    ]  # fmt: skip


def _waste(summary: dict[str, Any]) -> dict[str, float]:
    project: dict[str, float] = summary["categories"]["hazardous_waste"]["project"]
    return project


def run_impact(
    scenario: Scenario,
    method: Method | None = None,
    *,
    network: Network | None = None,
    group_by: tuple[str, ...] = ("box",),
    counterfactual: bool = True,
    records: Iterable[Record] | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> dict[str, Any]:
    """The method's results for ``scenario`` (network totals and ``group_by`` groups), plus, with
    ``counterfactual``, the simulated no-van-collection run of the same seed.

    ``records``: the trace of a run of ``scenario`` already made (:func:`simulator.trace.read_trace`);
    the method is applied to it and nothing is simulated (the counterfactual then needs a run of its own).
    ``progress``: gives the progress callback of each simulation by its name ("scenario",
    "counterfactual").
    """
    if records is not None and counterfactual:
        raise ValueError("the counterfactual needs a simulated run of its own: not with a saved run's records")
    net = network or network_for(scenario)
    geo = geography_of(net)
    m = method or method_for(scenario)
    hub = _sink_of(scenario, net, records, progress("scenario") if progress else None)
    rows = hub.counter.rows()
    result = summarize(assess(rows, geo, m), group_by)
    result["scenario"] = {"name": scenario.name, "seed": scenario.simulation.seed, "days": scenario.simulation.days}
    result["simulated_van_km"] = {k: round(v, 3) for k, v in sorted(hub.van_km.items())}
    if counterfactual:
        other = ImpactSink(scenario.simulation.start)
        run_batch(
            _no_van_collection(scenario), other, network=net, progress=progress("counterfactual") if progress else None
        )
        dedicated = m.model_copy(update={"baseline": m.baseline.model_copy(update={"waste": "dedicated_round"})})
        estimate = summarize(assess(rows, geo, dedicated))["categories"]["hazardous_waste"]["baseline"]
        other_summary = summarize(assess(other.counter.rows(), geo, m), ("box", "category"))
        simulated = _waste(other_summary)
        hub_waste = _waste(result)
        hub_boxes = summarize(assess(rows, geo, m), ("box", "category"))
        result["simulated_counterfactual"] = {
            "what": "the same scenario and seed (common random numbers) with vans taking no red boxes: the "
            "waste company collects every one; hazardous-waste project figures of both runs",
            "no_van_collection": simulated,
            "hub": hub_waste,
            "avoided": {k: round(simulated[k] - hub_waste[k], 6) for k in METRICS},
            "method_estimate_of_dedicated_round": estimate,
            "by_box": _waste_by_box(other_summary, hub_boxes),
            "simulated_van_km": {k: round(v, 3) for k, v in sorted(other.van_km.items())},
        }
    return result


def sensitivity(
    scenario: Scenario,
    method: Method | None = None,
    *,
    electric_shares: tuple[float, ...] = (0.0, 0.5, 1.0),
    network: Network | None = None,
    records: Iterable[Record] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Avoided trips and kg CO2e of ``scenario`` for every waste and parcel baseline and electric share
    of the van fleet (allocation by load x distance), and for hazardous waste under both allocations:
    one simulated run (or ``records`` of a saved one), the method applied to it again for each choice."""
    net = network or network_for(scenario)
    geo = geography_of(net)
    rows = _sink_of(scenario, net, records, progress).counter.rows()
    base = method or method_for(scenario)
    chain = base.residents.recycling_chained_share
    choices = [(w, p, "load_distance", chain) for w in WASTE_BASELINES for p in ("home_delivery", "parcel_shop")]
    choices.append(("resident_trips", "home_delivery", "marginal", chain))
    if chain != CHAINED_SHARE:
        choices.append(("resident_trips", "home_delivery", "load_distance", CHAINED_SHARE))
    out: list[dict[str, Any]] = []
    for waste, parcels, allocation, chained in choices:
        for share in electric_shares:
            m = base.model_copy(
                update={
                    "allocation": allocation,
                    "van_electric_share": share,
                    "baseline": base.baseline.model_copy(update={"waste": waste, "parcels": parcels}),
                    "residents": base.residents.model_copy(update={"recycling_chained_share": chained}),
                }
            )
            s = summarize(assess(rows, geo, m))
            out.append(
                {
                    "waste_baseline": waste,
                    "parcel_baseline": parcels,
                    "allocation": allocation,
                    "recycling_chained_share": chained,
                    "van_electric_share": share,
                    "headline": s["headline"],
                    "avoided": s["totals"]["avoided"],
                    "categories": {c: v["avoided"] for c, v in s["categories"].items()},
                }
            )
    return out


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}"


def _headline_text(h: dict[str, Any]) -> str:
    trips = h["motorised_trips_avoided"]
    more = f" (that is {-trips:,} more than without the boxes)" if trips < 0 else ""
    return (
        f"Motorised vehicle trips avoided: {trips:,}{more}; vehicle-km avoided {_fmt(h['vkm_avoided'])}; "
        f"kg CO2e avoided {_fmt(h['kg_co2e_wtw_avoided'])}"
    )


def _modes_text(modes: dict[str, Any]) -> list[str]:
    """Trips by actor and mode: baseline, with the boxes, avoided (km are person-km on foot or bike)."""
    out = [
        f"{'by actor and mode':<30} {'baseline trips':>14} {'project trips':>14} {'avoided trips':>14} "
        f"{'avoided stops':>14} {'avoided km':>12}"
    ]
    names = {"van": "carriers' vans", "truck": "waste company's trucks", "car": "residents by car",
             "walk_cycle": "residents on foot/bike/bus"}  # fmt: skip
    for mode, cell in modes.items():
        b, p, a = cell["baseline"], cell["project"], cell["avoided"]
        stops = _fmt(a["stops"]) if mode in ("van", "truck") else "-"
        out.append(
            f"{names.get(mode, mode):<30} {_fmt(b['trips']):>14} {_fmt(p['trips']):>14} {_fmt(a['trips']):>14} "
            f"{stops:>14} {_fmt(a['vkm']):>12}"
        )
    return out


def report_text(result: dict[str, Any]) -> str:
    """A short human-readable report of :func:`run_impact`'s result (the JSON has everything)."""
    m, s = result["method"], result["scenario"]
    lines = [
        f"Avoided trips and CO2: scenario {s['name']}, seed {s['seed']}, {s['days']:g} days",
        f"method {m['name']}: allocation {m['allocation']}, waste baseline {m['waste_baseline']}, "
        f"parcel baseline {m['parcel_baseline']}, electric van share {m['van_electric_share']:g}; "
        "kg CO2e well-to-wheel (tank-to-wheel in brackets)",
        "",
        _headline_text(result["headline"]),
        "",
        f"{'category':<17} {'baseline kg':>12} {'project kg':>12} {'avoided kg':>18} {'avoided trips':>14} "
        f"{'avoided vkm':>12}",
    ]
    rows = [*result["categories"].items(), ("total", result["totals"])]
    for name, cell in rows:
        b, p, a = cell["baseline"], cell["project"], cell["avoided"]
        lines.append(
            f"{name:<17} {_fmt(b['kg_co2e_wtw']):>12} {_fmt(p['kg_co2e_wtw']):>12} "
            f"{_fmt(a['kg_co2e_wtw']):>9} ({_fmt(a['kg_co2e_ttw']):>6}) {_fmt(a['trips']):>14} {_fmt(a['vkm']):>12}"
        )
    lines += ["", *_modes_text(result["modes"])]
    cf = result.get("simulated_counterfactual")
    if cf:
        lines += [
            "",
            "Common-random-numbers check (hazardous waste, kg CO2e WTW): vans take no red boxes -> "
            f"{_fmt(cf['no_van_collection']['kg_co2e_wtw'])} kg; with the hub {_fmt(cf['hub']['kg_co2e_wtw'])} kg; "
            f"the method's dedicated-round baseline from the hub run "
            f"{_fmt(cf['method_estimate_of_dedicated_round']['kg_co2e_wtw'])} kg.",
        ]
    return "\n".join(lines) + "\n"


def _table(
    head: str, shares: list[float], rows: Sequence[tuple[tuple[str, ...], list[float]]], digits: int
) -> list[str]:
    out = [f"| {head} | " + " | ".join(f"e-van {s:.0%}" for s in shares) + " |"]
    out.append("|" + "---|" * (head.count("|") + 1 + len(shares)))
    out += [f"| {' | '.join(k)} | " + " | ".join(f"{v / 1000:,.{digits}f}" for v in vs) + " |" for k, vs in rows]
    return out


def sensitivity_markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`sensitivity` as three Markdown tables of avoided t CO2e (well-to-wheel): the network's
    total per baseline pair and electric van share; hazardous waste per allocation; and the headline
    (trips, vehicle-km, CO2) across the hazardous-waste baselines, diesel vans, home delivery."""
    shares = sorted({r["van_electric_share"] for r in rows})
    chain = rows[0]["recycling_chained_share"]
    by = {
        (
            r["waste_baseline"],
            r["parcel_baseline"],
            r["allocation"],
            r["recycling_chained_share"],
            r["van_electric_share"],
        ): r
        for r in rows
    }
    pairs = dict.fromkeys((r["waste_baseline"], r["parcel_baseline"]) for r in rows)
    total: list[tuple[tuple[str, ...], list[float]]] = [
        (pair, [by[(*pair, "load_distance", chain, s)]["avoided"]["kg_co2e_wtw"] for s in shares])
        for pair in pairs
        if (*pair, "load_distance", chain, shares[0]) in by
    ]
    waste: list[tuple[tuple[str, ...], list[float]]] = [
        (
            (a,),
            [
                by[("resident_trips", "home_delivery", a, chain, s)]["categories"]["hazardous_waste"]["kg_co2e_wtw"]
                for s in shares
            ],
        )
        for a in ("load_distance", "marginal")
        if ("resident_trips", "home_delivery", a, chain, shares[0]) in by
    ]
    lines = _table("waste baseline | parcel baseline", shares, total, 1)
    lines += ["", *_table("allocation (hazardous waste only)", shares, waste, 2)]
    lines += ["", *_waste_baseline_table(rows, shares[0])]
    return "\n".join(lines) + "\n"


def _waste_baseline_table(rows: list[dict[str, Any]], share: float) -> list[str]:
    """The headline for each hazardous-waste baseline (home delivery, allocation by load x distance,
    van electric share ``share``), with the range across them."""
    picked = [
        r for r in rows
        if r["parcel_baseline"] == "home_delivery" and r["allocation"] == "load_distance"
        and r["van_electric_share"] == share
    ]  # fmt: skip
    if not picked:
        return []
    out = [
        f"| waste baseline (home delivery, e-van {share:.0%}) | motorised trips avoided | vkm avoided "
        "| t CO2e WTW avoided | of which hazardous waste |",
        "|---|---|---|---|---|",
    ]
    for r in picked:
        name = r["waste_baseline"]
        if r["recycling_chained_share"]:
            name += f", {r['recycling_chained_share']:.0%} of trips chained"
        h, waste_t = r["headline"], r["categories"]["hazardous_waste"]["kg_co2e_wtw"] / 1000
        out.append(
            f"| {name} | {h['motorised_trips_avoided']:,} | {h['vkm_avoided']:,.0f} "
            f"| {h['kg_co2e_wtw_avoided'] / 1000:,.1f} | {waste_t:,.1f} |"
        )
    co2 = [r["headline"]["kg_co2e_wtw_avoided"] / 1000 for r in picked]
    trips = [r["headline"]["motorised_trips_avoided"] for r in picked]
    out.append(f"| **range** | {min(trips):,} to {max(trips):,} | | **{min(co2):,.1f} to {max(co2):,.1f}** | |")
    return out
