"""Operations (issue 5) end to end: alerts from real events through Mosquitto and ingest, their
acknowledgement, commands through the broker to a firmware stub and back, and the live stream.

Real Mosquitto (broker_config) and PostgreSQL, never mocked. Boxes box-064 .. box-075 belong to
this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from backend.access.keys import NewKey, Role
from backend.access.repository import revoke_key
from backend.api.app import create_app
from backend.api.schemas import BoxSummary
from backend.api.server import ApiServer
from backend.ingest.mqtt import Received
from backend.ingest.worker import IngestWorker
from backend.ingest.writer import BatchWriter
from backend.operations.alerts import AlertEngine, OpsBatch
from backend.operations.commands import CommandRequest, CommandSender, send_command
from backend.settings import Settings
from contract import MessageKind, SizeClass, WasteFraction, default_layout, encode, make_event, topic_for
from contract.messages import (
    CommandAck,
    CommandAction,
    CommandResult,
    DoorClosed,
    DoorLeftOpen,
    EventPayload,
    ParcelCollected,
    ParcelDeposited,
    PowerSource,
    Status,
    StatusReason,
    WasteCollected,
    WasteDeposited,
)
from firmware_stub.box import BoxFirmware
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import Credentials
from tests.fixtures.broker import close, mqtt_client, publish
from tests.fixtures.keys import Headers, headers
from tests.fixtures.pipeline import settings_for, wait_for

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR_MS = 3_600_000


@pytest.fixture
def ops_api(
    database_url: str, broker: RunningBroker, credentials: Credentials, api_keys: dict[str, Headers]
) -> Iterator[httpx.Client]:
    """The API with its broker connection (commands), as an operator."""
    settings = settings_for(database_url, broker, credentials, heartbeat_timeout_s=30.0)
    server = ApiServer(create_app(settings)).start()
    with httpx.Client(base_url=server.url, timeout=10, headers=api_keys["operator"]) as client:
        yield client
    server.stop()


@pytest.fixture
def ops_ingest(start_ingest: Callable[..., IngestWorker]) -> IngestWorker:
    """An ingest worker sweeping every 0.2 s (heartbeat timeout 30 s: idle stub boxes stay online)."""
    return start_ingest(monitor_interval_s=0.2, heartbeat_timeout_s=30.0)


def firmware(broker: RunningBroker, credentials: Credentials, box_id: str, state: Path, **kw: Any) -> BoxFirmware:
    box = BoxFirmware(box_id, credentials.boxes[box_id], broker.host, broker.port, state / box_id, keepalive=2, **kw)
    box.start()
    assert box.wait_connected(10), f"{box_id} did not connect"
    return box


def alerts(api: httpx.Client, box_id: str, **params: Any) -> list[dict[str, Any]]:
    response = api.get("/api/v1/alerts", params={"box_id": box_id, **params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def open_alert(api: httpx.Client, box_id: str, kind: str) -> dict[str, Any] | None:
    found = [a for a in alerts(api, box_id, state="open") if a["kind"] == kind]
    assert len(found) <= 1, f"more than one open {kind} alert: {found}"
    return found[0] if found else None


def cleared(api: httpx.Client, box_id: str, kind: str) -> list[dict[str, Any]]:
    return [a for a in alerts(api, box_id, state="cleared") if a["kind"] == kind]


def listed(api: httpx.Client, box_id: str) -> dict[str, Any]:
    """The box as GET /api/v1/boxes lists it."""
    return next(b for b in api.get("/api/v1/boxes").json() if b["box_id"] == box_id)


def online(api: httpx.Client, box_id: str) -> bool:
    response = api.get(f"/api/v1/boxes/{box_id}")
    return response.status_code == 200 and response.json()["online"] is True


# --------------------------------------------------------------------------- alerts from real events


def test_killed_box_raises_offline_alert_and_its_return_clears_it(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """A box killed without DISCONNECT gets an open box_offline alert from its Last Will; started
    again, its birth (newer session) clears it, and the box list shows no open alert."""
    box = firmware(broker, credentials, "box-064", tmp_path)
    wait_for(lambda: online(ops_api, "box-064"))
    assert open_alert(ops_api, "box-064", "box_offline") is None
    box.kill()
    alert = wait_for(lambda: open_alert(ops_api, "box-064", "box_offline"))
    assert alert["details"]["reason"] == "connection_lost"
    assert alert["severity"] == "critical"
    assert "connection_lost" in alert["raised_by"]
    listed = {b["box_id"]: b for b in ops_api.get("/api/v1/boxes").json()}
    assert listed["box-064"]["open_alerts"] == 1
    assert listed["box-064"]["open_alert_kinds"] == ["box_offline"]
    again = firmware(broker, credentials, "box-064", tmp_path)
    try:
        wait_for(lambda: open_alert(ops_api, "box-064", "box_offline") is None)
        done = [a for a in cleared(ops_api, "box-064", "box_offline") if a["id"] == alert["id"]]
        assert len(done) == 1
        assert done[0]["cleared_by"] == f"status birth session {again.session}"
        assert done[0]["cleared_at"] >= done[0]["raised_at"]
        detail = ops_api.get("/api/v1/boxes/box-064").json()
        assert detail["online"] is True
        assert detail["open_alerts"] == 0
        assert detail["alerts"] == []
    finally:
        again.stop()


#: The fields GET /api/v1/box-status shares with GET /api/v1/boxes.
STATUS_FIELDS = (
    "box_id",
    "online",
    "status_reason",
    "status_since",
    "session",
    "last_seen_at",
    "last_received_at",
    "last_seq",
    "maintenance",
    "open_alerts",
    "alert_level",
)


def test_box_status_says_what_the_box_list_says_in_fewer_bytes(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """GET /api/v1/box-status gives every box's status, session and alert level exactly as the box list
    does -- one box online, one killed (Last Will, open critical alert) -- in a fraction of the bytes,
    and ?online=true / false split the boxes between them."""
    up = firmware(broker, credentials, "box-094", tmp_path)
    down = firmware(broker, credentials, "box-095", tmp_path)
    try:
        up.telemetry()
        wait_for(lambda: online(ops_api, "box-094") and online(ops_api, "box-095"))
        down.kill()
        wait_for(lambda: open_alert(ops_api, "box-095", "box_offline"))
        response = ops_api.get("/api/v1/box-status")
        assert response.status_code == 200, response.text
        statuses = {s["box_id"]: s for s in response.json()}
        full = ops_api.get("/api/v1/boxes")
        boxes = {b["box_id"]: b for b in full.json()}
        assert set(statuses) == set(boxes)
        for box_id, box in boxes.items():
            assert statuses[box_id] == {field: box[field] for field in STATUS_FIELDS}, box_id
        assert statuses["box-094"]["online"] is True
        assert statuses["box-094"]["session"] == up.session
        assert (
            statuses["box-095"] | {"online": False, "status_reason": "connection_lost", "alert_level": "critical"}
            == (statuses["box-095"])
        )
        assert len(response.content) < len(full.content) / 2
        on = {s["box_id"] for s in ops_api.get("/api/v1/box-status", params={"online": "true"}).json()}
        off = {s["box_id"] for s in ops_api.get("/api/v1/box-status", params={"online": "false"}).json()}
        assert "box-094" in on
        assert "box-095" in off
        assert on | off == set(statuses)
        assert not on & off
        assert ops_api.get("/api/v1/box-status", params={"online": "maybe"}).json()["error"]["code"] == (
            "invalid_request"
        )
    finally:
        up.stop()


def test_box_list_says_what_each_box_detail_says_and_pages_by_id(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """The box list (written straight to JSON) gives every box exactly the fields and values its
    detail (built through the pydantic model) gives -- a box with telemetry and waste in a red box,
    one killed with an open alert --; pages of two, followed by their ``Link: rel=next``, add up to
    the whole list in order; a bad page size or cursor is a 422 ``invalid_request``."""
    full_box = firmware(broker, credentials, "box-092", tmp_path)
    dead = firmware(broker, credentials, "box-093", tmp_path)
    try:
        wait_for(lambda: online(ops_api, "box-092") and online(ops_api, "box-093"))
        full_box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=1.4))
        full_box.telemetry(temperature_c=7.5, power=PowerSource.BATTERY, battery_pct=81.0)
        wait_for(lambda: listed(ops_api, "box-092")["red_boxes"][0]["deposits"] == 1)
        wait_for(lambda: listed(ops_api, "box-092")["temperature_c"] == 7.5)
        dead.kill()
        wait_for(lambda: open_alert(ops_api, "box-093", "box_offline"))
        full_box.stop()  # no heartbeat moves its times between the list and the details
        wait_for(lambda: listed(ops_api, "box-092")["status_reason"] == "shutdown")
        everything = ops_api.get("/api/v1/boxes")
        assert everything.status_code == 200, everything.text
        assert "link" not in everything.headers
        boxes = everything.json()
        ids = [b["box_id"] for b in boxes]
        assert ids == sorted(ids)
        assert len(ids) >= 4
        for box in boxes:
            detail = ops_api.get(f"/api/v1/boxes/{box['box_id']}").json()
            assert box == {field: detail[field] for field in BoxSummary.model_fields}, box["box_id"]
        by_id = {b["box_id"]: b for b in boxes}
        assert by_id["box-092"]["red_boxes"][0]["fractions_kg"] == {"batteries": 1.4}
        assert by_id["box-092"]["battery_pct"] == 81.0
        assert by_id["box-093"]["alert_level"] == "critical"
        pages: list[list[dict[str, Any]]] = []
        url: str | None = "/api/v1/boxes?limit=2"
        while url is not None:
            page = ops_api.get(url)
            assert page.status_code == 200, page.text
            pages.append(page.json())
            url = page.links.get("next", {}).get("url")
        assert all(len(p) == 2 for p in pages[:-1])
        assert 1 <= len(pages[-1]) <= 2
        assert [b for p in pages for b in p] == boxes  # every box stopped: nothing moves meanwhile
        after = ops_api.get("/api/v1/boxes", params={"after": "box-092", "limit": 1}).json()
        assert [b["box_id"] for b in after] == [i for i in ids if i > "box-092"][:1]
        beyond = ops_api.get("/api/v1/boxes", params={"after": ids[-1], "limit": 5})
        assert beyond.json() == []
        assert "link" not in beyond.headers
        for params in ({"limit": 0}, {"limit": 1001}, {"after": "no such id!"}):
            refused = ops_api.get("/api/v1/boxes", params=params)
            assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_request"), params
    finally:
        full_box.stop()


def test_silent_box_gets_heartbeat_alert_and_clears_when_heard(
    broker: RunningBroker,
    credentials: Credentials,
    start_ingest: Callable[..., IngestWorker],
    ops_api: httpx.Client,
) -> None:
    """A box whose connection stays up but sends nothing past the heartbeat timeout gets a
    box_offline alert (heartbeat_timeout) from the sweep; its next telemetry clears it."""
    start_ingest(monitor_interval_s=0.2, heartbeat_timeout_s=1.0)
    box_id = "box-065"
    client = mqtt_client(broker, box_id, credentials.boxes[box_id])
    try:
        status = Status(
            v=1, box_id=box_id, online=True, session=1, reason=StatusReason.BIRTH, ts_ms=T0, layout=default_layout()
        )
        assert not publish(client, topic_for(box_id, MessageKind.STATUS), encode(status)).is_failure
        alert = wait_for(lambda: open_alert(ops_api, box_id, "box_offline"), timeout=15)
        assert alert["details"]["reason"] == "heartbeat_timeout"
        assert alert["raised_by"].startswith("sweep: nothing received since")
        assert alert["raised_ts"] == "2026-01-01T00:00:00Z"  # last heard (its birth), by the box's clock
        telemetry = make_event(
            box_id=box_id,
            seq=1,
            session=1,
            ts_ms=T0 + 1000,
            payload=_telemetry(temperature_c=12.0),
        )
        assert not publish(client, topic_for(box_id, MessageKind.TELEMETRY), encode(telemetry)).is_failure
        wait_for(lambda: any(a["id"] == alert["id"] for a in cleared(ops_api, box_id, "box_offline")))
        assert [a["cleared_by"] for a in cleared(ops_api, box_id, "box_offline")] == ["heard from again"]
    finally:
        close(client)


def _telemetry(temperature_c: float, red_box_kg: float = 0.0, occupied: int = 0) -> EventPayload:
    from contract.messages import CompartmentReading, PowerSource, RedBoxReading, Telemetry

    layout = default_layout()
    return Telemetry(
        power=PowerSource.MAINS,
        temperature_c=temperature_c,
        compartments=[
            CompartmentReading(id=c.id, occupied=i < occupied) for i, c in enumerate(layout.parcel_compartments)
        ],
        red_boxes=[RedBoxReading(compartment=c.id, weight_kg=red_box_kg) for c in layout.red_boxes],
    )


def test_door_left_open_raises_is_acknowledged_and_door_closed_clears(
    broker: RunningBroker,
    credentials: Credentials,
    ops_ingest: IngestWorker,
    ops_api: httpx.Client,
    api_keys: dict[str, Headers],
    tmp_path: Path,
) -> None:
    """door.left_open raises a door_left_open alert for that door; an operator acknowledges it once
    (409 alert_already_acknowledged after, 404 alert_not_found for no such alert, 403 for a
    researcher); door.closed clears it, naming the event."""
    box = firmware(broker, credentials, "box-066", tmp_path)
    try:
        seq = box.emit(DoorLeftOpen(compartment=5, open_s=180))
        alert = wait_for(lambda: open_alert(ops_api, "box-066", "door_left_open"))
        assert alert["subject"] == "5"
        assert alert["compartment"] == 5
        assert alert["raised_by"] == f"event door.left_open seq {seq}"
        assert alert["details"] == {"open_s": 180}
        assert alert["acknowledged_at"] is None
        assert alert["severity"] == "critical"
        assert listed(ops_api, "box-066")["alert_level"] == "critical"

        refused = ops_api.post(f"/api/v1/alerts/{alert['id']}/ack", headers=api_keys["researcher"])
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden_role"
        assert alerts(ops_api, "box-066", acknowledged="true") == []
        acked = ops_api.post(f"/api/v1/alerts/{alert['id']}/ack")
        assert acked.status_code == 200, acked.text
        body = acked.json()
        assert body["acknowledged_at"] is not None
        assert body["acknowledged_by"].startswith("test operator")
        assert body["open"] is True  # acknowledged is not cleared: the door is still open
        again = ops_api.post(f"/api/v1/alerts/{alert['id']}/ack")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "alert_already_acknowledged"
        assert again.json()["error"]["details"]["acknowledged_by"] == body["acknowledged_by"]
        assert [a["id"] for a in alerts(ops_api, "box-066", acknowledged="true")] == [alert["id"]]
        assert alerts(ops_api, "box-066", acknowledged="false") == []
        missing = ops_api.post("/api/v1/alerts/999999999/ack")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "alert_not_found"
        assert ops_api.get(f"/api/v1/alerts/{alert['id']}", headers=api_keys["researcher"]).status_code == 200

        closed = box.emit(DoorClosed(compartment=5))
        wait_for(lambda: open_alert(ops_api, "box-066", "door_left_open") is None)
        (done,) = cleared(ops_api, "box-066", "door_left_open")
        assert done["id"] == alert["id"]
        assert done["cleared_by"] == f"event door.closed seq {closed}"
    finally:
        box.stop()


def test_stale_door_closed_does_not_clear_a_newer_alert(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client
) -> None:
    """A door.closed older (by seq) than the door.left_open that raised an alert clears nothing; a
    newer one does. A late door.left_open older than a stored door.closed raises nothing, and a
    redelivered one raises no second alert."""
    box_id = "box-067"
    client = mqtt_client(broker, box_id, credentials.boxes[box_id])

    def send(seq: int, payload: EventPayload) -> None:
        event = make_event(box_id=box_id, seq=seq, session=1, ts_ms=T0 + seq * 1000, payload=payload)
        assert not publish(client, topic_for(box_id, MessageKind.EVENTS), encode(event)).is_failure

    try:
        send(5, DoorLeftOpen(compartment=6, open_s=120))
        alert = wait_for(lambda: open_alert(ops_api, box_id, "door_left_open"))
        send(5, DoorLeftOpen(compartment=6, open_s=120))  # redelivered: stored once, raises nothing new
        send(4, DoorClosed(compartment=6))  # stale: before the left_open
        wait_for(lambda: len(ops_api.get(f"/api/v1/boxes/{box_id}/events").json()["items"]) == 2)
        still = open_alert(ops_api, box_id, "door_left_open")
        assert still is not None
        assert still["id"] == alert["id"]
        send(6, DoorClosed(compartment=6))
        wait_for(lambda: open_alert(ops_api, box_id, "door_left_open") is None)
        send(3, DoorLeftOpen(compartment=6, open_s=60))  # late, and older than the stored door.closed
        wait_for(lambda: len(ops_api.get(f"/api/v1/boxes/{box_id}/events").json()["items"]) == 4)
        assert open_alert(ops_api, box_id, "door_left_open") is None
        assert len(alerts(ops_api, box_id, kind="door_left_open")) == 1
    finally:
        close(client)


def test_red_box_near_then_at_limit_then_collected(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """Deposits filling a red box to 85% raise red_box_near_limit, past 100% also red_box_at_limit;
    the box detail shows the fill and fraction mix; waste.collected clears both and empties it."""
    box = firmware(broker, credentials, "box-068", tmp_path)
    try:
        box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=1.4))
        box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.SPRAY_CANS, weight_kg=2.0))
        near = wait_for(lambda: open_alert(ops_api, "box-068", "red_box_near_limit"))
        assert near["subject"] == "1"
        assert near["details"]["weight_kg"] == pytest.approx(3.4)
        assert near["details"]["capacity_kg"] == 4.0
        assert near["severity"] == "warning"
        assert listed(ops_api, "box-068")["alert_level"] == "warning"
        assert open_alert(ops_api, "box-068", "red_box_at_limit") is None
        red = {r["compartment"]: r for r in ops_api.get("/api/v1/boxes/box-068").json()["red_boxes"]}
        assert red[1]["deposited_kg"] == pytest.approx(3.4)
        assert red[1]["deposits"] == 2
        assert red[1]["fractions_kg"] == {"batteries": pytest.approx(1.4), "spray_cans": pytest.approx(2.0)}
        assert red[2]["deposited_kg"] == 0.0
        box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.PAINT, weight_kg=0.8))
        full = wait_for(lambda: open_alert(ops_api, "box-068", "red_box_at_limit"))
        assert full["severity"] == "critical"
        assert listed(ops_api, "box-068")["alert_level"] == "critical"  # the highest open one
        assert open_alert(ops_api, "box-068", "red_box_near_limit")["id"] == near["id"]  # type: ignore[index]
        box.emit(WasteCollected(compartment=1, carrier="gls", weight_kg=4.2))
        wait_for(lambda: not [a for a in alerts(ops_api, "box-068", state="open") if a["kind"].startswith("red_box")])
        assert {a["id"] for a in alerts(ops_api, "box-068", state="cleared")} == {near["id"], full["id"]}
        red = {r["compartment"]: r for r in ops_api.get("/api/v1/boxes/box-068").json()["red_boxes"]}
        assert red[1]["deposited_kg"] == 0.0
        assert red[1]["fractions_kg"] == {}
        assert red[1]["collected_ts"] is not None
    finally:
        box.stop()


def test_temperature_out_of_range_raises_and_clears_with_hysteresis(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """Telemetry above 45 °C raises a critical temperature alert; 44 °C (inside the 2 °C hysteresis)
    keeps it open; 20 °C clears it."""
    box = firmware(broker, credentials, "box-069", tmp_path)
    try:
        box.telemetry(temperature_c=52.0)
        alert = wait_for(lambda: open_alert(ops_api, "box-069", "temperature_out_of_range"))
        assert alert["severity"] == "critical"
        assert alert["details"]["direction"] == "high"
        assert alert["details"]["temperature_c"] == 52.0
        seq = box.telemetry(temperature_c=44.0)
        wait_for(lambda: ops_api.get("/api/v1/boxes/box-069").json()["telemetry"]["seq"] == seq)
        assert open_alert(ops_api, "box-069", "temperature_out_of_range") is not None
        last = box.telemetry(temperature_c=20.0)
        wait_for(lambda: open_alert(ops_api, "box-069", "temperature_out_of_range") is None)
        (done,) = cleared(ops_api, "box-069", "temperature_out_of_range")
        assert done["cleared_by"] == f"telemetry seq {last}"
    finally:
        box.stop()


def test_parcel_near_expiry_by_the_box_clock_and_collection_clears(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """A parcel not collected 61 h after deposit by the box's clock (72 h window, 12 h margin) gets
    a parcel_near_expiry alert from the sweep; at 59 h it has none; its collection clears it."""
    now = [T0]
    box = firmware(broker, credentials, "box-070", tmp_path, clock=lambda: now[0])
    try:
        box.emit(ParcelDeposited(compartment=7, size_class=SizeClass.A, parcel_id="NX-1", carrier="gls"))
        now[0] = T0 + 59 * HOUR_MS
        seq = box.telemetry()
        wait_for(lambda: ops_api.get("/api/v1/boxes/box-070").json().get("last_seq") == seq)
        assert open_alert(ops_api, "box-070", "parcel_near_expiry") is None
        now[0] = T0 + 61 * HOUR_MS
        box.telemetry()
        alert = wait_for(lambda: open_alert(ops_api, "box-070", "parcel_near_expiry"))
        assert alert["subject"] == "NX-1"
        assert alert["compartment"] == 7
        assert alert["details"]["carrier"] == "gls"
        # Routine, by the severity policy: listed with the box's alerts, but it does not colour the box.
        assert alert["severity"] == "info"
        assert listed(ops_api, "box-070")["open_alert_kinds"] == ["parcel_near_expiry"]
        assert listed(ops_api, "box-070")["alert_level"] is None
        box.emit(ParcelCollected(compartment=7, parcel_id="NX-1"))
        wait_for(lambda: open_alert(ops_api, "box-070", "parcel_near_expiry") is None)
        (done,) = cleared(ops_api, "box-070", "parcel_near_expiry")
        assert done["cleared_by"].startswith("event parcel.collected seq ")
    finally:
        box.stop()


def test_times_are_the_boxes_clock_with_the_received_time_beside(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """A box whose clock reads 2026-01-01 (as in simulation) while the backend's reads today: its status
    since and its alert's raised_ts are the box's time, the received times the backend's; after a Last
    Will (which carries no time) the status and the offline alert are dated by the box's last
    message."""
    now = [T0]
    box = firmware(broker, credentials, "box-079", tmp_path, clock=lambda: now[0])
    try:
        wait_for(lambda: online(ops_api, "box-079"))
        shown = listed(ops_api, "box-079")
        assert shown["status_since"] == "2026-01-01T00:00:00Z"
        assert shown["status_received_at"] is not None
        assert shown["status_received_at"] > "2026-06"  # the backend's own clock: today, not the box's
        now[0] = T0 + 5 * HOUR_MS
        box.emit(DoorLeftOpen(compartment=3, open_s=200))
        alert = wait_for(lambda: open_alert(ops_api, "box-079", "door_left_open"))
        assert alert["raised_ts"] == "2026-01-01T05:00:00Z"
        assert alert["raised_at"] > "2026-06"
        box.kill()
        wait_for(lambda: not online(ops_api, "box-079"))
        gone = listed(ops_api, "box-079")
        assert gone["status_reason"] == "connection_lost"
        assert gone["status_since"] == gone["last_seen_at"] == "2026-01-01T05:00:00Z"  # last heard, box time
        assert gone["status_received_at"] > "2026-06"
        offline = wait_for(lambda: open_alert(ops_api, "box-079", "box_offline"))
        assert offline["raised_ts"] == "2026-01-01T05:00:00Z"  # the will carries no time: last heard
        assert offline["raised_at"] > "2026-06"
    finally:
        box.stop()


def test_history_buckets_a_boxs_telemetry_by_its_clock(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """Five readings over three hours of the box's clock come back as three hourly buckets with the
    doors occupied (mean, max), the fullest red box and the temperature (mean, min, max); a range
    backwards, too many buckets and an unknown box get precise errors."""
    now = [T0]
    box = firmware(broker, credentials, "box-080", tmp_path, clock=lambda: now[0])
    readings = [(0, 10.0, 0.5, 2), (30, 12.0, 0.7, 4), (60, 20.0, 1.0, 4), (90, 22.0, 1.2, 6), (150, -3.0, 0.1, 0)]
    try:
        wait_for(lambda: online(ops_api, "box-080"))
        for minute, temperature, kg, occupied in readings:
            now[0] = T0 + minute * 60_000
            seq = box.emit(_telemetry(temperature, red_box_kg=kg, occupied=occupied))
        wait_for(lambda: listed(ops_api, "box-080")["last_seq"] == seq)
        got = ops_api.get(
            "/api/v1/boxes/box-080/history",
            params={"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T03:00:00Z", "bucket": "1h"},
        )
        assert got.status_code == 200, got.text
        items = got.json()["items"]
        assert [b["start"] for b in items] == ["2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"]
        first, second, third = items
        assert (first["readings"], first["occupied_mean"], first["occupied_max"]) == (2, 3.0, 4)
        assert (first["temperature_mean_c"], first["temperature_min_c"], first["temperature_max_c"]) == (
            11.0,
            10.0,
            12.0,
        )
        assert first["red_box_max_kg"] == pytest.approx(0.7)
        assert (second["readings"], second["occupied_mean"], second["temperature_max_c"]) == (2, 5.0, 22.0)
        assert second["red_box_max_kg"] == pytest.approx(1.2)
        assert (third["readings"], third["occupied_max"], third["temperature_min_c"]) == (1, 0, -3.0)
    finally:
        box.stop()
    base = {"since": "2026-01-01T03:00:00Z", "until": "2026-01-01T00:00:00Z"}
    backwards = ops_api.get("/api/v1/boxes/box-080/history", params=base)
    assert backwards.status_code == 400
    assert backwards.json()["error"]["code"] == "invalid_range"
    many = ops_api.get(
        "/api/v1/boxes/box-080/history", params={"since": "2025-01-01", "until": "2026-01-01", "bucket": "5m"}
    )
    assert many.status_code == 400
    assert many.json()["error"]["details"] == {"max_buckets": 2000}
    missing = ops_api.get("/api/v1/boxes/box-999/history", params={"since": "2026-01-01", "until": "2026-01-02"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "box_not_found"


# --------------------------------------------------------------------------- commands


def wait_command(api: httpx.Client, command_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (c := api.get(f"/api/v1/commands/{command_id}").json())["status"] == status and c, timeout
    )
    return result


def test_command_round_trip_through_the_broker_to_a_firmware_stub(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """open_compartment goes through Mosquitto to the firmware stub, which opens the door and
    acknowledges; ingest records it succeeded. set_maintenance succeeded shows the box in maintenance."""
    box = firmware(broker, credentials, "box-071", tmp_path)
    try:
        wait_for(lambda: online(ops_api, "box-071"))
        response = ops_api.post("/api/v1/boxes/box-071/commands", json={"action": "open_compartment", "compartment": 5})
        assert response.status_code == 202, response.text
        sent = response.json()
        assert sent["status"] in ("sent", "succeeded")
        assert sent["requested_by"].startswith("test operator")
        done = wait_command(ops_api, sent["command_id"], "succeeded")
        assert done["detail"] == "compartment 5 opened"
        assert done["acked_at"] is not None
        assert done["sent_at"] is not None
        assert box.state[5].door_open is True
        events = wait_for(
            lambda: [
                e for e in ops_api.get("/api/v1/boxes/box-071/events").json()["items"] if e["type"] == "door.opened"
            ]
        )
        assert events[0]["payload"] == {"compartment": 5}
        listed = ops_api.get("/api/v1/boxes/box-071/commands").json()
        assert [c["command_id"] for c in listed] == [sent["command_id"]]
        assert ops_api.get("/api/v1/boxes/box-071").json()["maintenance"] is False
        maint = ops_api.post("/api/v1/boxes/box-071/commands", json={"action": "set_maintenance", "enabled": True})
        assert maint.status_code == 202, maint.text
        wait_command(ops_api, maint.json()["command_id"], "succeeded")
        assert box.state.maintenance is True
        detail = wait_for(lambda: (d := ops_api.get("/api/v1/boxes/box-071").json())["maintenance"] and d)
        assert detail["maintenance_since"] is not None
    finally:
        box.stop()


def test_compartment_taken_out_of_service_by_command_raises_fault_until_restored(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """set_compartment_service(enabled=false) makes the stub report compartment.fault (out_of_service):
    an info compartment_fault alert for that door; enabled=true reports compartment.restored: cleared."""
    box = firmware(broker, credentials, "box-074", tmp_path)
    try:
        wait_for(lambda: online(ops_api, "box-074"))
        off = {"action": "set_compartment_service", "compartment": 9, "enabled": False}
        response = ops_api.post("/api/v1/boxes/box-074/commands", json=off)
        assert response.status_code == 202, response.text
        wait_command(ops_api, response.json()["command_id"], "succeeded")
        alert = wait_for(lambda: open_alert(ops_api, "box-074", "compartment_fault"))
        assert alert["subject"] == "9"
        assert alert["severity"] == "info"
        assert alert["details"]["fault"] == "out_of_service"
        on = ops_api.post("/api/v1/boxes/box-074/commands", json={**off, "enabled": True})
        wait_command(ops_api, on.json()["command_id"], "succeeded")
        wait_for(lambda: open_alert(ops_api, "box-074", "compartment_fault") is None)
        (done,) = cleared(ops_api, "box-074", "compartment_fault")
        assert done["cleared_by"].startswith("event compartment.restored seq ")
    finally:
        box.stop()


def test_command_to_a_box_that_is_not_running_times_out(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """A command to a box that is offline is sent (the broker takes it) but never acknowledged: it
    ends timed_out at its expiry, and the list of the box's commands says so too."""
    box = firmware(broker, credentials, "box-072", tmp_path)
    box.stop()
    wait_for(lambda: ops_api.get("/api/v1/boxes/box-072").json().get("status_reason") == "shutdown")
    response = ops_api.post("/api/v1/boxes/box-072/commands", json={"action": "ping", "timeout_s": 1})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "sent"
    done = wait_command(ops_api, response.json()["command_id"], "timed_out")
    assert done["acked_at"] is None
    assert done["detail"].startswith("no acknowledgement from the box by ")
    listed = ops_api.get("/api/v1/boxes/box-072/commands").json()
    assert listed[0]["status"] == "timed_out"


