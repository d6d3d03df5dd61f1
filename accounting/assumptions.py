"""The method's parameters: allocation, baselines and every figure, with its source or as an assumption.

Where it sits: the input of ``accounting.method``. One ``Method`` object says everything a result
depends on; it is returned beside every result (``Method.model_dump()``), so a figure never travels
without the assumptions that produced it. Override any field with ``key.path=value`` strings
(``accounting.overrides``), as ``molo impact --method-set`` and the API's ``set=`` parameter do.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self, get_args

from pydantic import Field, model_validator

from accounting.factors import Factors, Frozen, NonNegative

Share = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]

#: How a shared van tour's distance is split between what it carries.
Allocation = Literal["load_distance", "marginal"]
#: The counterfactual for hazardous waste without the boxes.
WasteBaseline = Literal["resident_trips", "dedicated_round", "mixed", "bin_bag", "residual_bin"]
WASTE_BASELINES: tuple[str, ...] = get_args(WasteBaseline)
#: The counterfactual for parcels delivered to a box.
ParcelBaseline = Literal["home_delivery", "parcel_shop"]


class Baseline(Frozen):
    """Which counterfactual each category is compared with (a choice, never a hidden assumption)."""

    #: ``resident_trips``: residents take their hazardous waste to the nearest recycling station
    #: themselves (apartment residents had no pickup before; DOMAIN.md). ``dedicated_round``: the waste
    #: company collects the same red boxes with its own truck, one round a day over the boxes collected
    #: that day. ``mixed``: ``waste_resident_share`` of the first, the rest of the second.
    #: ``bin_bag``: Aalborg's own scheme for houses (since 2016, DOMAIN.md): batteries and small
    #: electronics in a bag on the plastic/metal bin, emptied on a round that runs anyway, so no trip;
    #: the rest (``1 - bin_bag_share`` of the deposits) to a recycling station as in ``resident_trips``.
    #: ``residual_bin``: the waste would have gone in the residual bin (emptied anyway): no trip at
    #: all, the lower bound of what the boxes avoid (the harm of hazardous waste in the residual bin
    #: is not a transport figure and is not counted).
    waste: WasteBaseline = "resident_trips"
    waste_resident_share: Share = 0.5
    #: Share of the deposits the bin-bag scheme would take: batteries and small electronics are
    #: 1.83 of the pilot's 2.5 kg a user a year (1.5 + 0.33; the rest chemicals, paint, spray cans,
    #: bulbs; simulator/params.py), taken as the share of drop-offs. Assumption.
    bin_bag_share: Share = 0.73
    #: ``home_delivery``: each parcel delivered to a box would have gone to the door on the same round,
    #: with failed first attempts; ``parcel_shop``: to a parcel shop in the area (a stop like the box)
    #: that the resident visits. Sent parcels start from a parcel shop in both.
    parcels: ParcelBaseline = "home_delivery"


class Residents(Frozen):
    """Residents' own trips (to the box, a parcel shop, a recycling station)."""

    #: Share of trips to a parcel locker made by car: 26% in Oslo studies (DOMAIN.md).
    box_car_share: Share = 0.26
    #: Round trip to the box, km. Oslo: locker trips are a third as long as shop trips (DOMAIN.md),
    #: so a third of ``shop_trip_km``; the boxes stand in the residents' own apartment areas.
    box_trip_km: NonNegative = 1.0
    #: Share of trips to a parcel shop made by car: 46% in Oslo studies (DOMAIN.md).
    shop_car_share: Share = 0.46
    #: Round trip to a parcel shop, km. Assumption.
    shop_trip_km: NonNegative = 3.0
    #: Share of recycling-station trips made by car (hazardous waste is carried, not walked, to an
    #: out-of-town station). Assumption.
    recycling_car_share: Share = 0.6
    #: Trips per red-box deposit in the baseline: 1 = every deposit would have been its own trip;
    #: below 1, households save up waste for one trip. Assumption.
    recycling_trips_per_deposit: NonNegative = 1.0
    #: Share of those trips chained with another errand (shopping, commuting): a chained trip is no
    #: vehicle trip of its own and adds only ``chained_detour_share`` of the round trip's km. 0 in the
    #: headline (every trip its own, an upper bound); ``docs/methodology.md`` shows 0.5. Assumption.
    recycling_chained_share: Share = 0.0
    #: Share of a recycling-station round trip's km that a chained trip adds (the detour). Assumption.
    chained_detour_share: Share = 0.3


