"""Emission factors: energy carriers and vehicle categories, each with its source and year.

Where it sits: the bottom of the accounting method (``accounting/``), which turns the activity of the
boxes into trips, vehicle-km and kg CO2e. By ISO 14083:2023 and the GLEC Framework v3, emissions are
transport activity (vehicle-km) times the emission intensity of the vehicle category. Intensities here
are built from an energy use per vehicle-km and the energy carrier's factor, so well-to-wheel (WTW, the
headline) and tank-to-wheel (TTW) always come from the same energy figure and are never mixed.

Every default below is overridable (``accounting.assumptions.Method.factors``); figures marked
*assumption* are not from a published source and are there to be varied.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegative = Annotated[float, Field(ge=0)]


class Frozen(BaseModel):
    """Base of the method's parameter models: unknown fields, infinities and NaN are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Energy(Frozen):
    """An energy carrier: kg CO2e per unit, well-to-wheel and tank-to-wheel."""

    unit: Literal["litre", "kWh"]
    wtw_kg_per_unit: NonNegative
    ttw_kg_per_unit: NonNegative
    source: str


class Vehicle(Frozen):
    """A vehicle category: which energy it runs on and how much per vehicle-km."""

    energy: str
    use_per_vkm: NonNegative
    source: str


def _default_energy() -> dict[str, Energy]:
    return {
        "diesel": Energy(
            unit="litre",
            # WTW: 90.7 g/MJ x 35.7 MJ/L, the Danish Energy Agency's approved figure for B7 (2022).
            # TTW: DEFRA 2025 conversion factors, diesel (average biofuel blend), 2.571 kg/L.
            wtw_kg_per_unit=3.24,
            ttw_kg_per_unit=2.571,
            source="WTW: Danish Energy Agency, diesel B7, 2022 (3.24 kg/L); TTW: DEFRA 2025 B7 (2.571 kg/L)",
        ),
        "electricity_dk": Energy(
            unit="kWh",
            # Grid electricity: all emissions are upstream (TTW = 0). Danish 2023 average; West Denmark
            # (DK1) varies 0-500 g/kWh by hour.
            wtw_kg_per_unit=0.096,
            ttw_kg_per_unit=0.0,
            source="Danish grid, 2023 average, 96 g CO2e/kWh; TTW 0 for grid electricity",
        ),
    }


def _default_vehicles() -> dict[str, Vehicle]:
    return {
        "diesel_van": Vehicle(
            energy="diesel",
            # DEFRA's light van (up to 3.5 t, diesel) is ~0.256 kg CO2e/vkm TTW, i.e. 0.256 / 2.571
            # = 0.0996 L of diesel per vkm.
            use_per_vkm=0.256 / 2.571,
            source="DEFRA-format light van <= 3.5 t, diesel, ~0.256 kg CO2e/vkm TTW (year not given)"
            " / DEFRA 2025 B7 2.571 kg/L -> 0.0996 L/vkm",
        ),
        "electric_van": Vehicle(
            energy="electricity_dk",
            use_per_vkm=0.24,
            source="electric light van, ~0.24 kWh/vkm (year not given: an assumption to vary)",
        ),
        "waste_truck": Vehicle(
            energy="diesel",
            use_per_vkm=1.0,
            source="refuse collection truck, ~1 L diesel/km (year not given: an assumption to vary)",
        ),
        "rigid_truck": Vehicle(
            energy="diesel",
            use_per_vkm=0.84 / 2.571,
            source="rigid truck, ~0.84 kg CO2e/vkm TTW (DEFRA format; year not given) -> 0.327 L/vkm",
        ),
        "car": Vehicle(
            energy="diesel",
            # Assumption: 6.5 L/100 km on the diesel factors gives 0.167 kg CO2e/km TTW, close to
            # DEFRA's average car of unknown fuel (~0.17).
            use_per_vkm=0.065,
            source="assumption: private car, 6.5 L/100 km (~DEFRA average car, unknown fuel)",
        ),
    }


class Factors(Frozen):
    """The energy carriers and vehicle categories in force."""

    energy: dict[str, Energy] = Field(default_factory=_default_energy)
    vehicles: dict[str, Vehicle] = Field(default_factory=_default_vehicles)

    def intensity(self, vehicle: str) -> tuple[float, float]:
        """(WTW, TTW) kg CO2e per vehicle-km of ``vehicle``; KeyError names an unknown category."""
        try:
            v = self.vehicles[vehicle]
        except KeyError:
            raise KeyError(f"unknown vehicle category {vehicle!r}; known: {sorted(self.vehicles)}") from None
        try:
            e = self.energy[v.energy]
        except KeyError:
            raise KeyError(f"vehicle {vehicle!r} runs on unknown energy {v.energy!r}") from None
        return v.use_per_vkm * e.wtw_kg_per_unit, v.use_per_vkm * e.ttw_kg_per_unit