def test_command_permissions_and_rejections(
    ops_api: httpx.Client, api_keys: dict[str, Headers], db: psycopg.Connection[Any]
) -> None:
    """A researcher may read commands but not send them (403 forbidden_role), no key is 401;
    invalid commands are 422 (invalid_command, also for reserve/release_compartment, which only courier
    reservations send; unknown_compartment), unknown boxes and commands 404."""
    db.execute(
        "INSERT INTO boxes (box_id, layout) VALUES ('box-071', %s) ON CONFLICT (box_id) DO NOTHING",
        (Jsonb(default_layout().model_dump(mode="json")),),
    )
    body = {"action": "ping"}
    researcher = ops_api.post("/api/v1/boxes/box-071/commands", json=body, headers=api_keys["researcher"])
    assert researcher.status_code == 403
    assert researcher.json()["error"]["code"] == "forbidden_role"
    courier = ops_api.post("/api/v1/boxes/box-071/commands", json=body, headers=api_keys["courier_gls"])
    assert courier.status_code == 403
    anonymous = ops_api.post("/api/v1/boxes/box-071/commands", json=body, headers={"X-API-Key": ""})
    assert anonymous.status_code == 401
    assert ops_api.get("/api/v1/boxes/box-071/commands", headers=api_keys["researcher"]).status_code == 200
    missing_flag = ops_api.post("/api/v1/boxes/box-071/commands", json={"action": "set_maintenance"})
    assert missing_flag.status_code == 422
    assert missing_flag.json()["error"]["code"] == "invalid_command"
    for action in ("reserve_compartment", "release_compartment"):  # holds go through courier reservations
        hold = ops_api.post("/api/v1/boxes/box-071/commands", json={"action": action, "compartment": 3})
        assert hold.status_code == 422
        assert hold.json()["error"]["code"] == "invalid_command"
    assert db.execute(
        "SELECT count(*) FROM commands WHERE box_id = 'box-071'"
        " AND action IN ('reserve_compartment', 'release_compartment')"
    ).fetchone() == (0,)
    no_door = ops_api.post("/api/v1/boxes/box-071/commands", json={"action": "open_compartment", "compartment": 60})
    assert no_door.status_code == 422
    assert no_door.json()["error"]["code"] == "unknown_compartment"
    nobox = ops_api.post("/api/v1/boxes/box-999/commands", json=body)
    assert nobox.status_code == 404
    assert nobox.json()["error"]["code"] == "box_not_found"
    nocmd = ops_api.get(f"/api/v1/commands/{uuid.uuid4()}")
    assert nocmd.status_code == 404
    assert nocmd.json()["error"]["code"] == "command_not_found"


