"""Avoided trips and CO2 from the API: the same method on ingested events as in the simulator.

This module has a database of its own (on each storage flavour): van rounds are rebuilt over every
box with activity on a day, so other modules' events on the same days would change these figures.
The API tests write events straight into the events table (ingest is tested elsewhere), boxes
kpi-001 .. kpi-010; the end-to-end test runs the simulator live through real Mosquitto and ingest
into PostgreSQL, boxes box-061 .. box-063, on other days.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from accounting import ActivityCounter, Method, Point, apply_overrides, assess, summarize
from accounting.assumptions import WASTE_BASELINES
from backend.access.keys import Role, create_key
from backend.ingest.worker import IngestWorker
from molo.brokers import RunningBroker
from molo.provision import Credentials
from molo.registry import register_boxes
from network import geography_of, load_network
from simulator.impact import run_impact
from simulator.live import run_live
from simulator.params import resolve
from tests.fixtures.database import FLAVOURS, own_database
from tests.fixtures.keys import headers
from tests.fixtures.pipeline import renamed_network, wait_for

T0 = datetime(2026, 4, 6, 8, tzinfo=UTC)  # a Monday


@pytest.fixture(scope="module", params=FLAVOURS)
def database_url(request: pytest.FixtureRequest, pg_admin_url: str) -> Iterator[str]:
    """This module's own fresh, migrated database (overrides the run's shared one here)."""
    with own_database(request.param, pg_admin_url, "kpis") as url:
        yield url


@pytest.fixture(scope="module")
def api_keys(database_url: str) -> dict[str, dict[str, str]]:
    """Request headers per role, made in this module's database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        keys = {
            "operator": create_key(conn, role=Role.OPERATOR, name="kpi tests"),
            "researcher": create_key(conn, role=Role.RESEARCHER, name="kpi tests"),
            "courier_gls": create_key(conn, role=Role.COURIER, carrier="gls", name="kpi tests"),
        }
    return {role: headers(key) for role, key in keys.items()}


BOXES = {"kpi-001": (57.0470, 9.9180), "kpi-002": (57.0350, 9.9300)}  # kpi-003 has no registered position
Event = tuple[datetime, str, str, dict[str, Any]]


def events() -> list[Event]:
    """Three days of parcels, sends and hazardous waste at kpi-001 and kpi-002 (and one at kpi-003)."""
    out: list[Event] = []
    for d in range(3):
        t = T0 + timedelta(days=d)
        for box in ("kpi-001", "kpi-002"):
            for i, size in enumerate(["A", "B", "C", "A"][: 2 + d]):
                pid = f"{box}-{d}-{i}"
                out.append((t, box, "parcel.deposited", {"compartment": 3 + i, "size_class": size, "parcel_id": pid,
                                                         "carrier": "gls"}))  # fmt: skip
                out.append((t + timedelta(hours=5), box, "parcel.collected", {"compartment": 3 + i, "parcel_id": pid}))
            out.append((t + timedelta(hours=2), box, "waste.deposited",
                        {"compartment": 1, "fraction": "batteries", "weight_kg": 0.4 + d / 10}))  # fmt: skip
            send = {"compartment": 9, "size_class": "B", "parcel_id": f"s-{box}-{d}", "carrier": "postnord"}
            out.append((t + timedelta(hours=3), box, "parcel.dropped_off", send))
        out.append((t + timedelta(hours=6), "kpi-002", "parcel.picked_up",
                    {"compartment": 9, "parcel_id": f"s-kpi-002-{d}", "carrier": "postnord"}))  # fmt: skip
    out.append((T0 + timedelta(days=2, hours=1), "kpi-001", "waste.collected",
                {"compartment": 1, "carrier": "gls", "weight_kg": 3.1}))  # fmt: skip
    out.append((T0 + timedelta(days=1, hours=1), "kpi-002", "waste.collected",
                {"compartment": 2, "carrier": "nordvaerk", "weight_kg": 2.2}))  # fmt: skip
    out.append((T0, "kpi-003", "waste.deposited", {"compartment": 1, "fraction": "paint", "weight_kg": 1.0}))
    return out


