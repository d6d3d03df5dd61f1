"""Authentication and roles for the API: an ``X-API-Key`` header, checked on every request.

Where it sits in a message's journey: at the door of the API, before any box data is read or any
command is sent. Keys are made with ``molo keys create`` (see :mod:`backend.access.keys`); only
their SHA-256 is stored.

Use the ``Annotated`` dependencies in endpoints::

    @router.get("/things")
    async def things(who: ViewerDep) -> ...:      # operator or researcher

A response that stays open (the live stream) uses ``StreamViewerDep``: it looks the key up on a
connection borrowed for the lookup only. ``ViewerDep`` shares the request's ``ConnDep``, and FastAPI
returns a yield dependency's connection only when the response has been sent, which for a stream is
when it ends (ten open streams held the whole pool of ten).

Valid keys are kept in a per-process :class:`KeyCache` for ``MOLO_API_KEY_CACHE_S`` (5 s), so most
requests cost no key query; every change to a key is announced by the database (``molo_keys``,
migration 0011) and drops it from every process's cache at once.

Errors, in the API's JSON error shape: 401 ``missing_api_key``, ``invalid_api_key``,
``revoked_api_key``; 403 ``forbidden_role`` (and ``forbidden_carrier`` from :func:`carrier_for`,
when a courier names another carrier).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from psycopg import AsyncConnection

from backend.access import repository
from backend.access.keys import Role, hash_matches, parse_token
from backend.api.deps import ConnDep, get_conn
from backend.api.errors import ApiError

__all__ = [
    "CourierDep",
    "KeyCache",
    "OperatorDep",
    "Principal",
    "Role",
    "StreamViewerDep",
    "ViewerDep",
    "carrier_for",
    "require",
]

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


class KeyCache:
    """The principals of valid keys looked up in the last ``ttl_s`` seconds, in one API process.

    Correct under revocation because it is told of every change: :meth:`forget` runs for each
    ``molo_keys`` notification (the live hub's listener), and the cache is not used while ``live()``
    is false (the listener is disconnected, so a notification could be missed; it is emptied when
    the listener is back). A lookup that began before a change is not stored after it (the
    generation check), so a revoked key is never put back. ``ttl_s`` bounds how stale an entry can
    be if all of that failed; 0 turns the cache off."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float, live: Callable[[], bool]) -> None:
        self._ttl = ttl_s
        self._live = live
        self._entries: dict[str, tuple[float, Principal]] = {}
        self.generation = 0
        self.hits = self.misses = 0

    def get(self, token: str) -> Principal | None:
        if self._ttl <= 0:
            return None
        if not self._live():
            self.misses += 1
            return None
        entry = self._entries.get(token)
        if entry is None or entry[0] < time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, token: str, principal: Principal, generation: int) -> None:
        """Keep ``principal`` if nothing changed since ``generation`` (read before the lookup)."""
        if self._ttl <= 0 or generation != self.generation or not self._live():
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))  # the oldest
        self._entries[token] = (time.monotonic() + self._ttl, principal)

    def forget(self, key_id: str) -> None:
        self.generation += 1
        self._entries = {t: e for t, e in self._entries.items() if e[1].key_id != key_id}

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


def _require_token(token: str | None) -> str:
    if not token:
        raise ApiError(401, "missing_api_key", f"send an API key in the {API_KEY_HEADER} header")
    return token


def _cache(request: Request) -> KeyCache | None:
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    return cache


def _cached(request: Request, token: str) -> Principal | None:
    cache = _cache(request)
    return cache.get(token) if cache is not None else None


async def _look_up(conn: AsyncConnection[Any], token: str, cache: KeyCache | None = None) -> Principal:
    generation = cache.generation if cache is not None else 0
    key_id = parse_token(token)
    row = await repository.find_key(conn, key_id) if key_id else None
    if row is None or not hash_matches(token, row["secret_sha256"]):
        raise ApiError(401, "invalid_api_key", "the API key is not valid")
    if row["revoked_at"] is not None:
        raise ApiError(401, "revoked_api_key", f"the API key {key_id} was revoked")
    principal = Principal(key_id=row["key_id"], name=row["name"], role=Role(row["role"]), carrier=row["carrier"])
    if cache is not None:
        cache.put(token, principal, generation)
    return principal


async def authenticate(
    request: Request, conn: ConnDep, token: Annotated[str | None, Security(_header)] = None
) -> Principal:
    """The caller behind the ``X-API-Key`` header, or 401 (from the cache, or on the request's own
    connection)."""
    token = _require_token(token)
    cached = _cached(request, token)
    return cached if cached is not None else await _look_up(conn, token, _cache(request))


#: ``get_conn`` as a context manager: a pool connection for one block (503 ``database_unavailable``
#: when none can be had within its timeout, as for ``ConnDep``).
_borrow = asynccontextmanager(get_conn)


async def _look_up_briefly(request: Request, token: str) -> Principal:
    async with _borrow(request) as conn:
        return await _look_up(conn, token, _cache(request))


def _lookups(request: Request) -> dict[str, asyncio.Task[Principal]]:
    """The brief lookups in flight in this app (per app: each runs on its own event loop)."""
    state = request.app.state
    lookups: dict[str, asyncio.Task[Principal]] | None = getattr(state, "brief_key_lookups", None)
    if lookups is None:
        lookups = state.brief_key_lookups = {}
    return lookups


async def authenticate_briefly(request: Request, token: Annotated[str | None, Security(_header)] = None) -> Principal:
    """As :func:`authenticate`, on a pool connection held for the lookup only and returned before
    the endpoint runs: for responses that stay open (the live stream).

    Requests with the same key while its lookup is in flight share that lookup (its answer is at most
    one query old), so when every dashboard reconnects at once (an API restart) the pool
    sees one query per key, not one per stream, and other requests are not starved."""
    token = _require_token(token)
    cached = _cached(request, token)
    if cached is not None:
        return cached
    lookups = _lookups(request)
    task = lookups.get(token)
    if task is None:
        task = asyncio.ensure_future(_look_up_briefly(request, token))
        lookups[token] = task

        def _done(t: asyncio.Task[Principal]) -> None:
            lookups.pop(token, None)
            if not t.cancelled():
                t.exception()  # retrieved here too: every waiter may have gone away

        task.add_done_callback(_done)
    # One waiter going away (its client disconnected) must not cancel the others' lookup.
    return await asyncio.shield(task)


def require(*roles: Role, brief: bool = False) -> Any:
    """A dependency that authenticates the caller and admits only ``roles`` (else 403 ``forbidden_role``);
    ``brief``: with :func:`authenticate_briefly` (no connection kept for the rest of the request)."""
    allowed = frozenset(roles)
    names = ", ".join(r.value for r in roles)

    def admit(principal: Principal) -> Principal:
        if principal.role not in allowed:
            raise ApiError(
                403, "forbidden_role", f"this needs the role {names}; the key is a {principal.role.value} key"
            )
        return principal

    # Two definitions, not Depends(a_local): the annotations are strings, resolved in this module.
    if brief:

        async def _check_brief(principal: Annotated[Principal, Depends(authenticate_briefly)]) -> Principal:
            return admit(principal)

        return Depends(_check_brief)

    async def _check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        return admit(principal)

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
#: The same roles for a response that stays open: holds no pool connection once it has started.
StreamViewerDep = Annotated[Principal, require(Role.OPERATOR, Role.RESEARCHER, brief=True)]
#: Courier endpoints; an operator may act for any carrier.
CourierDep = Annotated[Principal, require(Role.COURIER, Role.OPERATOR)]