# --------------------------------------------------------------------------- live stream


def read_events(lines: Iterator[str], until: Callable[[str, dict[str, Any]], bool]) -> list[tuple[str, Any]]:
    """SSE events from ``lines`` up to and including the first for which ``until`` is true."""
    seen: list[tuple[str, Any]] = []
    event, data = "message", list[str]()
    for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                payload = json.loads("\n".join(data))
                seen.append((event, payload))
                if until(event, payload):
                    return seen
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    raise AssertionError(f"the stream ended before the expected event; saw {seen}")


def test_stream_delivers_status_change_and_alert(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, ops_api: httpx.Client, tmp_path: Path
) -> None:
    """A client of GET /api/v1/stream (text/event-stream) receives box.status when a box goes
    offline, and alert.raised for its box_offline alert."""
    box = firmware(broker, credentials, "box-073", tmp_path)
    wait_for(lambda: online(ops_api, "box-073"))
    with ops_api.stream("GET", "/api/v1/stream", params={"box_id": "box-073"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        (hello,) = read_events(lines, lambda e, d: e == "hello")
        assert hello[1]["listening"] is True
        box.kill()
        seen = read_events(lines, lambda e, d: e == "alert.raised")
    names = [e for e, _ in seen]
    status = [d for e, d in seen if e == "box.status"]
    assert status
    assert status[0] == {
        "box_id": "box-073",
        "online": False,
        "reason": "connection_lost",
        "session": box.session,
        "since": status[0]["since"],
    }
    assert names.index("box.status") < names.index("alert.raised")
    raised = next(d for e, d in seen if e == "alert.raised")
    assert raised["kind"] == "box_offline"
    assert raised["box_id"] == "box-073"
    assert raised["open"] is True


def test_stream_needs_a_viewer_key(ops_api: httpx.Client, api_keys: dict[str, Headers]) -> None:
    """The stream refuses a request without a key (401) and a courier key (403)."""
    assert ops_api.get("/api/v1/stream", headers={"X-API-Key": ""}).status_code == 401
    assert ops_api.get("/api/v1/stream", headers=api_keys["courier_gls"]).status_code == 403


def test_stopping_the_server_ends_open_streams(database_url: str, api_keys: dict[str, Headers]) -> None:
    """Stopping the API ends its open SSE streams at once instead of waiting for them."""
    server = ApiServer(create_app(Settings(database_url=database_url))).start()
    lines: list[str] = []
    connected = threading.Event()

    def read() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=10, headers=api_keys["researcher"]) as client,
            client.stream("GET", "/api/v1/stream") as response,
        ):
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("event: hello"):
                    connected.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert connected.wait(10)
    started = time.monotonic()
    server.stop()
    reader.join(5)
    assert not reader.is_alive()
    assert time.monotonic() - started < 3
    assert "event: hello" in lines