@pytest.fixture(scope="module")
def seeded(database_url: str) -> list[Event]:
    """The events above in the events table, and where kpi-001 and kpi-002 stand."""
    rows = events()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for box, (lat, lon) in BOXES.items():
            conn.execute(
                "INSERT INTO boxes (box_id, latitude, longitude) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (box, lat, lon),
            )
        conn.execute("SELECT molo_ensure_partitions('events', %s, %s)", (T0, T0 + timedelta(days=4)))
        with conn.cursor().copy(
            "COPY events (ts, received_at, box_id, seq, session, type, compartment, parcel_id, carrier, size_class,"
            " fraction, weight_kg, payload) FROM STDIN"
        ) as copy:
            for seq, (ts, box, kind, p) in enumerate(rows, start=1):
                copy.write_row(
                    (ts, ts, box, seq, 1, kind, p["compartment"], p.get("parcel_id"), p.get("carrier"),
                     p.get("size_class"), p.get("fraction"), p.get("weight_kg"), json.dumps(p))
                )  # fmt: skip
    return rows


MINE = {"box": ["kpi-001", "kpi-002", "kpi-003"], "since": "2026-04-06", "until": "2026-04-09"}


def flat(value: Any, path: str = "") -> dict[str, Any]:
    """Nested dicts and lists as one flat {path: leaf} dict (pytest.approx compares flat ones)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}[{i}]").items()}
    return {path: value}


def assert_close(got: Any, want: Any) -> None:
    """Equal structure and text, numbers equal to 1e-6 relative (sums may be added in another order)."""
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w)
    numbers = {k for k, v in w.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert {k: g[k] for k in numbers} == pytest.approx({k: w[k] for k in numbers}, rel=1e-6, abs=1e-6)
    assert {k: g[k] for k in g if k not in numbers} == {k: w[k] for k in w if k not in numbers}


def expected(rows: list[Event], method: Method, group_by: list[str]) -> dict[str, Any]:
    """The method applied in Python to the same events, counted by the simulator's counter."""
    counter = ActivityCounter()
    for ts, box, kind, payload in rows:
        if box in BOXES:
            counter.add(round(ts.timestamp() * 1000), box, kind, payload)
    geo = replace(geography_of(load_network()), boxes={b: Point(*p) for b, p in BOXES.items()})
    return summarize(assess(counter.rows(), geo, method), group_by)


def test_kpis_equal_the_method_applied_to_the_same_events(api: httpx.Client, seeded: list[Event]) -> None:
    """The database aggregate and the Python counter feed the method the same counts: totals, every
    category and every (box, day) group agree; the box without a position is left out and named."""
    got = api.get("/api/v1/kpis", params={**MINE, "group_by": ["box", "day"]})
    assert got.status_code == 200, got.text
    body = got.json()
    want = expected(seeded, Method(), ["box", "day"])
    for part in ("totals", "categories", "modes", "groups", "headline", "activity", "method", "assumptions"):
        assert_close(body[part], want[part])
    assert body["excluded"] == {"boxes_without_position": ["kpi-003"], "carriers_without_depot": []}
    assert body["period"] == {"since": "2026-04-06", "until": "2026-04-09"}
    assert body["activity"]["parcels_delivered"] == 18
    assert body["activity"]["red_boxes_by_vans"] == 1
    assert body["activity"]["red_boxes_by_operator"] == 1
    # kpi-002's red box fetched by the waste company's own truck is a project truck round.
    assert body["modes"]["truck"]["project"]["vkm"] > 0


