"""The HTTP API against the real test database: pagination, filters, precise errors, ops endpoints.

Rows are written straight into the tables the API reads (ingest is tested in test_ingest.py); box ids
api-001 .. belong to this module.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.fixtures.database import DatabaseUnderTest

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def seeded(database_url: str) -> str:
    """Box api-001 with 250 events over 250 minutes (every 5th a waste deposit)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO boxes (box_id, name) VALUES ('api-001', 'Test box') ON CONFLICT DO NOTHING")
        conn.execute("SELECT molo_ensure_partitions('events', %s, %s)", (T0, T0 + timedelta(days=1)))
        with conn.cursor().copy(
            "COPY events (ts, received_at, box_id, seq, session, type, compartment, payload) FROM STDIN"
        ) as copy:
            for seq in range(1, 251):
                kind = "waste.deposited" if seq % 5 == 0 else "door.opened"
                copy.write_row((T0 + timedelta(minutes=seq), T0, "api-001", seq, 1, kind, 1, "{}"))
    return "api-001"


def get_all(api: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.get(path, params={**params, **({"cursor": cursor} if cursor else {})}).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_events_paginate_without_gaps_or_repeats(api: httpx.Client, seeded: str) -> None:
    """Walking the cursor pages returns every event exactly once, in (ts, seq) order, both directions."""
    asc = get_all(api, f"/api/v1/boxes/{seeded}/events", limit=37)
    assert [e["seq"] for e in asc] == list(range(1, 251))
    desc = get_all(api, f"/api/v1/boxes/{seeded}/events", limit=100, order="desc")
    assert [e["seq"] for e in desc] == list(range(250, 0, -1))


def test_events_filter_by_time_range_and_type(api: httpx.Client, seeded: str) -> None:
    """since is inclusive, until exclusive; type filters; naive times are UTC."""
    since = (T0 + timedelta(minutes=10)).isoformat()
    until = (T0 + timedelta(minutes=20)).replace(tzinfo=None).isoformat()
    items = api.get(f"/api/v1/boxes/{seeded}/events", params={"since": since, "until": until}).json()["items"]
    assert [e["seq"] for e in items] == list(range(10, 20))
    waste = get_all(api, f"/api/v1/boxes/{seeded}/events", type="waste.deposited", limit=1000)
    assert [e["seq"] for e in waste] == list(range(5, 251, 5))


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/v1/boxes/api-999", {}, 404, "box_not_found"),
        ("/api/v1/boxes/api-999/events", {}, 404, "box_not_found"),
        ("/api/v1/boxes/NOT_A_BOX", {}, 422, "invalid_request"),
        ("/api/v1/boxes/api-001/events", {"limit": 0}, 422, "invalid_request"),
        ("/api/v1/boxes/api-001/events", {"type": "parcel.teleported"}, 422, "invalid_request"),
        ("/api/v1/boxes/api-001/events", {"cursor": "bm90LWEtY3Vyc29y"}, 400, "invalid_cursor"),
        (
            "/api/v1/boxes/api-001/events",
            {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"},
            400,
            "invalid_range",
        ),
        ("/api/v1/nowhere", {}, 404, "not_found"),
    ],
)
def test_errors_are_precise(
    api: httpx.Client, seeded: str, path: str, params: dict[str, Any], status: int, code: str
) -> None:
    """Every error answers with its HTTP status and a machine-readable code in one JSON shape."""
    response = api.get(path, params=params)
    assert response.status_code == status
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


def test_box_never_heard_from_is_offline_never_seen(api: httpx.Client, seeded: str) -> None:
    """A registered box with no status yet is listed offline with reason never_seen."""
    box = {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}[seeded]
    assert box["online"] is False
    assert box["status_reason"] == "never_seen"
    assert box["name"] == "Test box"


def test_health_readiness_and_openapi(api: httpx.Client, test_database: DatabaseUnderTest) -> None:
    """Liveness and readiness answer (with the storage flavour); OpenAPI lists the box endpoints."""
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready").json()
    assert ready["status"] == "ready"
    assert ready["flavour"] == test_database.flavour
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/api/v1/boxes", "/api/v1/boxes/{box_id}", "/api/v1/boxes/{box_id}/events", "/metrics"} <= set(paths)


def test_readiness_fails_on_an_unmigrated_database(blank_database: str) -> None:
    """Against a database without the schema, /ready answers 503 schema_outdated."""
    from backend.api.app import create_app
    from backend.api.server import ApiServer
    from backend.settings import Settings

    server = ApiServer(create_app(Settings(database_url=blank_database))).start()
    try:
        response = httpx.get(f"{server.url}/ready", timeout=10)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "schema_outdated"
    finally:
        server.stop()


def test_metrics_report_ingest_counters(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    """/metrics exposes each worker's committed counters and the dead letters by code."""
    db.execute(
        "INSERT INTO ingest_workers (worker_id, started_at, updated_at, messages, events, duplicates, "
        "dead_letters, batches, batch_seconds_sum, last_batch_seconds, last_lag_seconds) "
        "VALUES ('metrics-w', now(), now(), 10, 7, 2, 1, 2, 0.5, 0.2, 0.3) ON CONFLICT DO NOTHING"
    )
    db.execute(
        "INSERT INTO dead_letters (received_at, topic, error_code, reason, payload) "
        "VALUES (now(), 'x', 'metrics_test_code', 'r', '\\x00')"
    )
    text = api.get("/metrics").text
    assert 'molo_ingest_events_total{worker="metrics-w"} 7.0' in text
    assert 'molo_ingest_duplicates_total{worker="metrics-w"} 2.0' in text
    assert 'molo_ingest_dead_letters_total{worker="metrics-w"} 1.0' in text
    assert 'molo_ingest_batch_seconds_avg{worker="metrics-w"} 0.25' in text
    assert 'molo_ingest_lag_seconds{worker="metrics-w"} 0.3' in text
    assert 'molo_dead_letters_stored{code="metrics_test_code"} 1.0' in text


def test_invalid_stored_layout_does_not_break_the_box_list(api: httpx.Client, db: psycopg.Connection[Any]) -> None:
    """A hand-corrupted layout row shows that box without compartments; the list still answers 200."""
    db.execute("""INSERT INTO boxes (box_id, layout) VALUES ('api-002', '{"compartments": "nonsense"}')""")
    listed = api.get("/api/v1/boxes")
    assert listed.status_code == 200
    assert "api-002" in {b["box_id"] for b in listed.json()}
    detail = api.get("/api/v1/boxes/api-002").json()
    assert detail["compartments"] == []
