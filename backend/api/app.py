"""The FastAPI application: ``create_app(settings)``; the pool, the command sender (MQTT) and the
live-stream listener open in the lifespan. ``/docs`` (Swagger UI) loads its script and styles from
the API itself (``fastapi-offline`` bundles them, under ``/static-offline-docs``), so it works where
the API has no internet, as in a box network's control room. There is no ``/redoc``: ReDoc's page
fetches its logo from redoc.ly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from psycopg import AsyncConnection
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from backend import dashboard
from backend.api import alerts, boxes, commands, couriers, kpis, ops, stream
from backend.api.errors import install_error_handlers
from backend.api.limits import BodyLimit
from backend.couriers.repository import SESSION_LOCKED
from backend.experiments import endpoints as experiments
from backend.operations.commands import CommandSender
from backend.settings import Settings

log = logging.getLogger(__name__)


def _command_sender(settings: Settings) -> CommandSender | None:
    """The MQTT connection commands go out on (the ``ingest`` identity), or None without a broker."""
    if settings.mqtt_host is None:
        return None
    try:
        password = settings.mqtt_secret()
    except ValueError as exc:
        log.warning("commands disabled: %s", exc)
        return None
    return CommandSender(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        username=settings.mqtt_username,
        password=password,
        protocol=settings.mqtt_protocol,
        use_tls=settings.mqtt_tls,
        tls_ca_file=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
    )


async def _configure(conn: AsyncConnection[Any]) -> None:
    """A new pool connection decodes json/jsonb with orjson (the box list reads 5,000 layouts and
    readings a request; orjson is several times faster than the standard library there)."""
    set_json_loads(orjson.loads, conn)


async def _reset(conn: AsyncConnection[Any]) -> None:
    """On return to the pool: drop session advisory locks a cancelled request may have left (the
    reservation sweeper's per-box locks, backend/couriers/service.py), on the connections that took
    one (the rest, nearly every request, cost no query here)."""
    if conn in SESSION_LOCKED:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        SESSION_LOCKED.discard(conn)


def create_app(settings: Settings, *, database_url: str | None = None) -> FastAPI:
    """The API for ``settings``; ``database_url`` overrides ``settings.database_url`` (the main job
    passes the URL of the PostgreSQL it started)."""
    url = database_url or settings.database_url
    if url is None:
        raise ValueError("the API needs a database: set MOLO_DATABASE_URL")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            open=False,
            kwargs={"autocommit": True, "application_name": "molo-api"},
            configure=_configure,
            reset=_reset,
        )
        await pool.open(wait=False)
        app.state.pool = pool
        sender = _command_sender(settings)
        if sender is not None:
            sender.start()
        app.state.commands = sender
        hub = stream.LiveHub(url, keepalive_s=settings.stream_keepalive_s, key_cache_s=settings.api_key_cache_s)
        hub.start()
        app.state.live = hub
        app.state.key_cache = hub.key_cache
        loop = asyncio.get_running_loop()
        app.state.end_streams = lambda: loop.call_soon_threadsafe(hub.end_streams)  # from any thread
        sweeper = asyncio.create_task(couriers.sweep_periodically(app, settings), name="reservation-sweep")
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await hub.stop()
            if sender is not None:
                sender.stop()
            await pool.close()

    app = FastAPIOffline(
        redoc_url=None,
        # Swagger UI would send the schema to swagger.io's online validator: not from a control room.
        swagger_ui_parameters={"validatorUrl": None},
        title="MoLo Hubs API",
        version="0.1.0",
        summary="Smart boxes of the MoLo Hubs pilot in Aalborg: status, compartments, events.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_body_bytes=settings.api_max_body_bytes)
    app.include_router(ops.router)
    app.include_router(boxes.router)
    app.include_router(boxes.status_router)
    app.include_router(alerts.router)
    app.include_router(commands.router)
    app.include_router(couriers.router)
    app.include_router(kpis.router)
    app.include_router(stream.router)
    app.include_router(experiments.router)
    dashboard.install(app)
    return app