def test_a_revoked_keys_stream_ends(database_url: str, make_key: Callable[..., NewKey]) -> None:
    """A stream whose key is revoked while it is open ends with event revoked at its next keepalive."""
    key = make_key(Role.RESEARCHER)
    server = ApiServer(create_app(Settings(database_url=database_url, stream_keepalive_s=0.3))).start()
    try:
        with (
            httpx.Client(base_url=server.url, timeout=10, headers=headers(key)) as client,
            client.stream("GET", "/api/v1/stream") as response,
        ):
            lines = response.iter_lines()
            read_events(lines, lambda e, d: e == "hello")
            with psycopg.connect(database_url, autocommit=True) as conn:
                assert revoke_key(conn, key.key_id)
            seen = read_events(lines, lambda e, d: e == "revoked")
            assert list(lines) == []  # and the server ended the response
        assert seen[-1] == ("revoked", {"reason": "the API key was revoked"})
    finally:
        server.stop()


class _BrokenAlerts(AlertEngine):
    def apply(self, conn: psycopg.Connection[Any], batch: OpsBatch) -> None:
        conn.execute("SELECT 1/0")  # a database error inside alerting (the savepoint must absorb it)


def test_a_fault_in_alerting_never_costs_a_batch_its_data(db: psycopg.Connection[Any], database_url: str) -> None:
    """When alert evaluation fails, the batch's events are still stored (not dead-lettered) and the
    failure is counted."""
    payload = DoorLeftOpen(compartment=3, open_s=100)
    raw = encode(make_event(box_id="ops-fault-1", seq=1, session=1, ts_ms=T0, payload=payload))
    message = Received(1, 1, 1, topic_for("ops-fault-1", MessageKind.EVENTS), raw, time.time())
    with psycopg.connect(database_url, autocommit=True) as conn:
        result = BatchWriter(conn, "test-broken-alerts", _BrokenAlerts()).write([message])
    assert result.events == 1
    assert result.dead_letters == 0
    assert result.alert_errors == 1
    assert db.execute("SELECT count(*) FROM events WHERE box_id = 'ops-fault-1'").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM alerts WHERE box_id = 'ops-fault-1'").fetchone() == (0,)


