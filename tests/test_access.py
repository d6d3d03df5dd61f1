"""Access to the API: API keys, their roles, and the ``molo keys`` command (issue 5)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from backend.access.keys import NewKey, Role, parse_token, token_hash
from molo.cli import main as molo_main
from tests.fixtures.pipeline import wait_for


def _code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_missing_key_is_401_missing_api_key(api: httpx.Client) -> None:
    """A request without X-API-Key is refused 401 missing_api_key in the API's error shape."""
    response = api.get("/api/v1/boxes", headers={"X-API-Key": ""})
    assert response.status_code == 401
    assert response.json() == {
        "error": {"code": "missing_api_key", "message": "send an API key in the X-API-Key header", "details": None}
    }


@pytest.mark.parametrize(
    "token",
    [
        "not-a-key",
        "molo_0123456789_" + "A" * 43,  # well-formed, unknown id
        "changeme",
    ],
)
def test_unknown_or_malformed_key_is_401_invalid_api_key(api: httpx.Client, token: str) -> None:
    """A key that is malformed, unknown or a placeholder is refused 401 invalid_api_key."""
    response = api.get("/api/v1/boxes", headers={"X-API-Key": token})
    assert (response.status_code, _code(response)) == (401, "invalid_api_key")


def test_right_id_with_wrong_secret_is_401_invalid_api_key(api: httpx.Client, make_key: Callable[..., NewKey]) -> None:
    """A token with a real key id but another secret is refused: the whole token's hash must match."""
    key = make_key(Role.OPERATOR)
    forged = f"molo_{key.key_id}_" + ("B" * 43 if not key.token.endswith("B" * 43) else "C" * 43)
    response = api.get("/api/v1/boxes", headers={"X-API-Key": forged})
    assert (response.status_code, _code(response)) == (401, "invalid_api_key")


def test_revoked_key_is_401_revoked_api_key(
    api: httpx.Client, make_key: Callable[..., NewKey], database_url: str
) -> None:
    """A key works until `molo keys revoke`, then answers 401 revoked_api_key: at once, give or take
    the database's notification reaching the API's key cache (allowed 1 s here; the cache's own
    lifetime is 5 s, so a revocation that only expired from the cache would fail this)."""
    key = make_key(Role.RESEARCHER)
    for _ in range(2):  # the second from the key cache
        assert api.get("/api/v1/boxes", headers={"X-API-Key": key.token}).status_code == 200
    assert molo_main(["keys", "--database-url", database_url, "revoke", key.key_id]) == 0
    started = time.monotonic()
    wait_for(lambda: api.get("/api/v1/boxes", headers={"X-API-Key": key.token}).status_code == 401, interval=0.01)
    assert time.monotonic() - started < 1.0
    response = api.get("/api/v1/boxes", headers={"X-API-Key": key.token})
    assert (response.status_code, _code(response)) == (401, "revoked_api_key")


@pytest.mark.parametrize("role", ["operator", "researcher"])
def test_operators_and_researchers_read_boxes(api: httpx.Client, api_keys: dict[str, Any], role: str) -> None:
    """Operators and researchers may read the box list, a box and its events."""
    assert api.get("/api/v1/boxes", headers=api_keys[role]).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/boxes", "/api/v1/boxes/box-001", "/api/v1/boxes/box-001/events"])
def test_courier_cannot_read_box_data_403_forbidden_role(
    api: httpx.Client, api_keys: dict[str, Any], path: str
) -> None:
    """Box monitoring data is for operators and researchers: a courier key gets 403 forbidden_role."""
    response = api.get(path, headers=api_keys["courier_gls"])
    assert (response.status_code, _code(response)) == (403, "forbidden_role")


def test_health_ready_and_metrics_stay_open(api: httpx.Client) -> None:
    """Liveness, readiness and metrics need no key (probes and Prometheus scrape without one)."""
    for path in ("/health", "/ready", "/metrics"):
        assert api.get(path, headers={"X-API-Key": ""}).status_code == 200, path


def test_openapi_declares_the_api_key_scheme(api: httpx.Client) -> None:
    """The OpenAPI schema names the X-API-Key header scheme, so clients and fuzzers can send it."""
    schemes = api.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(
        s == {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": s.get("description")}
        for s in schemes.values()
    )


def test_cli_creates_lists_and_revokes_keys_storing_only_a_hash(
    database_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`molo keys create` prints the secret once and stores only its SHA-256; `list` never shows it;
    `revoke` marks it revoked and a second revoke is refused (exit 2, a user error)."""
    args = ["keys", "--database-url", database_url]
    assert molo_main([*args, "create", "--role", "courier", "--carrier", "gls", "--name", "GLS van app"]) == 0
    token = capsys.readouterr().out.strip()
    key_id = parse_token(token)
    assert key_id is not None
    row = db.execute("SELECT role, carrier, secret_sha256 FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    assert row == ("courier", "gls", token_hash(token))
    dump = str(db.execute("SELECT * FROM api_keys").fetchall())
    assert token not in dump
    secret = token.split("_", 2)[2]  # molo_<key id>_<secret>; the secret itself may contain "_"
    assert len(secret) >= 40
    assert secret not in dump

    assert molo_main([*args, "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing
    assert "GLS van app" in listing
    assert token not in listing

    assert molo_main([*args, "revoke", key_id]) == 0
    assert molo_main([*args, "revoke", key_id]) == 2  # a user error: no such active key
    capsys.readouterr()
    assert molo_main([*args, "list"]) == 0
    assert key_id not in capsys.readouterr().out  # revoked keys only with --all
    assert molo_main([*args, "list", "--all"]) == 0
    assert key_id in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "courier", "--name", "no carrier"], "bound to one carrier"),
        (["--role", "operator", "--carrier", "gls", "--name", "x"], "only courier keys"),
        (["--role", "courier", "--carrier", "GLS!", "--name", "x"], "not a carrier id"),
    ],
)
def test_cli_refuses_courier_without_carrier_and_carrier_on_other_roles(
    database_url: str, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """A courier key must name exactly one valid carrier; operator and researcher keys none."""
    assert molo_main(["keys", "--database-url", database_url, "create", *extra]) == 2
    assert message in capsys.readouterr().err


def test_database_refuses_a_courier_key_without_carrier(db: psycopg.Connection[Any]) -> None:
    """The carrier rule holds in the database too, whatever writes the row."""
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO api_keys (key_id, name, role, carrier, secret_sha256) VALUES (%s, 'x', 'courier', NULL, %s)",
            ("abcdefabcd", "0" * 64),
        )
