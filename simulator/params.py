"""Scenario parameters: every figure the model uses, with its default, unit and source.

Where it sits: input to the simulator. A scenario is a TOML file (``simulator/scenarios/aalborg.toml``
ships with the repo) plus ``--set key.path=value`` overrides; :func:`resolve` returns the full,
validated parameter set, which a run saves next to its results. Defaults come from
``shared/DOMAIN.md`` (sources named beside each field); where a figure is an assumption, the field says so.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accounting.overrides import parse_override, set_dotted
from contract import SizeClass, WasteFraction

SCENARIO_DIR = Path(__file__).parent / "scenarios"
DEFAULT_SCENARIO = SCENARIO_DIR / "aalborg.toml"
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dist(Params):
    """A positive random duration or amount. ``exponential`` and ``constant`` need only ``mean``;
    ``lognormal`` and ``gamma`` take ``mean`` and ``sd`` (of the variable itself, not of its log)."""

    kind: Literal["exponential", "lognormal", "gamma", "constant", "uniform"]
    mean: Positive
    sd: NonNegative | None = None
    low: NonNegative | None = None
    high: NonNegative | None = None

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if self.kind in ("lognormal", "gamma") and not self.sd:
            raise ValueError(f"{self.kind} needs sd > 0")
        if self.kind == "uniform" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("uniform needs low <= high")
        return self


class Simulation(Params):
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
    days: Positive = 365.0
    seed: int = 1
    #: Telemetry per box every this many minutes of simulated time; 0 = none (batch studies).
    telemetry_interval_min: NonNegative = 0.0


class Demand(Params):
    #: Denmark handled ~185 M parcels in 2022, ~31 per resident (DOMAIN.md); ~1.9 residents per
    #: Aalborg apartment household (assumption) -> ~59 per household and year.
    parcels_per_household_year: NonNegative = 59.0
    #: Share of those delivered to the box instead of home. Assumption (pilot uptake unknown).
    locker_share: Share = 0.15
    #: Relative delivery volume Monday..Sunday (carriers deliver little at weekends).
    weekday_profile: Annotated[list[NonNegative], Field(min_length=7, max_length=7)] = [
        1.15,
        1.1,
        1.05,
        1.05,
        1.1,
        0.55,
        0.0,
    ]
    size_mix: dict[SizeClass, Share] = {SizeClass.A: 0.45, SizeClass.B: 0.40, SizeClass.C: 0.15}
    #: Parcels residents send from the box per household and year (returns, C2C): ~17% of what the
    #: box delivers, in the range of e-commerce return rates. Assumption.
    sends_per_household_year: NonNegative = 1.5
    #: Resident activity (pickups, sends, waste drop-offs) by hour of day, relative; ~40% of locker
    #: pickups happen outside business hours (DOMAIN.md), so evenings carry weight. Assumption.
    hour_profile: Annotated[list[NonNegative], Field(min_length=24, max_length=24)] = [
        0.1,
        0.05,
        0.05,
        0.05,
        0.05,
        0.1,
        0.4,
        0.8,
        0.9,
        0.9,
        1.0,
        1.0,
        1.1,
        1.0,
        1.0,
        1.1,
        1.4,
        1.7,
        1.8,
        1.6,
        1.3,
        0.9,
        0.5,
        0.2,
    ]


class Pickup(Params):
    #: The resident's dwell: the day a parcel is collected is its deposit + this, the time of day by
    #: ``demand.hour_profile``. A large locker network saw a mean of ~15.5 h (SD ~21 h) from
    #: notification to collection (DOMAIN.md). Calibrated: with pickups by the hour profile and the
    #: 72 h window, a mean of 12.8 h gives collected parcels a mean of 15.5 h (docs/simulator.md,
    #: "Calibration"); their SD comes out ~13 h, as no dwell can give 21 h inside a 72 h window.
    dwell_h: Dist = Dist(kind="lognormal", mean=12.8, sd=21.0)
    #: Hours a parcel waits before it expires and goes back (InPost UK / Amazon 3 days; DOMAIN.md).
    window_h: Positive = 72.0


class Carrier(Params):
    share: Share
    depot: str
    #: Departure times of the carrier's van round, hours of the day.
    round_hours: list[Annotated[float, Field(ge=0, lt=24)]] = [9.0]
    #: Days with rounds, 0 = Monday.
    round_days: list[Annotated[int, Field(ge=0, le=6)]] = [0, 1, 2, 3, 4]
    #: Parcels a van carries (volume-limited light van). Assumption.
    van_capacity: Annotated[int, Field(ge=1)] = 120
    #: Dangerous-goods room for red boxes, kg per van: far below the ADR small-load and SP 636
    #: (333 kg lithium) limits, as a carrier would set it. Assumption.
    hazardous_limit_kg: NonNegative = 40.0
    #: Van speed between stops (urban), km/h, and minutes per stop. Assumptions.
    speed_kmh: Positive = 25.0
    stop_min: NonNegative = 4.0
    vehicle: str = "diesel_van"


def _default_carriers() -> dict[str, Carrier]:
    # Carriers with parcel-locker business in Denmark; shares are illustrative.
    return {
        "postnord": Carrier(share=0.35, depot="postnord"),
        "gls": Carrier(share=0.2, depot="gls"),
        "dao": Carrier(share=0.2, depot="dao"),
        "bring": Carrier(share=0.15, depot="bring"),
        "dhl": Carrier(share=0.1, depot="dhl", round_days=[0, 1, 2, 3, 4, 5]),
    }


class Delivery(Params):
    #: ``rounds``: carriers' van rounds (realistic). ``poisson``: every parcel arrives on its own at a
    #: Poisson rate and is turned away if no compartment fits (for validation against theory).
    mode: Literal["rounds", "poisson"] = "rounds"
    carriers: dict[str, Carrier] = Field(default_factory=_default_carriers)
    #: A full box: the van tries the other boxes of its round within this distance, else takes the
    #: parcel back to the depot for the next round (InPost redirects within 2 km; DOMAIN.md).
    redirect_radius_km: NonNegative = 2.0


class WasteFractionParams(Params):
    share: Share
    weight_kg: Dist


#: Each fraction's kg per using household and year and its mean weight per drop-off (kg). The first
#: three are an Aalborg pilot's figures per household and year (DOMAIN.md: ~1.5 kg small electronics,
#: 0.33 kg batteries, one bulb, taken as 70 g); the rest are assumptions, which keep the total
#: (2.5 kg) below the UK study's upper figure of ~3.3 kg. Drop-off weights are assumptions.
#: docs/simulator.md, "Calibration", shows the arithmetic.
WASTE_KG_PER_USER_YEAR: dict[WasteFraction, tuple[float, float]] = {
    WasteFraction.SMALL_ELECTRONICS: (1.5, 0.75),
    WasteFraction.BATTERIES: (0.33, 0.33),
    WasteFraction.LIGHT_BULBS: (0.07, 0.07),
    WasteFraction.SPRAY_CANS: (0.15, 0.3),
    WasteFraction.PAINT: (0.2, 0.8),
    WasteFraction.CHEMICALS: (0.1, 0.5),
    WasteFraction.CLEANING_AGENTS: (0.1, 0.5),
    WasteFraction.OIL: (0.05, 0.5),
}
#: Drop-offs per using household and year that carry those kg (5.25).
DEPOSITS_PER_USER_YEAR = sum(kg / mean for kg, mean in WASTE_KG_PER_USER_YEAR.values())


def _default_fractions() -> dict[WasteFraction, WasteFractionParams]:
    # A fraction's share of the drop-offs is its drop-offs (kg / mean weight) over all of them, so the
    # kg per user and year come out as WASTE_KG_PER_USER_YEAR. Weights are gamma with SD 0.6 x mean.
    return {
        fraction: WasteFractionParams(
            share=kg / mean / DEPOSITS_PER_USER_YEAR, weight_kg=Dist(kind="gamma", mean=mean, sd=0.6 * mean)
        )
        for fraction, (kg, mean) in WASTE_KG_PER_USER_YEAR.items()
    }


class Waste(Params):
    #: Share of the boxes' households that bring their hazardous waste to the box. Assumption: the
    #: pilot's uptake is unpublished (a 24/7 hatch in Kolding saw 2,100 uses in a year; DOMAIN.md).
    adoption: Share = 0.25
    #: Drop-offs per using household and year; with the default fractions 2.5 kg (see above).
    deposits_per_user_year: NonNegative = DEPOSITS_PER_USER_YEAR
    fractions: dict[WasteFraction, WasteFractionParams] = Field(default_factory=_default_fractions)
    #: A red box is offered to vans once it holds this share of its limit.
    ready_share: Share = 0.5
    #: If no van took a ready red box within this many hours, a dedicated trip fetches it.
    max_wait_h: Positive = 72.0
    #: Who makes dedicated trips, from which site, with which vehicle.
    dedicated_operator: str = "nordvaerk"
    dedicated_vehicle: str = "waste_truck"
    dedicated_speed_kmh: Positive = 30.0


class Faults(Params):
    #: Mean days between a box losing its connection, and how long it stays offline (hours).
    box_offline_mtbf_days: Positive = 60.0
    box_offline_h: Dist = Dist(kind="lognormal", mean=2.0, sd=3.0)
    #: Mean days between door jams per box, and repair time (hours).
    door_jam_mtbf_days: Positive = 90.0
    repair_h: Dist = Dist(kind="lognormal", mean=24.0, sd=18.0)


class NetworkParams(Params):
    #: A network TOML file; unset = the bundled Aalborg network (network/data/aalborg_boxes.toml).
    file: Path | None = None
    #: Only the first N boxes (0 = all), for small studies and tests.
    boxes: Annotated[int, Field(ge=0)] = 0
    #: Straight-line km x this = road km (urban detour index 1.2-1.4; assumption).
    road_factor: Annotated[float, Field(ge=1)] = 1.3


class Scenario(Params):
    name: str = "aalborg"
    simulation: Simulation = Simulation()
    network: NetworkParams = NetworkParams()
    demand: Demand = Demand()
    pickup: Pickup = Pickup()
    delivery: Delivery = Delivery()
    waste: Waste = Waste()
    faults: Faults = Faults()

    @model_validator(mode="after")
    def _shares(self) -> Self:
        total = sum(c.share for c in self.delivery.carriers.values())
        if self.delivery.carriers and abs(total - 1) > 1e-6:
            raise ValueError(f"carrier shares must sum to 1, not {total:g}")
        for name, mix in (
            ("demand.size_mix", self.demand.size_mix),
            ("waste.fractions", {k: v.share for k, v in self.waste.fractions.items()}),
        ):
            if mix and abs(sum(mix.values()) - 1) > 1e-6:
                raise ValueError(f"{name} shares must sum to 1, not {sum(mix.values()):g}")
        return self


class ScenarioError(ValueError):
    """A user error in a scenario file or a ``--set``: one line saying what, where and what is allowed."""


def first_error(exc: ValidationError) -> str:
    """pydantic's first error as one line: ``field.path: message (given value)``, no help URL."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    given = err.get("input")
    shown = f" (given {given!r})" if loc and "input" in err and not isinstance(given, dict | list) else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}{shown}" if loc else msg


