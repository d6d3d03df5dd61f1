"""FastAPI dependencies, as ``Annotated`` aliases (``ConnDep``, ``SettingsDep``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from backend.api.errors import ApiError
from backend.settings import Settings

log = logging.getLogger(__name__)


async def get_settings(request: Request) -> Settings:
    """Async although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker thread,
    a hand-off that cost more than the rest of the dependency work of a capacity query."""
    settings: Settings = request.app.state.settings
    return settings


async def get_conn(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    pool: AsyncConnectionPool[AsyncConnection[Any]] = request.app.state.pool
    try:
        async with pool.connection(timeout=5.0) as conn:
            yield conn
    except psycopg.errors.TransactionRollback as exc:  # a deadlock or serialization failure: reachable, busy
        log.warning("lock conflict on %s %s: %s", request.method, request.url.path, exc)
        raise ApiError(503, "database_busy", "the request lost a lock conflict with another; retry") from exc
    except (psycopg.OperationalError, TimeoutError) as exc:
        # The cause (host, user, a deadlock's detail) goes to the log, not to the caller.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        raise ApiError(503, "database_unavailable", "the database is not reachable; try again shortly") from exc


SettingsDep = Annotated[Settings, Depends(get_settings)]
ConnDep = Annotated[AsyncConnection[Any], Depends(get_conn)]