def test_command_without_a_broker_is_recorded_failed(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    """An API with no broker connection answers 503 broker_unavailable and records the command as
    failed (never left pending), with the reason."""
    db.execute("INSERT INTO boxes (box_id) VALUES ('ops-nobroker-1') ON CONFLICT DO NOTHING")
    response = api.post("/api/v1/boxes/ops-nobroker-1/commands", json={"action": "ping"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "broker_unavailable"
    assert error["details"]["status"] == "failed"
    stored = api.get(f"/api/v1/commands/{error['details']['command_id']}").json()
    assert stored["status"] == "failed"
    assert stored["detail"].startswith("not sent: this API has no broker connection")


# --------------------------------------------------------------------------- commands and an unreliable broker


async def _send_open(
    database_url: str, sender: CommandSender | None, box_id: str, door: int, **kw: Any
) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        request = CommandRequest(box_id=box_id, action=CommandAction.OPEN_COMPARTMENT, compartment=door)
        return await send_command(conn, sender, request, requested_by="test", timeout_s=30.0, **kw)


def wait_until(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll ``condition`` for up to ``timeout`` seconds; whether it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _sender(broker: RunningBroker, credentials: Credentials, **kw: Any) -> CommandSender:
    sender = CommandSender(
        host=broker.host, port=broker.port, username="ingest", password=credentials.services["ingest"], **kw
    )
    sender.start()
    assert sender.connected.wait(10), f"the command sender did not connect: {sender.last_error}"
    return sender


def test_command_while_the_broker_is_down_fails_at_once_and_never_runs_later(
    database_url: str, credentials: Credentials, tmp_path: Path
) -> None:
    """With the sender disconnected (its broker down), open_compartment is recorded failed at once and
    not queued: once the broker is back and a later command reaches the box, the failed one never has."""
    private = start_mosquitto(tmp_path / "mosquitto", credentials)
    sender = _sender(private, credentials)
    box = firmware(private, credentials, "box-076", tmp_path)
    try:
        private.stop()
        wait_for(lambda: not sender.is_connected())
        started = time.monotonic()
        failed = asyncio.run(_send_open(database_url, sender, "box-076", 5, connect_wait_s=0))
        assert time.monotonic() - started < 1.0
        assert failed["status"] == "failed"
        assert failed["detail"].startswith("not sent: not connected to the broker")
        private.start()
        wait_for(sender.is_connected, 30)

        def door_6_opened() -> bool:  # the box resubscribes after its own reconnect: retry until it hears
            asyncio.run(_send_open(database_url, sender, "box-076", 6))
            return wait_until(lambda: box.state[6].door_open, 2.0)

        wait_for(door_6_opened, 30, interval=0)
        time.sleep(1.0)  # anything paho had queued would have arrived with or before the later command
        assert box.state[5].door_open is False
        with psycopg.connect(database_url) as db:
            status = db.execute("SELECT status FROM commands WHERE command_id = %s", (failed["command_id"],))
            assert status.fetchone() == ("failed",)
    finally:
        box.stop()
        sender.stop()
        private.stop()


def test_command_without_a_puback_in_time_is_sent_with_delivery_unknown(
    database_url: str, credentials: Credentials, tmp_path: Path
) -> None:
    """A broker that stops answering (SIGSTOP) gives no PUBACK in time: the command is recorded sent
    with 'delivery unknown', not failed, because paho still has it: once the broker resumes the box
    does open the door."""
    private = start_mosquitto(tmp_path / "mosquitto", credentials)
    sender = _sender(private, credentials, publish_timeout_s=1.0)
    box = BoxFirmware(
        "box-077", credentials.boxes["box-077"], private.host, private.port, tmp_path / "box-077", keepalive=30
    )
    box.start()
    pid = private.pid
    assert pid is not None
    try:
        assert box.wait_connected(10)
        os.kill(pid, signal.SIGSTOP)
        try:
            sent = asyncio.run(_send_open(database_url, sender, "box-077", 5))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert sent["status"] == "sent"
        assert sent["detail"] == "delivery unknown: no PUBACK from the broker within 1 s"
        assert sent["sent_at"] is not None
        wait_for(lambda: box.state[5].door_open)
    finally:
        box.stop()
        sender.stop()
        private.stop()


def test_the_boxs_ack_overrides_a_failed_the_backend_recorded(
    broker: RunningBroker, credentials: Credentials, ops_ingest: IngestWorker, database_url: str
) -> None:
    """An ack from the box for a command the backend recorded failed (given up on, yet it ran) is
    recorded: the box's word is the truth; a repeat ack afterwards changes nothing."""
    failed = asyncio.run(_send_open(database_url, None, "box-078", 4))
    assert failed["status"] == "failed"
    topic = topic_for("box-078", MessageKind.COMMAND_ACK)
    query = "SELECT status, detail, acked_at IS NOT NULL FROM commands WHERE command_id = %s"
    ack = CommandAck(
        v=1,
        command_id=failed["command_id"],
        box_id="box-078",
        ts_ms=int(time.time() * 1000),
        result=CommandResult.SUCCEEDED,
        detail="compartment 4 opened",
    )
    client = mqtt_client(broker, "box-078", credentials.boxes["box-078"])
    try:
        with psycopg.connect(database_url, autocommit=True) as db:
            publish(client, topic, encode(ack))
            done = ("succeeded", "compartment 4 opened", True)
            wait_for(lambda: db.execute(query, (failed["command_id"],)).fetchone() == done)
            publish(client, topic, encode(ack.model_copy(update={"result": CommandResult.FAILED, "detail": "x"})))
            # a later ack on the same topic is ingested after the repeat: once it is, the repeat was too
            later = asyncio.run(_send_open(database_url, None, "box-078", 5))
            publish(client, topic, encode(ack.model_copy(update={"command_id": later["command_id"]})))
            wait_for(lambda: (row := db.execute(query, (later["command_id"],)).fetchone()) and row[0] == "succeeded")
            assert db.execute(query, (failed["command_id"],)).fetchone() == done
    finally:
        close(client)