class Parcels(Frozen):
    """Parcel figures for the allocation and the delivery baselines."""

    #: Parcel mass by size class, kg, for allocation by load (A 8x38x64 cm, B 19x38x64, C 41x38x64;
    #: about 150 kg/m3 of parcel). Assumption.
    mass_kg: dict[str, NonNegative] = Field(default_factory=lambda: {"A": 1.0, "B": 3.0, "C": 7.0})
    #: Mass of a parcel whose size the event does not give (taken back, sent). Assumption.
    unsized_mass_kg: NonNegative = 2.5
    #: Extra van km per parcel delivered to the door instead of the box: the round is the same, but
    #: each parcel is a stop of its own between the blocks of the area. Assumption.
    door_km_per_parcel: NonNegative = 0.2
    #: Failed first home deliveries: 3-8% (DOMAIN.md); the middle of that range.
    failed_first_attempt_share: Share = 0.055
    #: Of the failed ones, the share delivered again by van; the rest are fetched by the resident from
    #: a parcel shop. Assumption.
    failed_redelivery_share: Share = 0.5


class WasteParams(Frozen):
    #: Collections by this carrier id are the waste company's own (dedicated) trips; any other carrier
    #: id is a carrier's van on its round.
    operator: str = "nordvaerk"
    #: Mass of the red box itself, kg, added to the waste for allocation by load. Assumption.
    red_box_tare_kg: NonNegative = 0.5


class Method(Frozen):
    """Everything a result depends on. The defaults are the headline method."""

    name: Literal["molo-hubs-activity-v1"] = "molo-hubs-activity-v1"
    #: ``load_distance``: a shared tour is split over its consignments by mass x shortest feasible
    #: distance from the depot (ISO 14083 / GLEC). ``marginal``: waste carries only the extra distance
    #: its stops add to a tour that happens anyway (0 where the van stopped for parcels too).
    allocation: Allocation = "load_distance"
    baseline: Baseline = Baseline()
    #: Straight-line km x this = road km (the simulator's default; assumption, urban 1.2-1.4).
    road_factor: Annotated[float, Field(ge=1)] = 1.3
    #: GLEC v3.2 road default: modelled distances are raised by 5% to approach driven distance.
    distance_adjustment: Annotated[float, Field(ge=0, le=1)] = 0.05
    #: Parcels a van delivers on one trip: a round with more is cut into several van trips, in stop
    #: order (the simulator's default van capacity; assumption). 0 = one van a round.
    van_capacity_parcels: Annotated[int, Field(ge=0)] = 120
    #: Share of the carriers' van-km driven electric (the rest diesel); the baseline's vans too.
    van_electric_share: Share = 0.0
    #: Vehicle categories (keys of ``factors.vehicles``) per role.
    van_diesel: str = "diesel_van"
    van_electric: str = "electric_van"
    truck: str = "waste_truck"
    car: str = "car"
    residents: Residents = Residents()
    parcels: Parcels = Parcels()
    waste: WasteParams = WasteParams()
    factors: Factors = Factors()

    @model_validator(mode="after")
    def _known_vehicles(self) -> Self:
        for role in (self.van_diesel, self.van_electric, self.truck, self.car):
            try:
                self.factors.intensity(role)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        return self

    def intensity(self, vehicle: str) -> tuple[float, float]:
        """(WTW, TTW) kg CO2e per vkm; ``van`` is the carriers' fleet mix by ``van_electric_share``."""
        if vehicle == "van":
            dw, dt = self.factors.intensity(self.van_diesel)
            ew, et = self.factors.intensity(self.van_electric)
            s = self.van_electric_share
            return (1 - s) * dw + s * ew, (1 - s) * dt + s * et
        return self.factors.intensity({"truck": self.truck, "car": self.car}.get(vehicle, vehicle))