def test_a_box_filter_keeps_that_boxs_share_of_the_shared_rounds(api: httpx.Client, seeded: list[Event]) -> None:
    """Asking for one box gives its row of the whole network's answer: the van rounds are still
    rebuilt over every box of the day, not over the filtered ones alone."""
    days = {k: v for k, v in MINE.items() if k != "box"}
    whole = api.get("/api/v1/kpis", params={**days, "group_by": ["box"]}).json()
    row = next(g for g in whole["groups"] if g["key"]["box"] == "kpi-001")
    alone = api.get("/api/v1/kpis", params={**MINE, "box": ["kpi-001"]}).json()
    assert_close({s: alone["totals"][s] for s in ("baseline", "project", "avoided")},
                 {s: row[s] for s in ("baseline", "project", "avoided")})  # fmt: skip
    assert alone["modes"]["van"]["project"]["vkm"] < whole["modes"]["van"]["project"]["vkm"]
    assert alone["activity"]["parcels_delivered"] == 9


def test_overrides_change_the_result_and_are_stated(api: httpx.Client, seeded: list[Event]) -> None:
    """An all-electric van fleet lowers the project's van emissions to 0.24 kWh x 0.096 kg a vkm; the
    dedicated-round baseline and a car-share override are applied and echoed in the result."""
    params: dict[str, Any] = {**MINE, "van_electric_share": 1.0, "waste_baseline": "dedicated_round",
              "set": ["residents.box_car_share=0.1"]}  # fmt: skip
    body = api.get("/api/v1/kpis", params=params).json()
    method = apply_overrides(
        Method(), ["van_electric_share=1.0", "baseline.waste='dedicated_round'", "residents.box_car_share=0.1"]
    )
    assert_close(body["totals"], expected(seeded, method, [])["totals"])
    van = body["modes"]["van"]["project"]
    assert van["kg_co2e_wtw"] == pytest.approx(van["vkm"] * 0.24 * 0.096, rel=1e-5)
    assert van["kg_co2e_ttw"] == 0.0
    assert body["method"]["waste_baseline"] == "dedicated_round"
    assert body["assumptions"]["residents"]["box_car_share"] == 0.1
    assert body["modes"]["truck"]["baseline"]["vkm"] > 0


@pytest.mark.parametrize("baseline", WASTE_BASELINES)
def test_each_waste_baseline_through_the_api_is_the_method_with_that_baseline(
    api: httpx.Client, seeded: list[Event], baseline: str
) -> None:
    """``?waste_baseline=`` for each counterfactual of docs/methodology.md (the residual bin, Aalborg's
    bag for batteries, dedicated rounds, ...) gives the method's figures with that baseline on the
    same events and states it; against one car trip per drop-off, the bag for batteries leaves a
    trip for the rest and the residual bin (emptied anyway) no baseline emissions at all."""
    body = api.get("/api/v1/kpis", params={**MINE, "waste_baseline": baseline, "group_by": ["category"]}).json()
    want = expected(seeded, apply_overrides(Method(), [f"baseline.waste='{baseline}'"]), ["category"])
    for part in ("totals", "categories", "modes", "groups", "headline", "method"):
        assert_close(body[part], want[part])
    assert body["method"]["waste_baseline"] == baseline
    waste = body["categories"]["hazardous_waste"]["baseline"]["kg_co2e_wtw"]
    trips = api.get("/api/v1/kpis", params=MINE).json()["categories"]["hazardous_waste"]["baseline"]["kg_co2e_wtw"]
    assert trips > 0.0
    if baseline == "resident_trips":
        assert waste == trips
    elif baseline == "residual_bin":
        assert waste == 0.0
    elif baseline == "bin_bag":  # 73% of the deposits would have gone in the bag: a trip for the rest
        assert 0.0 < waste < trips
    else:
        assert 0.0 < waste != trips


def test_csv_export_has_the_json_figures(api: httpx.Client, seeded: list[Event]) -> None:
    """The CSV has a row per group with the same avoided kg CO2e as the JSON, and the method per row."""
    params = {**MINE, "group_by": ["category"]}
    body = api.get("/api/v1/kpis", params=params).json()
    got = api.get("/api/v1/kpis.csv", params=params)
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("text/csv")
    assert "attachment" in got.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(got.text)))
    assert [r["category"] for r in rows] == [g["key"]["category"] for g in body["groups"]]
    for r, g in zip(rows, body["groups"], strict=True):
        assert float(r["avoided_kg_co2e_wtw"]) == pytest.approx(g["avoided"]["kg_co2e_wtw"])
        assert (r["method"], r["allocation"]) == ("molo-hubs-activity-v1", "load_distance")


