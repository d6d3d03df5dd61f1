"""Authentication and roles for the API: an ``X-API-Key`` header, checked on every request.

Where it sits in a message's journey: at the door of the API, before any box data is read or any
command is sent. Keys are made with ``molo keys create`` (see :mod:`backend.access.keys`); only
their SHA-256 is stored.

Use the ``Annotated`` dependencies in endpoints::

    @router.get("/things")
    async def things(who: ViewerDep) -> ...:      # operator or researcher

Errors, in the API's JSON error shape: 401 ``missing_api_key``, ``invalid_api_key``,
``revoked_api_key``; 403 ``forbidden_role`` (and ``forbidden_carrier`` from :func:`carrier_for`,
when a courier names another carrier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader

from backend.access import repository
from backend.access.keys import Role, hash_matches, parse_token
from backend.api.deps import ConnDep
from backend.api.errors import ApiError

__all__ = ["CourierDep", "OperatorDep", "Principal", "Role", "ViewerDep", "carrier_for", "require"]

API_KEY_HEADER = "X-API-Key"
_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="An API key from `molo keys create` (operator, courier of one carrier, or researcher).",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and name, its role, and (couriers only) its carrier."""

    key_id: str
    name: str
    role: Role
    carrier: str | None


async def authenticate(conn: ConnDep, token: Annotated[str | None, Security(_header)] = None) -> Principal:
    """The caller behind the ``X-API-Key`` header, or 401."""
    if not token:
        raise ApiError(401, "missing_api_key", f"send an API key in the {API_KEY_HEADER} header")
    key_id = parse_token(token)
    row = await repository.find_key(conn, key_id) if key_id else None
    if row is None or not hash_matches(token, row["secret_sha256"]):
        raise ApiError(401, "invalid_api_key", "the API key is not valid")
    if row["revoked_at"] is not None:
        raise ApiError(401, "revoked_api_key", f"the API key {key_id} was revoked")
    return Principal(key_id=row["key_id"], name=row["name"], role=Role(row["role"]), carrier=row["carrier"])


def require(*roles: Role) -> Any:
    """A dependency that authenticates the caller and admits only ``roles`` (else 403 ``forbidden_role``)."""
    allowed = frozenset(roles)
    names = ", ".join(r.value for r in roles)

    async def _check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            raise ApiError(
                403, "forbidden_role", f"this needs the role {names}; the key is a {principal.role.value} key"
            )
        return principal

    return Depends(_check)


def carrier_for(principal: Principal, carrier: str | None) -> str | None:
    """The carrier a request acts for: a courier's own (403 ``forbidden_carrier`` if it names
    another); for an operator whatever it names (None: all carriers)."""
    if principal.role is Role.COURIER:
        if carrier is not None and carrier != principal.carrier:
            raise ApiError(
                403, "forbidden_carrier", f"this key acts for carrier {principal.carrier!r}, not {carrier!r}"
            )
        return principal.carrier
    return carrier


OperatorDep = Annotated[Principal, require(Role.OPERATOR)]
#: Read-only box and KPI data.
ViewerDep = Annotated[Principal, require(Role.OPERATOR, Role.RESEARCHER)]
#: Courier endpoints; an operator may act for any carrier.
CourierDep = Annotated[Principal, require(Role.COURIER, Role.OPERATOR)]