def dotted_keys(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every key path of a nested mapping, tables included (``delivery``, ``delivery.carriers``, ...)."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, Mapping):
            yield from dotted_keys(value, dotted + ".")


def extends_known_table(key: str, base: Mapping[str, Any]) -> bool:
    """A new entry of an open table (a new carrier, say): its parent exists and holds only tables."""
    parent, _, _ = key.rpartition(".")
    node: Any = base
    for part in parent.split(".") if parent else []:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return isinstance(node, Mapping) and bool(parent) and all(isinstance(v, Mapping) for v in node.values())


def unknown_parameter(key: str, base: Mapping[str, Any]) -> str | None:
    """Why ``key`` cannot be set on the resolved scenario ``base`` (with the nearest parameter), or None."""
    known = sorted(dotted_keys(base))
    if key in known or extends_known_table(key, base):
        return None
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key!r} is not a parameter of the model{hint} (parameters: simulator/params.py, docs/simulator.md)"


def resolve(path: Path | None = None, overrides: list[str] | None = None) -> Scenario:
    """The scenario in ``path`` (default: the bundled Aalborg one) with ``overrides`` applied.

    The file is validated first and the overrides apply to its fully resolved parameters, so one
    field of a table (say one carrier's van capacity) can change without restating the others.
    :class:`ScenarioError` (one line) for a missing or invalid file, an unknown key (with the
    nearest parameter) or a value out of range."""
    path = path or DEFAULT_SCENARIO
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        bundled = ", ".join(sorted(f.name for f in SCENARIO_DIR.glob("*.toml")))
        raise ScenarioError(f"scenario file {path} not found (bundled in simulator/scenarios/: {bundled})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"scenario file {path} cannot be read: {exc}") from None
    try:
        base = Scenario.model_validate(tomllib.loads(text)).model_dump(mode="json")
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise ScenarioError(f"{path}: {first_error(exc)}") from None
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            problem = unknown_parameter(key, base)
            if problem:
                raise ScenarioError(f"--set {item}: {problem}")
            set_dotted(base, key, value)
        except ScenarioError:
            raise
        except ValueError as exc:
            raise ScenarioError(f"--set {item}: {exc}") from None
    try:
        return Scenario.model_validate(base)
    except ValidationError as exc:
        raise ScenarioError(f"--set: {first_error(exc)}") from None


def dump(scenario: Scenario) -> str:
    """The fully resolved parameters as stable, sorted JSON (saved with every run's results)."""
    return json.dumps(scenario.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