def test_assumptions_endpoint_lists_every_factor_with_its_source(api: httpx.Client) -> None:
    """The assumptions in force, with overrides applied, the van intensity they imply and a source
    for every energy carrier and vehicle category."""
    body = api.get("/api/v1/kpis/assumptions", params={"van_electric_share": 0.5}).json()
    assert body["assumptions"]["van_electric_share"] == 0.5
    wtw = body["intensities_kg_co2e_per_vkm"]["van"]["wtw"]
    assert wtw == pytest.approx(0.5 * 0.256 / 2.571 * 3.24 + 0.5 * 0.24 * 0.096)
    assert "Danish Energy Agency" in body["sources"]["energy.diesel"]
    assert set(body["sources"]) >= {"vehicles.diesel_van", "vehicles.electric_van", "vehicles.waste_truck"}


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"since": "2026-04-09", "until": "2026-04-06"}, 400, "invalid_range"),
        ({"since": "2000-01-01", "until": "2026-04-06"}, 400, "invalid_range"),
        ({"set": ["residents.box_car_share=2"]}, 400, "invalid_parameter"),
        ({"set": ["no_such_parameter=1"]}, 400, "invalid_parameter"),
        ({"set": ["not an override"]}, 400, "invalid_parameter"),
        ({"set": ["road_factor=inf"]}, 400, "invalid_parameter"),
        ({**MINE, "set": ['waste.operator="acme"'], "waste_baseline": "dedicated_round"}, 400, "unknown_place"),
        ({"box": ["NOT A BOX"]}, 400, "invalid_parameter"),
        ({"group_by": ["box", "box"]}, 400, "invalid_parameter"),
        ({"group_by": ["hour"]}, 422, "invalid_request"),
        ({"van_electric_share": 2}, 422, "invalid_request"),
        ({"allocation": "by_weight"}, 422, "invalid_request"),
    ],
)
def test_bad_requests_get_precise_errors(api: httpx.Client, params: dict[str, Any], status: int, code: str) -> None:
    """Each malformed request is refused with its status and machine-readable code."""
    got = api.get("/api/v1/kpis", params=params)
    assert (got.status_code, got.json()["error"]["code"]) == (status, code)


def test_kpis_are_for_operators_and_researchers(api: httpx.Client, api_keys: dict[str, dict[str, str]]) -> None:
    """Researchers and operators may read KPIs; a courier may not, and no key is a 401."""
    assert api.get("/api/v1/kpis", params=MINE, headers=api_keys["researcher"]).status_code == 200
    courier = api.get("/api/v1/kpis/assumptions", headers=api_keys["courier_gls"])
    assert (courier.status_code, courier.json()["error"]["code"]) == (403, "forbidden_role")
    anonymous = httpx.get(f"{api.base_url}/api/v1/kpis")
    assert anonymous.status_code == 401


IDS = ["box-061", "box-062", "box-063"]


