"""Every route of the API under its access rule: no key is a 401 everywhere under /api/v1, and each
role is refused where it has no business (a courier on operators' and researchers' data, a researcher
on couriers' and operators' actions), whatever the route (issue 5)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from backend.api.app import create_app
from backend.settings import Settings

#: Routes only operators may use (others who may read must not act).
OPERATOR_ONLY = {("POST", "/api/v1/alerts/{alert_id}/ack"), ("POST", "/api/v1/boxes/{box_id}/commands")}
SAMPLE = {
    "box_id": "box-001",
    "alert_id": "1",
    "command_id": str(uuid.uuid4()),
    "reservation_id": str(uuid.uuid4()),
    "experiment_id": "1",
}


def routes() -> list[tuple[str, str]]:
    """(method, path template) of every /api/v1 operation the app publishes in its OpenAPI schema."""
    app = create_app(Settings(database_url="postgresql://unused@127.0.0.1:1/unused"))
    found = [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api/v1")
        for method in sorted(operations)
    ]
    assert len(found) > 15
    return found


def url(path: str) -> str:
    for name, value in SAMPLE.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no sample value for a parameter of {path}"
    return path


def refused_roles(method: str, path: str) -> set[str]:
    """The roles this route must refuse with 403."""
    if path.startswith("/api/v1/courier"):
        return {"researcher"}
    if (method, path) in OPERATOR_ONLY:
        return {"researcher", "courier_gls"}
    return {"courier_gls"}


@pytest.mark.parametrize(("method", "path"), routes())
def test_every_route_refuses_missing_keys_and_wrong_roles(
    api: httpx.Client, api_keys: dict[str, dict[str, str]], method: str, path: str
) -> None:
    """Without a key the route answers 401 missing_api_key; each role it must refuse gets 403
    forbidden_role, before anything else about the request is looked at."""
    target = url(path)
    anonymous = httpx.request(method, f"{api.base_url}{target}", json={}, timeout=10)
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "missing_api_key")
    for role in refused_roles(method, path):
        got = api.request(method, target, json={}, headers=api_keys[role])
        assert (got.status_code, got.json()["error"]["code"]) == (403, "forbidden_role"), (role, got.text)
