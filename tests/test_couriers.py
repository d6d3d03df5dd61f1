"""Couriers (issue 5): free capacity, reservations with their rejections, role boundaries, expiry,
no overbooking under concurrency, commands reaching a real firmware stub, hazardous-waste pickups.

Real Mosquitto (broker_config) and real PostgreSQL throughout. Boxes box-033 .. box-035 belong to
this module; seeded boxes are named cou-* and each test puts its own at a point of its own, so
searches never see another test's boxes.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.couriers import service as courier_service
from backend.couriers.service import SWEEP_LOCK_KEY
from backend.ingest.worker import IngestWorker
from contract import BoxLayout, SizeClass, default_layout
from contract.domain import WasteFraction
from contract.messages import ParcelDeposited, WasteCollected, WasteDeposited
from firmware_stub.box import BoxFirmware
from molo.brokers import RunningBroker, free_port
from molo.provision import Credentials
from tests.fixtures.pipeline import scalar, settings_for, wait_for

Headers = dict[str, str]
_points = itertools.count(1)


def spot() -> tuple[float, float]:
    """A point of its own (a degree of latitude apart: 111 km, far outside any search radius)."""
    return 20.0 + next(_points), 10.0


def seed_box(
    db: psycopg.Connection[Any],
    box_id: str,
    lat: float,
    lon: float,
    *,
    layout: BoxLayout | None = None,
    occupied: frozenset[int] = frozenset(),
    out_of_service: frozenset[int] = frozenset(),
    online: bool = True,
    seen_s_ago: float = 0.0,
    maintenance: bool = False,
) -> BoxLayout:
    """A box row and its latest state, as ingest would have stored them."""
    layout = layout or default_layout()
    readings = [
        {"id": c.id, "occupied": c.id in occupied, "door_open": False, "in_service": c.id not in out_of_service}
        for c in layout.compartments
    ]
    db.execute(
        """INSERT INTO boxes (box_id, name, latitude, longitude, layout) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (box_id) DO UPDATE SET latitude = excluded.latitude, longitude = excluded.longitude,
                                              layout = excluded.layout""",
        (box_id, f"Box {box_id}", lat, lon, layout.model_dump_json()),
    )
    db.execute(
        """INSERT INTO box_state (box_id, status_online, status_session, status_reason, status_changed_at,
                                  last_received_at, last_seen_at, compartments, red_boxes, maintenance)
           VALUES (%s, %s, 1, 'birth', now(), now() - make_interval(secs => %s), now(), %s, '[]', %s)
           ON CONFLICT (box_id) DO UPDATE SET status_online = excluded.status_online,
               last_received_at = excluded.last_received_at, compartments = excluded.compartments,
               maintenance = excluded.maintenance""",
        (box_id, online, seen_s_ago, json.dumps(readings), maintenance),
    )
    return layout


@pytest.fixture(scope="module")
def courier_url(database_url: str, broker: RunningBroker, credentials: Credentials) -> Iterator[str]:
    """The API on uvicorn with its broker connection (commands go out as the ingest user)."""
    settings = settings_for(
        database_url,
        broker,
        credentials,
        heartbeat_timeout_s=60.0,
        command_timeout_s=10.0,
        reservation_sweep_interval_s=0.3,
        reservation_release_attempts=3,
        reservation_release_retry_s=0.2,
    )
    server = ApiServer(create_app(settings)).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def http(courier_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the courier API with no key of its own (pass headers per request)."""
    with httpx.Client(base_url=courier_url, timeout=20) as client:
        yield client


def _code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def reserve(http: httpx.Client, who: Headers, box_id: str, **body: Any) -> httpx.Response:
    payload = {"box_id": box_id, "parcel_id": f"P-{uuid.uuid4().hex[:10]}", "size_class": "A"} | body
    return http.post("/api/v1/courier/reservations", json=payload, headers=who)


def capacity(http: httpx.Client, who: Headers, lat: float, lon: float, **params: Any) -> httpx.Response:
    query: dict[str, Any] = {"lat": lat, "lon": lon, "size_class": "A"} | params
    return http.get("/api/v1/courier/capacity", params={k: v for k, v in query.items() if v is not None}, headers=who)


# --------------------------------------------------------------------------- free capacity