def test_live_run_gives_the_simulators_figures(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    database_url: str,
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    """Three boxes, three simulated days with van rounds, sends, waste and an outage, run live
    through Mosquitto and ingest: the API's avoided trips and CO2 (per box and day, and in total)
    equal what the simulator reports for the same scenario and seed."""
    scenario = resolve(
        overrides=[
            "network.boxes=3",
            "simulation.days=3",
            "simulation.telemetry_interval_min=720",
            "waste.adoption=1",
            "waste.deposits_per_user_year=12",
            "faults.box_offline_mtbf_days=1.5",
        ]
    )
    network = renamed_network(scenario, IDS)
    register_boxes(database_url, network.boxes)
    report = run_impact(scenario, network=network, group_by=("box", "day"), counterfactual=False)
    assert report["activity"]["parcels_delivered"] > 20
    assert report["activity"]["red_boxes_by_vans"] + report["activity"]["waste_deposits"] > 0

    result = run_live(
        scenario,
        host=broker.host,
        port=broker.port,
        passwords=credentials.boxes,
        state_dir=tmp_path,
        speed=12 * 3600,
        network=network,
    )
    assert result.delivered
    start = scenario.simulation.start.date()
    params = {"box": IDS, "since": start.isoformat(), "until": (start + timedelta(days=4)).isoformat(),
              "group_by": ["box", "day"]}  # fmt: skip

    def caught_up() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get("/api/v1/kpis", params=params).json()
        return body if body["activity"] == report["activity"] else None

    body = wait_for(caught_up, timeout=30)
    for part in ("totals", "categories", "modes", "groups", "headline", "method"):
        assert_close(body[part], report[part])
    assert date.fromisoformat(body["groups"][0]["key"]["day"]) >= start


def test_the_daily_counts_are_exact_under_replay(db: psycopg.Connection[Any]) -> None:
    """activity_daily counts an event once: a replayed (box, seq) that ingest's ON CONFLICT DO NOTHING
    skips is not counted again, and events the method does not read are not counted at all."""
    ts = datetime(2026, 5, 4, 12, tzinfo=UTC)
    db.execute("SELECT molo_ensure_partitions('events', %s, %s)", (ts, ts))
    insert = """INSERT INTO events (ts, received_at, box_id, seq, session, type, carrier, weight_kg, payload)
                VALUES (%s, now(), 'kpi-009', %s, 1, %s, %s, %s, '{}') ON CONFLICT DO NOTHING"""
    for _ in range(3):  # the same two events, delivered three times
        db.execute(insert, (ts, 1, "waste.collected", "gls", 2.5))
        db.execute(insert, (ts, 2, "door.opened", None, None))
    rows = db.execute("SELECT type, carrier, events, weight_kg FROM activity_daily WHERE box_id = 'kpi-009'").fetchall()
    assert rows == [("waste.collected", "gls", 1, 2.5)]


def test_a_day_is_worked_out_again_when_its_counts_grow(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    """The API's day cache never serves stale figures: after an event arrives for a day already
    asked for, the next answer counts it."""
    ts = datetime(2026, 5, 11, 12, tzinfo=UTC)
    db.execute("INSERT INTO boxes (box_id, latitude, longitude) VALUES ('kpi-010', 57.04, 9.92) ON CONFLICT DO NOTHING")
    db.execute("SELECT molo_ensure_partitions('events', %s, %s)", (ts, ts))
    insert = """INSERT INTO events (ts, received_at, box_id, seq, session, type, compartment, parcel_id, payload)
                VALUES (%s, now(), 'kpi-010', %s, 1, 'parcel.collected', 3, %s, '{}')"""
    params = {"box": ["kpi-010"], "since": "2026-05-11", "until": "2026-05-12"}
    db.execute(insert, (ts, 1, "p1"))
    first = api.get("/api/v1/kpis", params=params).json()
    assert api.get("/api/v1/kpis", params=params).json() == first
    db.execute(insert, (ts, 2, "p2"))
    second = api.get("/api/v1/kpis", params=params).json()
    assert (first["activity"]["parcels_collected"], second["activity"]["parcels_collected"]) == (1, 2)
    assert second["totals"]["project"]["trips"] == pytest.approx(2 * first["totals"]["project"]["trips"])


def test_no_events_yet_is_an_empty_result_not_an_error(api: httpx.Client) -> None:
    """Without a range and without events (for these boxes), the answer is today with zeros."""
    body = api.get("/api/v1/kpis", params={"box": ["kpi-099"]}).json()
    today = datetime.now(UTC).date()
    assert body["period"] == {"since": today.isoformat(), "until": (today + timedelta(days=1)).isoformat()}
    assert body["totals"]["avoided"] == {"trips": 0.0, "stops": 0.0, "vkm": 0.0, "kg_co2e_wtw": 0.0, "kg_co2e_ttw": 0.0}
    assert body["headline"] == {"motorised_trips_avoided": 0, "vkm_avoided": 0.0, "kg_co2e_wtw_avoided": 0.0}
    assert body["activity"]["parcels_delivered"] == 0
