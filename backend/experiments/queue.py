"""The job queue of experiments: procrastinate, on its psycopg 3 connector.

Where it sits: between the API (which defers a job in the same transaction that stores the
experiment, so there is never one without the other) and ``molo worker`` (which runs the jobs).
Both open procrastinate on a pool they already have (``App.open_async(pool=...)``), so the queue
costs no connections of its own besides the worker's LISTEN connection.
"""

from __future__ import annotations

from typing import Any

import procrastinate
from procrastinate.psycopg_connector import PsycopgConnector
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

__all__ = ["QUEUE", "TASK_NAME", "cancel", "defer", "new_app"]

#: The task every experiment job runs (``backend.experiments.worker``).
TASK_NAME = "molo.experiments.run"
#: The procrastinate queue of experiment jobs; ``molo worker`` listens to it only.
QUEUE = "experiments"


def new_app() -> procrastinate.App:
    """A procrastinate app on the psycopg 3 connector; open it with ``await app.open_async(pool=pool)``."""
    return procrastinate.App(connector=PsycopgConnector())


async def opened(pool: AsyncConnectionPool[AsyncConnection[Any]], state: Any) -> procrastinate.App:
    """The app of this process, on ``pool``, kept on ``state`` (the API's ``app.state``)."""
    app: procrastinate.App | None = getattr(state, "experiment_queue", None)
    if app is None:
        app = new_app()
        await app.open_async(pool=pool)
        state.experiment_queue = app
    return app


async def defer(app: procrastinate.App, conn: AsyncConnection[Any], experiment_id: int) -> int:
    """Queue the job of ``experiment_id`` on ``conn`` (inside the caller's transaction); its job id."""
    deferrer = app.configure_task(TASK_NAME, queue=QUEUE, lock=f"experiment-{experiment_id}", connection=conn)
    return await deferrer.defer_async(experiment_id=experiment_id)


async def cancel(app: procrastinate.App, conn: AsyncConnection[Any], job_id: int) -> bool:
    """Cancel a queued job, or ask the worker running it to abort (procrastinate's abort: the worker
    is notified and cancels the task); False if the job has ended already."""
    return await app.job_manager.cancel_job_by_id_async(job_id, abort=True, connection=conn)