def test_capacity_lists_boxes_with_fitting_free_compartments_nearest_first(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Boxes within the radius with free fitting doors come nearest first, with free counts per size
    that leave out occupied and out-of-service doors; boxes beyond the radius are not listed."""
    lat, lon = spot()
    # default layout: red boxes 1-2, A 3-6, B 7-12, C 13-16
    seed_box(db, "cou-near", lat + 0.001, lon, occupied=frozenset({3, 7}), out_of_service=frozenset({13}))
    seed_box(db, "cou-mid", lat + 0.005, lon)
    seed_box(db, "cou-far", lat + 0.03, lon)  # about 3.3 km
    response = capacity(http, api_keys["courier_gls"], lat, lon, radius_m=2000, size_class="B")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fitting_sizes"] == ["B", "C"]
    assert [b["box_id"] for b in body["boxes"]] == ["cou-near", "cou-mid"]
    near = body["boxes"][0]
    assert near["free_by_size"] == {"A": 3, "B": 5, "C": 3}
    assert near["free_fitting"] == 8
    assert near["smallest_fitting_size"] == "B"
    assert 100 < near["distance_m"] < 125  # 0.001 degree of latitude is about 111 m


def test_capacity_leaves_out_offline_timed_out_and_maintenance_boxes(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A box whose Last Will says offline, one silent beyond the heartbeat timeout, and one in
    maintenance offer no capacity; an online one next to them does."""
    lat, lon = spot()
    seed_box(db, "cou-offline", lat, lon, online=False)
    seed_box(db, "cou-silent", lat, lon, seen_s_ago=600)
    seed_box(db, "cou-maint", lat, lon, maintenance=True)
    seed_box(db, "cou-up", lat, lon + 0.001)
    boxes = capacity(http, api_keys["courier_gls"], lat, lon).json()["boxes"]
    assert [b["box_id"] for b in boxes] == ["cou-up"]


def test_capacity_by_dimensions_fits_any_orientation(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A parcel given in mm fits the sizes whose compartment holds it in some orientation: 600x150x300
    fits B and C, not A; a box with only A free is not offered."""
    lat, lon = spot()
    seed_box(db, "cou-only-a", lat, lon, occupied=frozenset(range(7, 17)))
    seed_box(db, "cou-has-b", lat + 0.001, lon)
    body = capacity(
        http, api_keys["courier_gls"], lat, lon, size_class=None, height_mm=600, width_mm=150, depth_mm=300
    ).json()
    assert body["fitting_sizes"] == ["B", "C"]
    assert [b["box_id"] for b in body["boxes"]] == ["cou-has-b"]


def test_capacity_for_a_parcel_larger_than_any_door_is_dimensions_exceed(
    http: httpx.Client, api_keys: dict[str, Headers]
) -> None:
    """A parcel larger than the largest compartment (C: 410x380x640 mm) is refused 422 dimensions_exceed."""
    response = capacity(
        http, api_keys["courier_gls"], 1.0, 1.0, size_class=None, height_mm=500, width_mm=500, depth_mm=700
    )
    assert (response.status_code, _code(response)) == (422, "dimensions_exceed")


def test_capacity_needs_one_size_description(http: httpx.Client, api_keys: dict[str, Headers]) -> None:
    """Neither a size class nor dimensions, or both, or only some dimensions: 422 invalid_request."""
    for params in ({"size_class": None}, {"height_mm": 10}, {"size_class": None, "height_mm": 10, "width_mm": 10}):
        response = capacity(http, api_keys["courier_gls"], 1.0, 1.0, **params)
        assert (response.status_code, _code(response)) == (422, "invalid_request"), params


def test_capacity_along_route_reports_the_nearest_stop(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Along a list of stops, every box near any stop is offered once, with the stop it is nearest to."""
    lat, lon = spot()
    seed_box(db, "cou-stop0", lat, lon + 0.001)
    seed_box(db, "cou-stop1", lat + 0.02, lon + 0.0005)
    body = {
        "stops": [{"latitude": lat, "longitude": lon}, {"latitude": lat + 0.02, "longitude": lon}],
        "radius_m": 300,
        "size_class": "C",
    }
    response = http.post("/api/v1/courier/capacity/route", json=body, headers=api_keys["courier_gls"])
    assert response.status_code == 200, response.text
    found = {b["box_id"]: b["nearest_stop"] for b in response.json()["boxes"]}
    assert found == {"cou-stop1": 1, "cou-stop0": 0}
    assert [b["box_id"] for b in response.json()["boxes"]] == ["cou-stop1", "cou-stop0"]  # 35 m before 68 m


# --------------------------------------------------------------------------- reservations


def test_reservation_holds_the_smallest_fitting_door_and_counts_against_capacity(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A B parcel takes the lowest free B door; the hold removes it from free capacity; a C parcel
    takes a C door; the reservation is recorded for the courier's carrier with its expiry."""
    lat, lon = spot()
    seed_box(db, "cou-hold", lat, lon, occupied=frozenset({7}))
    gls = api_keys["courier_gls"]
    before = capacity(http, gls, lat, lon, size_class="B").json()["boxes"][0]["free_by_size"]["B"]
    response = reserve(http, gls, "cou-hold", size_class="B", hold_minutes=30)
    assert response.status_code == 201, response.text
    held = response.json()
    assert (held["compartment"], held["size_class"], held["carrier"], held["status"]) == (8, "B", "gls", "active")
    assert held["reserve_command"]["command_id"] is not None
    after = capacity(http, gls, lat, lon, size_class="B").json()["boxes"][0]["free_by_size"]["B"]
    assert after == before - 1
    big = reserve(
        http, gls, "cou-hold", size_class=None, dimensions_mm={"height_mm": 400, "width_mm": 300, "depth_mm": 300}
    )
    assert (big.json()["compartment"], big.json()["size_class"]) == (13, "C")
    minutes = scalar(
        db,
        "SELECT extract(epoch FROM expires_at - created_at) / 60 FROM reservations WHERE reservation_id = %s",
        (held["reservation_id"],),
    )
    assert round(float(minutes)) == 30


def test_full_box_is_locker_is_full(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A box whose parcel doors are all occupied, out of service or held answers 409 locker_is_full."""
    lat, lon = spot()
    seed_box(db, "cou-full", lat, lon, occupied=frozenset(range(3, 16)), out_of_service=frozenset({16}))
    response = reserve(http, api_keys["courier_gls"], "cou-full")
    assert (response.status_code, _code(response)) == (409, "locker_is_full")


def test_free_doors_too_small_is_no_free_fitting_compartment(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Free A doors only, and a C parcel: 409 no_free_fitting_compartment, naming the free sizes."""
    lat, lon = spot()
    seed_box(db, "cou-small", lat, lon, occupied=frozenset(range(7, 17)))
    response = reserve(http, api_keys["courier_gls"], "cou-small", size_class="C")
    assert (response.status_code, _code(response)) == (409, "no_free_fitting_compartment")
    assert response.json()["error"]["details"] == {"free_sizes": ["A"]}


def test_parcel_larger_than_any_door_of_the_box_is_dimensions_exceed(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A box with only A and B doors refuses a C parcel with 422 dimensions_exceed (not 'full'); so
    does any box for a parcel larger than every size."""
    lat, lon = spot()
    seed_box(db, "cou-ab", lat, lon, layout=default_layout(a=2, b=2, c=0))
    response = reserve(http, api_keys["courier_gls"], "cou-ab", size_class="C")
    assert (response.status_code, _code(response)) == (422, "dimensions_exceed")
    huge = reserve(
        http,
        api_keys["courier_gls"],
        "cou-ab",
        size_class=None,
        dimensions_mm={"height_mm": 1000, "width_mm": 1000, "depth_mm": 1000},
    )
    assert (huge.status_code, _code(huge)) == (422, "dimensions_exceed")


def test_unknown_box_is_box_not_found(http: httpx.Client, api_keys: dict[str, Headers]) -> None:
    """Reserving at a box that does not exist answers 404 box_not_found."""
    response = reserve(http, api_keys["courier_gls"], "cou-nowhere")
    assert (response.status_code, _code(response)) == (404, "box_not_found")


@pytest.mark.parametrize(
    ("state", "kwargs"),
    [
        ("offline", {"online": False}),
        ("offline", {"seen_s_ago": 600}),
        ("maintenance", {"maintenance": True}),
    ],
)
def test_offline_or_maintenance_box_is_box_unavailable(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers], state: str, kwargs: dict[str, Any]
) -> None:
    """An offline box (Last Will or heartbeat timeout) or one in maintenance answers 409 box_unavailable."""
    box_id = f"cou-unavail-{uuid.uuid4().hex[:6]}"
    seed_box(db, box_id, *spot(), **kwargs)
    response = reserve(http, api_keys["courier_gls"], box_id)
    assert (response.status_code, _code(response)) == (409, "box_unavailable")
    assert response.json()["error"]["details"] == {"state": state}


def test_same_parcel_twice_is_parcel_already_reserved(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A carrier's parcel holds one door at a time: a second hold for it answers 409
    parcel_already_reserved with the first reservation's id; another carrier may use the same id."""
    seed_box(db, "cou-twice", *spot())
    first = reserve(http, api_keys["courier_gls"], "cou-twice", parcel_id="P-TWICE")
    second = reserve(http, api_keys["courier_gls"], "cou-twice", parcel_id="P-TWICE")
    assert (second.status_code, _code(second)) == (409, "parcel_already_reserved")
    assert second.json()["error"]["details"] == {"reservation_id": first.json()["reservation_id"]}
    assert reserve(http, api_keys["courier_postnord"], "cou-twice", parcel_id="P-TWICE").status_code == 201


def test_cancel_frees_the_door_and_cancelling_again_is_reservation_not_active(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Cancelling frees the compartment at once (capacity goes back up, the box is sent a release);
    a second cancel answers 409 reservation_not_active; an unknown id 404 reservation_not_found."""
    lat, lon = spot()
    seed_box(db, "cou-cancel", lat, lon, layout=default_layout(a=1, b=0, c=0))
    gls = api_keys["courier_gls"]
    held = reserve(http, gls, "cou-cancel").json()
    assert capacity(http, gls, lat, lon).json()["boxes"] == []
    cancelled = http.delete(f"/api/v1/courier/reservations/{held['reservation_id']}", headers=gls)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["release_command"]["command_id"] is not None
    assert [b["box_id"] for b in capacity(http, gls, lat, lon).json()["boxes"]] == ["cou-cancel"]
    again = http.delete(f"/api/v1/courier/reservations/{held['reservation_id']}", headers=gls)
    assert (again.status_code, _code(again)) == (409, "reservation_not_active")
    missing = http.get(f"/api/v1/courier/reservations/{uuid.uuid4()}", headers=gls)
    assert (missing.status_code, _code(missing)) == (404, "reservation_not_found")


def test_expiry_releases_the_hold(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Once a hold's expiry has passed, its door counts as free again, the reservation reads expired,
    and the sweep records it expired and sends the box a release_compartment command."""
    lat, lon = spot()
    seed_box(db, "cou-expire", lat, lon, layout=default_layout(a=1, b=0, c=0))
    gls = api_keys["courier_gls"]
    held = reserve(http, gls, "cou-expire", hold_minutes=1).json()
    assert capacity(http, gls, lat, lon).json()["boxes"] == []
    # Let the minute pass: move the hold back in time rather than sleep.
    db.execute(
        "UPDATE reservations SET created_at = now() - interval '2 minutes', expires_at = now() - interval '1 second'"
        " WHERE reservation_id = %s",
        (held["reservation_id"],),
    )
    assert [b["box_id"] for b in capacity(http, gls, lat, lon).json()["boxes"]] == ["cou-expire"]
    path = f"/api/v1/courier/reservations/{held['reservation_id']}"
    assert http.get(path, headers=gls).json()["status"] == "expired"
    # this call's sweep or the periodic one ends it; the release is linked once the broker took it
    wait_for(lambda: http.get(path, headers=gls).json()["release_command"] is not None)
    row = db.execute(
        "SELECT r.status, c.action, c.compartment FROM reservations r JOIN commands c"
        " ON c.command_id = r.release_command_id WHERE r.reservation_id = %s",
        (held["reservation_id"],),
    ).fetchone()
    assert row == ("expired", "release_compartment", 3)
    again = reserve(http, gls, "cou-expire")  # the door can be held again
    assert again.status_code == 201
    assert again.json()["compartment"] == 3


def test_periodic_sweep_expires_holds_without_any_call(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """With nobody calling, the API's periodic sweep marks an overdue hold expired and sends its box
    a release_compartment command."""
    seed_box(db, "cou-quiet", *spot())
    held = reserve(http, api_keys["courier_gls"], "cou-quiet").json()
    db.execute(
        "UPDATE reservations SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 second'"
        " WHERE reservation_id = %s",
        (held["reservation_id"],),
    )
    query = (
        "SELECT r.status, c.action FROM reservations r LEFT JOIN commands c ON c.command_id = r.release_command_id"
        " WHERE r.reservation_id = %s"
    )
    wait_for(lambda: db.execute(query, (held["reservation_id"],)).fetchone() == ("expired", "release_compartment"))


# --------------------------------------------------------------------------- roles and carriers


def test_couriers_see_and_touch_only_their_own_carriers_reservations(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A PostNord courier cannot read or cancel a GLS reservation (404 reservation_not_found, as if it
    did not exist) and its list holds only PostNord's; the GLS courier still can."""
    seed_box(db, "cou-carriers", *spot())
    gls, postnord = api_keys["courier_gls"], api_keys["courier_postnord"]
    mine = reserve(http, gls, "cou-carriers").json()
    theirs = reserve(http, postnord, "cou-carriers").json()
    path = f"/api/v1/courier/reservations/{mine['reservation_id']}"
    for response in (http.get(path, headers=postnord), http.delete(path, headers=postnord)):
        assert (response.status_code, _code(response)) == (404, "reservation_not_found")
    listed = http.get("/api/v1/courier/reservations", params={"box_id": "cou-carriers"}, headers=postnord).json()
    assert [r["reservation_id"] for r in listed] == [theirs["reservation_id"]]
    assert http.get(path, headers=gls).json()["status"] == "active"
    assert http.delete(path, headers=gls).status_code == 200


def test_courier_naming_another_carrier_is_forbidden_carrier(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """A GLS courier reserving or listing for PostNord gets 403 forbidden_carrier; naming its own is fine."""
    seed_box(db, "cou-act-for", *spot())
    gls = api_keys["courier_gls"]
    response = reserve(http, gls, "cou-act-for", carrier="postnord")
    assert (response.status_code, _code(response)) == (403, "forbidden_carrier")
    listing = http.get("/api/v1/courier/reservations", params={"carrier": "postnord"}, headers=gls)
    assert (listing.status_code, _code(listing)) == (403, "forbidden_carrier")
    assert reserve(http, gls, "cou-act-for", carrier="gls").status_code == 201


def test_operator_acts_for_any_carrier_and_must_name_it(
    http: httpx.Client, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """An operator reserves for a named carrier (422 carrier_required without one), sees every
    carrier's reservations, and may cancel a courier's."""
    seed_box(db, "cou-operator", *spot())
    op = api_keys["operator"]
    missing = reserve(http, op, "cou-operator")
    assert (missing.status_code, _code(missing)) == (422, "carrier_required")
    made = reserve(http, op, "cou-operator", carrier="dao")
    assert made.json()["carrier"] == "dao"
    gls_hold = reserve(http, api_keys["courier_gls"], "cou-operator").json()
    listed = http.get("/api/v1/courier/reservations", params={"box_id": "cou-operator"}, headers=op).json()
    assert {r["carrier"] for r in listed} == {"dao", "gls"}
    assert http.delete(f"/api/v1/courier/reservations/{gls_hold['reservation_id']}", headers=op).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/courier/capacity?lat=1&lon=1&size_class=A"),
        ("POST", "/api/v1/courier/reservations"),
        ("GET", "/api/v1/courier/reservations"),
        ("GET", "/api/v1/courier/waste-pickups?lat=1&lon=1"),
    ],
)
def test_researcher_cannot_use_courier_endpoints(
    http: httpx.Client, api_keys: dict[str, Headers], method: str, path: str
) -> None:
    """Researchers read data; they cannot search capacity, reserve or plan pickups: 403 forbidden_role."""
    body = {"box_id": "cou-x", "parcel_id": "P-1", "size_class": "A"} if method == "POST" else None
    response = http.request(method, path, json=body, headers=api_keys["researcher"])
    assert (response.status_code, _code(response)) == (403, "forbidden_role")


def test_courier_endpoints_need_a_valid_unrevoked_key(
    http: httpx.Client, make_key: Callable[..., Any], database_url: str
) -> None:
    """Without a key 401 missing_api_key; with a made-up one 401 invalid_api_key; with a courier key
    revoked by a plain UPDATE 401 revoked_api_key, once the database's notification reaches the key
    cache (within 1 s; the cache alone would keep the key 5 s)."""
    path = "/api/v1/courier/reservations"
    assert _code(http.get(path)) == "missing_api_key"
    assert _code(http.get(path, headers={"X-API-Key": "molo_0000000000_" + "x" * 43})) == "invalid_api_key"
    key = make_key("courier", "bring")
    assert http.get(path, headers={"X-API-Key": key.token}).status_code == 200
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key.key_id,))
    started = time.monotonic()
    wait_for(lambda: http.get(path, headers={"X-API-Key": key.token}).status_code == 401, interval=0.01)
    assert time.monotonic() - started < 1.0
    response = http.get(path, headers={"X-API-Key": key.token})
    assert (response.status_code, _code(response)) == (401, "revoked_api_key")


# --------------------------------------------------------------------------- no overbooking


@pytest.mark.parametrize("contenders", [40])
def test_simultaneous_reservations_never_overbook(
    courier_url: str, db: psycopg.Connection[Any], api_keys: dict[str, Headers], contenders: int
) -> None:
    """Many couriers of two carriers reserving at the same instant for a box with three free doors
    (over the real HTTP server and connection pool): exactly three get a door, three different
    doors, and every other one is refused locker_is_full."""
    seed_box(db, "cou-race", *spot(), occupied=frozenset(range(3, 14)))  # free: C doors 14, 15, 16
    start = threading.Barrier(contenders)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def contend(i: int) -> None:
        who = api_keys["courier_gls" if i % 2 else "courier_postnord"]
        with httpx.Client(base_url=courier_url, timeout=60) as client:
            start.wait()
            response = reserve(client, who, "cou-race", size_class="A", parcel_id=f"RACE-{i}")
        with lock:
            results.append(response)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == contenders
    won = [r.json() for r in results if r.status_code == 201]
    lost = [_code(r) for r in results if r.status_code != 201]
    assert sorted(w["compartment"] for w in won) == [14, 15, 16]
    assert lost == ["locker_is_full"] * (contenders - 3)
    active = db.execute(
        "SELECT compartment FROM reservations WHERE box_id = 'cou-race' AND status = 'active' ORDER BY 1"
    ).fetchall()
    assert active == [(14,), (15,), (16,)]


def test_database_refuses_two_active_holds_on_one_door(db: psycopg.Connection[Any]) -> None:
    """Even bypassing the API's lock, the database refuses a second active hold on the same door."""
    insert = (
        "INSERT INTO reservations (reservation_id, box_id, compartment, size_class, carrier, parcel_id,"
        " created_by, expires_at) VALUES (%s, 'cou-index', 3, 'A', %s, %s, 'test', now() + interval '1 hour')"
    )
    db.execute(insert, (uuid.uuid4(), "gls", "P-IDX-1"))
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(insert, (uuid.uuid4(), "postnord", "P-IDX-2"))


# --------------------------------------------------------------------------- with a real box


@pytest.fixture(scope="module")
def box_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state directory per box id for the whole module: a box used by two tests keeps its
    sequence numbers and session counter, as a real box does across reboots."""
    return tmp_path_factory.mktemp("courier-boxes")


def _box(broker: RunningBroker, credentials: Credentials, box_id: str, box_dirs: Path) -> BoxFirmware:
    box = BoxFirmware(box_id, credentials.boxes[box_id], broker.host, broker.port, box_dirs / box_id, keepalive=2)
    box.start()
    assert box.wait_connected(10), f"{box_id} did not connect"
    return box


def test_reservation_command_reaches_the_box_and_is_acknowledged(
    http: httpx.Client,
    ingest: IngestWorker,
    broker: RunningBroker,
    credentials: Credentials,
    api_keys: dict[str, Headers],
    box_dirs: Path,
) -> None:
    """A hold sends reserve_compartment through Mosquitto to the firmware stub, which holds the door
    (no longer offered for deposits) and acknowledges; ingest records the ack, so the reservation's
    command reads succeeded. Cancelling sends release_compartment and the door is free again."""
    box = _box(broker, credentials, "box-033", box_dirs)
    gls = api_keys["courier_gls"]
    try:
        # the birth message, ingested, makes the box known and online
        held = wait_for(lambda: (r := reserve(http, gls, "box-033", size_class="B")).status_code == 201 and r.json())
        path = f"/api/v1/courier/reservations/{held['reservation_id']}"
        compartment = held["compartment"]
        assert box.state[compartment].size_class is not None
        wait_for(lambda: box.state[compartment].reserved)
        assert compartment not in box.state.free_parcel_compartments()
        done = wait_for(
            lambda: (r := http.get(path, headers=gls).json())["reserve_command"]["status"] == "succeeded" and r
        )
        assert done["status"] == "active"
        cancelled = http.delete(path, headers=gls).json()
        assert cancelled["release_command"]["command_id"] is not None
        wait_for(lambda: not box.state[compartment].reserved)
        wait_for(lambda: http.get(path, headers=gls).json()["release_command"]["status"] == "succeeded")
        assert compartment in box.state.free_parcel_compartments()
    finally:
        box.stop()


def test_hold_the_box_refuses_ends_as_rejected(
    http: httpx.Client,
    ingest: IngestWorker,
    broker: RunningBroker,
    credentials: Credentials,
    api_keys: dict[str, Headers],
    box_dirs: Path,
) -> None:
    """If the door was taken between the backend's reading and the box's (here: filled before any
    telemetry told the backend), the box rejects reserve_compartment and the reservation ends rejected."""
    box = _box(broker, credentials, "box-033", box_dirs)
    gls = api_keys["courier_gls"]
    try:
        first_c = next(c.id for c in box.state.layout.compartments if c.size_class is SizeClass.C)
        box.state.set_occupied(first_c, True, "P-SOMEONE-ELSE")  # no telemetry: the backend cannot know
        held = wait_for(lambda: (r := reserve(http, gls, "box-033", size_class="C")).status_code == 201 and r.json())
        assert held["compartment"] == first_c
        path = f"/api/v1/courier/reservations/{held['reservation_id']}"
        done = wait_for(lambda: (r := http.get(path, headers=gls).json())["status"] == "rejected" and r)
        assert done["reserve_command"]["status"] == "rejected"
        assert done["release_command"] is None
    finally:
        box.stop()


def test_hazardous_pickups_list_red_boxes_until_collected(
    http: httpx.Client,
    ingest: IngestWorker,
    broker: RunningBroker,
    credentials: Credentials,
    db: psycopg.Connection[Any],
    api_keys: dict[str, Headers],
    box_dirs: Path,
) -> None:
    """Waste deposited in a box's red box (real events through the broker) makes it a pickup with its
    weight and fractions; once the box's waste.collected event is ingested it drops off the list."""
    lat, lon = spot()
    box = _box(broker, credentials, "box-034", box_dirs)
    gls = api_keys["courier_gls"]
    try:
        wait_for(lambda: scalar(db, "SELECT layout IS NOT NULL FROM boxes WHERE box_id = 'box-034'"))
        db.execute("UPDATE boxes SET latitude = %s, longitude = %s WHERE box_id = 'box-034'", (lat, lon))
        box.state.add_waste(1, 0.4)
        box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=0.4))
        box.state.add_waste(1, 1.1)
        box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.SPRAY_CANS, weight_kg=1.1))

        def pickups() -> list[dict[str, Any]]:
            response = http.get("/api/v1/courier/waste-pickups", params={"lat": lat, "lon": lon}, headers=gls)
            assert response.status_code == 200, response.text
            boxes: list[dict[str, Any]] = response.json()["boxes"]
            return boxes

        listed = wait_for(lambda: (p := pickups()) and p[0]["red_boxes"][0]["deposits"] == 2 and p)
        assert [b["box_id"] for b in listed] == ["box-034"]
        red = listed[0]["red_boxes"][0]
        assert red["compartment"] == 1
        assert red["weight_kg"] == pytest.approx(1.5)
        assert red["fractions_kg"] == {"batteries": 0.4, "spray_cans": 1.1}
        assert red["capacity_kg"] == 4.0
        assert red["fill_ratio"] == pytest.approx(0.375)
        too_small = http.get(
            "/api/v1/courier/waste-pickups", params={"lat": lat, "lon": lon, "max_total_kg": 1.0}, headers=gls
        ).json()
        assert too_small["boxes"] == []  # the van's spare allowance is less than the box holds

        weight = box.state.empty_red_box(1)
        box.emit(WasteCollected(compartment=1, carrier="gls", weight_kg=round(weight, 3)))
        wait_for(lambda: pickups() == [])
    finally:
        box.stop()


def test_parcel_deposited_in_the_box_fulfils_the_reservation(
    http: httpx.Client,
    ingest: IngestWorker,
    broker: RunningBroker,
    credentials: Credentials,
    api_keys: dict[str, Headers],
    box_dirs: Path,
) -> None:
    """When the box reports the reserved parcel deposited (a real parcel.deposited event through the
    broker), the reservation ends as fulfilled; the box itself has already ended its hold."""
    box = _box(broker, credentials, "box-035", box_dirs)
    gls = api_keys["courier_gls"]
    try:
        held = wait_for(
            lambda: (r := reserve(http, gls, "box-035", parcel_id="P-FULFIL")).status_code == 201 and r.json()
        )
        compartment = held["compartment"]
        wait_for(lambda: box.state[compartment].reserved)
        box.state.set_occupied(compartment, True, "P-FULFIL")
        box.emit(ParcelDeposited(compartment=compartment, size_class=SizeClass.A, parcel_id="P-FULFIL", carrier="gls"))
        path = f"/api/v1/courier/reservations/{held['reservation_id']}"
        done = wait_for(lambda: (r := http.get(path, headers=gls).json())["status"] == "fulfilled" and r)
        assert done["ended_at"] is not None
        assert not box.state[compartment].reserved
    finally:
        box.stop()


# --------------------------------------------------------------------------- sweeps, expiry races, releases


def _insert_hold(
    db: psycopg.Connection[Any], box_id: str, compartment: int, *, expires_s: float, status: str = "active"
) -> str:
    """A hold stored as the API stores one; ``expires_s`` from now (negative: overdue)."""
    rid = str(uuid.uuid4())
    db.execute(
        """INSERT INTO reservations (reservation_id, box_id, compartment, size_class, carrier, parcel_id,
                                     created_by, status, created_at, expires_at)
           VALUES (%s, %s, %s, 'A', 'gls', %s, 'test', %s, now() - interval '2 hours',
                   now() + make_interval(secs => %s))""",
        (rid, box_id, compartment, f"P-{rid[:10]}", status, expires_s),
    )
    return rid


class SweepLockHeld:
    """Another sweep in progress: the sweep's advisory lock held in an open transaction."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(database_url)
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SWEEP_LOCK_KEY,))

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def test_a_busy_sweep_is_skipped_not_waited_for(
    http: httpx.Client, db: psycopg.Connection[Any], database_url: str, api_keys: dict[str, Headers]
) -> None:
    """While another sweep holds the sweep lock, courier calls skip their sweep instead of queueing
    behind it (no 503, no wait); the overdue hold still reads expired and is ended once the lock is free."""
    seed_box(db, "cou-busy", *spot())
    seed_box(db, "cou-busy-2", *spot())
    # The lock first: the API's periodic sweeper (every 0.3 s) ends a hold that is already overdue in
    # the moment before the lock is taken (3 of 50 repeated runs failed so, the two flavours together).
    busy = SweepLockHeld(database_url)
    gls = api_keys["courier_gls"]
    query = "SELECT status FROM reservations WHERE reservation_id = %s"
    try:
        rid = _insert_hold(db, "cou-busy", 3, expires_s=-5)
        started = time.monotonic()
        listed = http.get("/api/v1/courier/reservations", headers=gls, params={"box_id": "cou-busy"})
        assert listed.status_code == 200, listed.text
        assert time.monotonic() - started < 2.0
        assert [r["status"] for r in listed.json()] == ["expired"]
        assert reserve(http, gls, "cou-busy-2").status_code == 201
        assert db.execute(query, (rid,)).fetchone() == ("active",)  # no sweep ran
    finally:
        busy.release()
    wait_for(lambda: db.execute(query, (rid,)).fetchone() == ("expired",))


def test_a_hold_overdue_after_the_sweep_does_not_block_its_door(
    http: httpx.Client, db: psycopg.Connection[Any], database_url: str, api_keys: dict[str, Headers]
) -> None:
    """A hold that expired after the last sweep (still status active, as the unique index sees it) is
    ended inside the box's locked transaction: its door is held again (201), not 409 reservation_conflict."""
    lat, lon = spot()
    seed_box(db, "cou-overdue", lat, lon, layout=default_layout(a=1, b=0, c=0))
    old = _insert_hold(db, "cou-overdue", 3, expires_s=-1)
    busy = SweepLockHeld(database_url)  # no sweep gets to it first
    try:
        held = reserve(http, api_keys["courier_gls"], "cou-overdue")
        assert held.status_code == 201, held.text
        assert held.json()["compartment"] == 3
        assert db.execute("SELECT status FROM reservations WHERE reservation_id = %s", (old,)).fetchone() == (
            "expired",
        )
    finally:
        busy.release()


def test_reservations_under_concurrent_expiry_never_answer_5xx_or_a_spurious_conflict(
    courier_url: str, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """Sixteen couriers reserving and listing across ten boxes while holds keep expiring under them
    (the reviewer's stress3): every answer is 201, 200 or a precise refusal; no 5xx, no
    reservation_conflict."""
    boxes = [f"cou-stress-{i}" for i in range(10)]
    for box_id in boxes:
        seed_box(db, box_id, *spot())
    codes: collections.Counter[tuple[str, int, str]] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def courier(i: int) -> None:
        with httpx.Client(base_url=courier_url, timeout=60) as client:
            for k in range(10):
                r = reserve(client, api_keys["courier_gls"], boxes[(i + k) % len(boxes)], parcel_id=f"ST-{i}-{k}")
                listed = client.get(
                    "/api/v1/courier/reservations", headers=api_keys["courier_gls"], params={"limit": 5}
                )
                with lock:
                    codes["post", r.status_code, "" if r.status_code < 300 else _code(r)] += 1
                    codes["get", listed.status_code, ""] += 1

    def expirer() -> None:
        with psycopg.connect(db.info.dsn, autocommit=True) as conn:
            while not stop.is_set():
                with contextlib.suppress(psycopg.errors.DeadlockDetected):  # a stand-in for time: may lose one
                    conn.execute(
                        "UPDATE reservations SET created_at = now() - interval '2 minutes',"
                        " expires_at = now() - interval '1 second'"
                        " WHERE status = 'active' AND box_id LIKE 'cou-stress-%' AND random() < 0.5"
                    )
                time.sleep(0.02)

    background = threading.Thread(target=expirer)
    background.start()
    threads = [threading.Thread(target=courier, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        background.join()
    assert sum(codes.values()) == 16 * 10 * 2
    unexpected = {k: n for k, n in codes.items() if k not in {("post", 201, ""), ("get", 200, "")}}
    assert set(unexpected) <= {("post", 409, "locker_is_full"), ("post", 409, "no_free_fitting_compartment")}, codes
    assert codes["post", 201, ""] > 0


@pytest.mark.parametrize(("attempts", "expected"), [(5, (201, "")), (1, (503, "database_busy"))])
def test_a_hold_that_loses_a_real_deadlock_is_retried_and_only_then_database_busy(
    attempts: int,
    expected: tuple[int, str],
    http: httpx.Client,
    db: psycopg.Connection[Any],
    database_url: str,
    api_keys: dict[str, Headers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer that locks the box's overdue hold and then the box's hold lock (the opposite order of
    the API's hold transaction) deadlocks with a reservation for real: PostgreSQL aborts the API's
    transaction (its deadlock_timeout runs out first), which retries and takes the door; with no
    attempt left the answer is 503 ``database_busy``, not ``database_unavailable``."""
    monkeypatch.setattr(courier_service, "ATTEMPTS", attempts)
    box_id = f"cou-deadlock-{attempts}"
    seed_box(db, box_id, *spot(), layout=default_layout(a=1, b=0, c=0))
    overdue = _insert_hold(db, box_id, 3, expires_s=-1)
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    before = scalar(db, deadlocks)
    busy = SweepLockHeld(database_url)  # no sweep ends the overdue hold first
    other = psycopg.connect(database_url)
    answers: list[httpx.Response] = []
    try:
        other.execute("SET deadlock_timeout = '20s'")  # the API's (1 s) runs out first: the API is the victim
        other.execute("SELECT 1 FROM reservations WHERE reservation_id = %s FOR UPDATE", (overdue,))
        client = threading.Thread(target=lambda: answers.append(reserve(http, api_keys["courier_gls"], box_id)))
        client.start()
        waiting = """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                     AND wait_event_type = 'Lock' AND query LIKE '%%reservations%%' AND pid <> %s"""
        wait_for(lambda: scalar(db, waiting, (other.info.backend_pid,)) == 1, timeout=10)
        # The API holds the box's hold lock and waits for our row; now we wait for its lock: a cycle.
        other.execute("SELECT pg_advisory_xact_lock(hashtext('molo.reservations'), hashtext(%s))", (box_id,))
        other.rollback()
        client.join(30)
    finally:
        other.close()
        busy.release()
    assert len(answers) == 1
    answer = answers[0]
    assert (answer.status_code, "" if answer.status_code < 300 else _code(answer)) == expected, answer.text
    if answer.status_code == 201:
        assert answer.json()["compartment"] == 3  # the overdue hold was ended in the retried transaction
    wait_for(lambda: scalar(db, deadlocks) > before, timeout=10)  # it was a deadlock PostgreSQL detected


@pytest.fixture
def courier_no_broker(database_url: str, broker: RunningBroker, credentials: Credentials) -> Iterator[str]:
    """The API with its broker unreachable (nothing listens on its MQTT port) and no periodic sweep."""
    settings = settings_for(
        database_url,
        broker,
        credentials,
        mqtt_port=free_port(),
        heartbeat_timeout_s=60.0,
        reservation_sweep_interval_s=0,
    )
    server = ApiServer(create_app(settings)).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_requests_only_mark_holds_ended_and_the_sweeper_sends_the_releases(
    courier_no_broker: str, courier_url: str, db: psycopg.Connection[Any], api_keys: dict[str, Headers]
) -> None:
    """With the broker down, listing reservations ends five overdue holds at once without sending
    anything, and a cancel fails its release fast; the sweeper of an API with the broker then sends
    all six releases (one attempt each)."""
    seed_box(db, "cou-nobroker", *spot())
    gls = api_keys["courier_gls"]
    overdue = [_insert_hold(db, "cou-nobroker", door, expires_s=-1) for door in range(3, 8)]
    live = _insert_hold(db, "cou-nobroker", 8, expires_s=3600)
    with httpx.Client(base_url=courier_no_broker, timeout=20, headers=gls) as down:
        started = time.monotonic()
        listed = down.get("/api/v1/courier/reservations", params={"box_id": "cou-nobroker"})
        assert listed.status_code == 200, listed.text
        assert time.monotonic() - started < 1.5
        rows = db.execute("SELECT status FROM reservations WHERE reservation_id = ANY(%s::uuid[])", (overdue,))
        assert rows.fetchall() == [("expired",)] * 5
        # this API would have recorded any release it tried as failed (the module API's sweeper,
        # with the broker, may already be sending them: those read sent)
        tried = "SELECT count(*) FROM commands WHERE box_id = 'cou-nobroker' AND status = 'failed'"
        assert db.execute(tried).fetchone() == (0,)
        started = time.monotonic()
        cancelled = down.delete(f"/api/v1/courier/reservations/{live}")
        assert cancelled.status_code == 200, cancelled.text
        assert time.monotonic() - started < 1.5
        assert cancelled.json()["release_command"]["status"] == "failed"
        assert db.execute(tried).fetchone() == (1,)
    query = """SELECT count(*) FROM reservations r JOIN commands c ON c.command_id = r.release_command_id
               WHERE r.reservation_id = ANY(%s::uuid[]) AND c.action = 'release_compartment'
                 AND c.status <> 'failed' AND r.release_attempts = 1"""
    wait_for(lambda: db.execute(query, ([*overdue, live],)).fetchone() == (6,))


def test_releases_are_resent_a_bounded_number_of_times_and_never_over_a_newer_hold(
    courier_url: str, db: psycopg.Connection[Any]
) -> None:
    """An ended hold whose release timed out is re-sent until its attempts (3 here) are spent, then
    left alone; a hold whose door was taken again by a newer hold gets no release at all."""
    seed_box(db, "cou-retry", *spot())
    rid = _insert_hold(db, "cou-retry", 3, expires_s=-1, status="expired")
    db.execute("UPDATE reservations SET ended_at = expires_at WHERE reservation_id = %s", (rid,))
    newer = _insert_hold(db, "cou-retry", 4, expires_s=3600)  # first: the older one is never due unheld
    superseded = _insert_hold(db, "cou-retry", 4, expires_s=-1, status="expired")
    db.execute("UPDATE reservations SET ended_at = expires_at WHERE reservation_id = %s", (superseded,))
    db.execute("UPDATE reservations SET created_at = now() WHERE reservation_id = %s", (newer,))
    state = "SELECT release_attempts, release_command_id FROM reservations WHERE reservation_id = %s"

    def sent(attempt: int, previous: Any) -> Any:
        """The release command of ``attempt``, once linked (the attempt is counted before it is sent)."""
        row = db.execute(state, (rid,)).fetchone()
        return row is not None and row[0] == attempt and row[1] not in (None, previous) and row[1]

    command = None
    for attempt in (1, 2, 3):
        command = wait_for(lambda: sent(attempt, command))  # noqa: B023 (called at once, inside this iteration)
        db.execute("UPDATE commands SET status = 'timed_out' WHERE command_id = %s", (command,))
    time.sleep(1.5)  # five sweeps and retry pauses of 0.2-0.8 s: a fourth attempt would have been made
    assert db.execute(state, (rid,)).fetchone() == (3, command)
    assert db.execute(state, (superseded,)).fetchone() == (0, None)


def test_a_cancel_sends_no_release_over_a_newer_hold_on_the_door(
    http: httpx.Client, db: psycopg.Connection[Any], database_url: str, api_keys: dict[str, Headers]
) -> None:
    """A cancel sends its release under the box's hold lock: if a newer hold took the door first
    (here: while another session held that lock), the cancel sends no release that would free it."""
    seed_box(db, "cou-cancel-race", *spot(), layout=default_layout(a=1, b=0, c=0))
    gls = api_keys["courier_gls"]
    held = reserve(http, gls, "cou-cancel-race").json()
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('molo.reservations'), hashtext('cou-cancel-race'))")
        answers: list[httpx.Response] = []
        cancelling = threading.Thread(
            target=lambda: answers.append(
                http.delete(f"/api/v1/courier/reservations/{held['reservation_id']}", headers=gls)
            )
        )
        cancelling.start()
        state = "SELECT status FROM reservations WHERE reservation_id = %s"
        wait_for(lambda: db.execute(state, (held["reservation_id"],)).fetchone() == ("cancelled",))
        newer = _insert_hold(db, "cou-cancel-race", 3, expires_s=3600)  # the reserve that got the lock first
        other.execute("SELECT pg_advisory_unlock(hashtext('molo.reservations'), hashtext('cou-cancel-race'))")
        cancelling.join(20)
    (cancelled,) = answers
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["release_command"] is None
    releases = "SELECT count(*) FROM commands WHERE box_id = 'cou-cancel-race' AND action = 'release_compartment'"
    time.sleep(1.0)  # three periodic sweeps: the sweeper does not send it either
    assert db.execute(releases).fetchone() == (0,)
    assert db.execute(state, (newer,)).fetchone() == ("active",)
