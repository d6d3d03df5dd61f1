"""All SQL about experiment jobs (table ``experiments``, migration 0009), async, for the API and the worker.

A row's ``status`` moves queued -> running -> succeeded | failed | cancelled; a running job whose
worker died goes back to queued when a worker takes it over (:func:`requeue_job`). A cancel asked of a
running job sets ``cancel_requested_at``; the worker running it ends it as cancelled.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

Row = dict[str, Any]

FINAL = ("succeeded", "failed", "cancelled")
_COLUMNS = """e.id, e.name, e.description, e.status, e.points, e.replications_done, e.replications_target,
    e.replications_max, e.box_days, e.job_id, e.attempts, e.error, e.report, e.created_at, e.started_at,
    e.finished_at, e.cancel_requested_at, e.updated_at, e.submitted_by, k.name AS submitted_by_name"""
_FROM = "experiments e LEFT JOIN api_keys k ON k.key_id = e.submitted_by"


async def _one(conn: AsyncConnection[Any], query: str, params: tuple[Any, ...]) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def insert(
    conn: AsyncConnection[Any],
    *,
    name: str,
    description: str,
    source: str,
    points: int,
    replications_target: int,
    replications_max: int,
    box_days: int,
    submitted_by: str | None,
) -> int:
    """A new queued experiment; its id."""
    row = await _one(
        conn,
        """INSERT INTO experiments (name, description, source, points, replications_target, replications_max,
                                    box_days, submitted_by)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (name, description, source, points, replications_target, replications_max, box_days, submitted_by),
    )
    if row is None:
        raise RuntimeError("INSERT ... RETURNING returned no row")
    return int(row["id"])


async def set_job(conn: AsyncConnection[Any], experiment_id: int, job_id: int) -> None:
    await conn.execute("UPDATE experiments SET job_id = %s WHERE id = %s", (job_id, experiment_id))


async def get(conn: AsyncConnection[Any], experiment_id: int, *, for_update: bool = False) -> Row | None:
    lock = " FOR UPDATE OF e" if for_update else ""
    return await _one(conn, f"SELECT {_COLUMNS} FROM {_FROM} WHERE e.id = %s{lock}", (experiment_id,))


async def source_of(conn: AsyncConnection[Any], experiment_id: int) -> str | None:
    row = await _one(conn, "SELECT source FROM experiments WHERE id = %s", (experiment_id,))
    return None if row is None else str(row["source"])


async def list_recent(conn: AsyncConnection[Any], *, limit: int, status: str | None) -> list[Row]:
    """Newest first."""
    where = "WHERE e.status = %s" if status else ""
    params: tuple[Any, ...] = (status, limit) if status else (limit,)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} {where} ORDER BY e.created_at DESC, e.id DESC LIMIT %s", params
        )
        return await cur.fetchall()


async def request_cancel(conn: AsyncConnection[Any], experiment_id: int) -> None:
    await conn.execute(
        """UPDATE experiments SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
           WHERE id = %s""",
        (experiment_id,),
    )


async def finish(
    conn: AsyncConnection[Any],
    experiment_id: int,
    status: str,
    *,
    error: str | None = None,
    report: str | None = None,
    done: int | None = None,
    target: int | None = None,
) -> None:
    """End the job (``status`` one of :data:`FINAL`), with the last progress if given."""
    if status not in FINAL:
        raise ValueError(f"{status!r} is not a final status")
    await conn.execute(
        """UPDATE experiments SET status = %s, error = %s, report = %s, finished_at = now(), updated_at = now(),
                  replications_done = coalesce(%s, replications_done),
                  replications_target = coalesce(%s, replications_target)
           WHERE id = %s""",
        (status, error, report, done, target, experiment_id),
    )


async def start(conn: AsyncConnection[Any], experiment_id: int) -> Row | None:
    """Mark the job running (one more attempt), unless it has ended or a cancel was asked: then None."""
    return await _one(
        conn,
        """UPDATE experiments SET status = 'running', attempts = attempts + 1, error = NULL,
                  started_at = coalesce(started_at, now()), updated_at = now()
           WHERE id = %s AND status IN ('queued', 'running') AND cancel_requested_at IS NULL
           RETURNING id, source, replications_done, replications_target""",
        (experiment_id,),
    )


async def progress(conn: AsyncConnection[Any], experiment_id: int, done: int, target: int) -> bool:
    """Store how far the job is; whether a cancel has been asked."""
    row = await _one(
        conn,
        """UPDATE experiments SET replications_done = %s, replications_target = %s,
                  updated_at = CASE WHEN (replications_done, replications_target) = (%s, %s) THEN updated_at
                                    ELSE now() END
           WHERE id = %s RETURNING cancel_requested_at""",
        (done, target, done, target, experiment_id),
    )
    return row is not None and row["cancel_requested_at"] is not None


async def requeue_job(conn: AsyncConnection[Any], job_id: int) -> None:
    """The worker running procrastinate job ``job_id`` died and the job goes back to the queue."""
    await conn.execute(
        "UPDATE experiments SET status = 'queued', updated_at = now() WHERE job_id = %s AND status = 'running'",
        (job_id,),
    )


async def requeue(conn: AsyncConnection[Any], experiment_id: int) -> None:
    """The worker stops (shut down) and gives the running job back to the queue."""
    await conn.execute(
        "UPDATE experiments SET status = 'queued', updated_at = now() WHERE id = %s AND status = 'running'",
        (experiment_id,),
    )
