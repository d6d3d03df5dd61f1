"""The FastAPI application: ``create_app(settings)``; the pool opens in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from backend import dashboard
from backend.api import boxes, ops
from backend.api.errors import install_error_handlers
from backend.settings import Settings


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
        )
        await pool.open(wait=False)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="MoLo Hubs API",
        version="0.1.0",
        summary="Smart boxes of the MoLo Hubs pilot in Aalborg: status, compartments, events.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(boxes.router)
    dashboard.install(app)
    return app
