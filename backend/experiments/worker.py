"""``molo worker``: takes experiment jobs from the procrastinate queue and runs them.

Where it sits: a process of its own beside the API, on the same database and results folder
(``MOLO_EXPERIMENTS_DIR``). It is a procrastinate worker (``App.run_worker_async``) on the queue
``experiments``, running :data:`backend.experiments.queue.TASK_NAME`; each job runs in a child
process (:mod:`backend.experiments.child`) that the task watches once a second: it copies the
child's progress into the job's row, and stops the child when the job is cancelled.

What happens when:

- **Cancel** (the API): a queued job is cancelled by procrastinate before any worker sees it; for a
  running one procrastinate notifies its worker, which cancels the task; the task (or, if that
  notification were missed, its next progress update, which reads ``cancel_requested_at``) sends
  SIGINT to the child's process group, which stops as ``molo experiment run`` does on Ctrl-C,
  keeping every finished replication. SIGKILL after ``STOP_GRACE_S`` if it has not ended.
- **The worker stops** (SIGINT/SIGTERM): it takes no new job, interrupts the running ones the same
  way and gives them back to the queue (procrastinate retries a job aborted by a shutdown), so the
  next worker resumes them.
- **The worker dies** (SIGKILL, a crash, the machine): its children die with it (death signal); it
  sends no more heartbeats, and once its last one is older than
  ``MOLO_EXPERIMENT_WORKER_STALLED_S`` any other worker (checking at start and then every few
  seconds) hands its jobs back to the queue with procrastinate's ``retry_job``; the worker that takes
  one resumes it from the replications stored in its folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc
from procrastinate.job_context import AbortReason, JobContext
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from backend.experiments import child as child_module
from backend.experiments import queue, repository, service
from backend.settings import Settings

__all__ = ["ExperimentFailedError", "build_app", "run_worker", "serve"]

log = logging.getLogger(__name__)

#: How often a running job's progress and cancel flag are checked.
POLL_S = 1.0
#: How often an idle worker looks for jobs besides the queue's notifications.
FETCH_POLL_S = 2.0
#: How long a child may take to stop after SIGINT before it is killed.
STOP_GRACE_S = 10.0
Pool = AsyncConnectionPool[AsyncConnection[Any]]


class ExperimentFailedError(Exception):
    """The experiment ended in an error (recorded in its row); procrastinate marks the job failed."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(path: Path) -> str | None:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else None


def _write_source(out: Path, source: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / service.FILE_NAME
    if path.is_file() and path.read_text(encoding="utf-8") == source:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(source, encoding="utf-8")
    os.replace(tmp, path)


class JobRunner:
    """The task: runs one experiment job in a child process and keeps its row up to date."""

    def __init__(self, settings: Settings, pool: Pool) -> None:
        self.settings = settings
        self.pool = pool

    def processes(self) -> int:
        return self.settings.experiment_processes or os.cpu_count() or 1

    async def run(self, context: JobContext, experiment_id: int) -> str:
        async with self.pool.connection() as conn:
            row = await repository.start(conn, experiment_id)
            current = None if row is not None else await repository.get(conn, experiment_id)
            if current is not None and current["status"] not in repository.FINAL:
                await repository.finish(conn, experiment_id, "cancelled")  # cancelled before it started
        if row is None:
            if current is not None and current["status"] not in repository.FINAL:
                raise pexc.JobAborted(f"experiment {experiment_id} was cancelled before it started")
            return f"experiment {experiment_id}: nothing to do ({current['status'] if current else 'gone'})"
        out = service.job_dir(self.settings.experiments_dir, experiment_id).resolve()
        proc: asyncio.subprocess.Process | None = None
        try:
            await asyncio.to_thread(_write_source, out, row["source"])
            (out / "outcome.json").unlink(missing_ok=True)
            log.info("experiment %d: running in %s (%d processes)", experiment_id, out, self.processes())
            proc = await self._spawn(out)
            cancelled = await self._watch(experiment_id, out, proc, int(row["replications_target"]))
        except asyncio.CancelledError:
            reason = context.abort_reason()
            if proc is not None:
                await asyncio.shield(self._stop(proc))
            async with self.pool.connection() as conn:
                await self._record_progress(conn, experiment_id, out, None)
                if reason is AbortReason.SHUTDOWN:
                    await repository.requeue(conn, experiment_id)
                else:
                    await repository.finish(conn, experiment_id, "cancelled")
            if reason is AbortReason.SHUTDOWN:
                log.info("experiment %d: worker stopping, back to the queue", experiment_id)
                raise pexc.JobAborted("the worker stopped; the job goes back to the queue") from None
            log.info("experiment %d: cancelled", experiment_id)
            raise pexc.JobAborted(f"experiment {experiment_id} was cancelled") from None
        return await self._finish(experiment_id, out, proc.returncode, cancelled)

    async def _spawn(self, out: Path) -> asyncio.subprocess.Process:
        with (out / "runner.log").open("ab") as runner_log:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                child_module.__name__,
                str(out),
                "--processes",
                str(self.processes()),
                "--parent",
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=runner_log,
                stderr=runner_log,
                start_new_session=True,  # its own process group: SIGINT reaches it and its pool only
                cwd=service.PROJECT_ROOT,  # where the bundled network paths of a file are relative to
            )

    async def _watch(self, experiment_id: int, out: Path, proc: asyncio.subprocess.Process, target: int) -> bool:
        """Until the child ends: progress into the row; True if it was stopped for a cancel."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=POLL_S)
            async with self.pool.connection() as conn:
                cancel = await self._record_progress(conn, experiment_id, out, target)
            if proc.returncode is not None:
                return False
            if cancel:
                log.info("experiment %d: cancel asked, stopping its runner", experiment_id)
                await self._stop(proc)
                return True

    async def _record_progress(
        self, conn: AsyncConnection[Any], experiment_id: int, out: Path, target: int | None
    ) -> bool:
        progress = _read_json(out / "progress.json") or {}
        done = await asyncio.to_thread(child_module.stored_count, out)
        row_target = int(progress.get("target", target if target is not None else done))
        return await repository.progress(conn, experiment_id, done, max(row_target, done))

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGINT to the child's process group (as Ctrl-C), then SIGKILL if it lingers."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), timeout=STOP_GRACE_S)
        except TimeoutError:
            log.warning("runner %d did not stop within %.0f s after SIGINT: killing it", proc.pid, STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _finish(self, experiment_id: int, out: Path, code: int | None, cancelled: bool) -> str:
        outcome = _read_json(out / "outcome.json") or {}
        done = await asyncio.to_thread(child_module.stored_count, out)
        if cancelled or outcome.get("status") == "interrupted":
            async with self.pool.connection() as conn:
                await repository.finish(conn, experiment_id, "cancelled", done=done)
            log.info("experiment %d: cancelled with %d replications kept", experiment_id, done)
            raise pexc.JobAborted(f"experiment {experiment_id} was cancelled")
        async with self.pool.connection() as conn:
            if code == 0 and outcome.get("status") == "succeeded":
                await repository.finish(
                    conn, experiment_id, "succeeded", report=outcome.get("report"), done=done, target=done
                )
                log.info("experiment %d: succeeded (%d replications)", experiment_id, done)
                return f"experiment {experiment_id}: succeeded, {done} replications"
            error = outcome.get("error") or (
                f"the runner process ended with {'signal ' + str(-code) if code is not None and code < 0 else code}"
                f" ({_last_line(out / 'runner.log') or 'no output'})"
            )
            await repository.finish(conn, experiment_id, "failed", error=error, done=done)
        log.warning("experiment %d: failed: %s", experiment_id, error)
        raise ExperimentFailedError(error)


def build_app(settings: Settings, pool: Pool) -> procrastinate.App:
    """The worker's procrastinate app (open it on ``pool``), with the experiment task."""
    app = queue.new_app()
    runner = JobRunner(settings, pool)
    app.task(
        name=queue.TASK_NAME,
        queue=queue.QUEUE,
        pass_context=True,
        # Only a job aborted by a worker's shutdown goes back to the queue (procrastinate retries
        # JobAborted only when the abort's reason is the shutdown); failures are the experiment's.
        retry=procrastinate.RetryStrategy(retry_exceptions={pexc.JobAborted}),
    )(runner.run)
    return app


async def recover_stalled(app: procrastinate.App, pool: Pool, settings: Settings) -> int:
    """Give the jobs of workers that stopped sending heartbeats back to the queue; how many."""
    stalled = await app.job_manager.get_stalled_jobs(
        queue=queue.QUEUE, seconds_since_heartbeat=settings.experiment_worker_stalled_s
    )
    taken = 0
    for job in stalled:
        if job.id is None:
            continue
        try:
            await app.job_manager.retry_job(job)
        except Exception as exc:  # another worker was quicker, or it ended meanwhile
            log.debug("stalled job %s not retried: %s", job.id, exc)
            continue
        async with pool.connection() as conn:
            await repository.requeue_job(conn, job.id)
        log.warning("job %s of a worker that stopped sending heartbeats goes back to the queue", job.id)
        taken += 1
    return taken


async def _recover_periodically(app: procrastinate.App, pool: Pool, settings: Settings) -> None:
    interval = max(0.5, min(settings.experiment_worker_stalled_s / 3, 30.0))
    while True:
        try:
            await recover_stalled(app, pool, settings)
        except Exception:
            log.exception("checking for stalled experiment jobs failed; trying again")
        await asyncio.sleep(interval)


async def _autocommit(conn: AsyncConnection[Any]) -> None:
    await conn.set_autocommit(True)


async def serve(settings: Settings, *, database_url: str | None = None) -> None:
    """Run the worker until SIGINT/SIGTERM."""
    url = database_url or settings.database_url
    if url is None:
        raise ValueError("the worker needs a database: set MOLO_DATABASE_URL")
    if settings.experiment_worker_stalled_s <= 2 * settings.experiment_worker_heartbeat_s:
        raise ValueError("MOLO_EXPERIMENT_WORKER_STALLED_S must exceed twice MOLO_EXPERIMENT_WORKER_HEARTBEAT_S")
    pool: Pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=4 + 2 * settings.experiment_worker_concurrency,
        open=False,
        kwargs={"application_name": "molo-worker"},
        # Autocommit set here, not in kwargs: procrastinate opens its LISTEN connection with the pool's
        # kwargs plus autocommit=True of its own (both would clash).
        configure=_autocommit,
        check=AsyncConnectionPool.check_connection,
    )
    await pool.open(wait=True, timeout=30)
    name = f"molo-worker@{socket.gethostname().split('.')[0]}:{os.getpid()}"
    try:
        app = build_app(settings, pool)
        async with app.open_async(pool=pool):
            recovery = asyncio.create_task(_recover_periodically(app, pool, settings), name="stalled-jobs")
            log.info(
                "experiment worker %s: queue %r, results in %s, %d job(s) at once",
                name,
                queue.QUEUE,
                settings.experiments_dir.resolve(),
                settings.experiment_worker_concurrency,
            )
            try:
                await app.run_worker_async(
                    queues=[queue.QUEUE],
                    name=name,
                    concurrency=settings.experiment_worker_concurrency,
                    update_heartbeat_interval=settings.experiment_worker_heartbeat_s,
                    stalled_worker_timeout=settings.experiment_worker_stalled_s,
                    shutdown_graceful_timeout=0,  # interrupt running jobs at once; they are resumed
                    # A job handed back by recover_stalled comes without a NOTIFY: poll this often.
                    fetch_job_polling_interval=FETCH_POLL_S,
                    install_signal_handlers=True,
                )
            finally:
                recovery.cancel()
                await asyncio.gather(recovery, return_exceptions=True)
    finally:
        await pool.close()
    log.info("experiment worker %s stopped", name)


def run_worker(settings: Settings) -> int:
    """``molo worker``: serve until SIGINT/SIGTERM; the exit code."""
    try:
        asyncio.run(serve(settings))
    except ValueError as exc:
        print(f"molo worker: {exc}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, PoolTimeout) as exc:
        print(f"molo worker: the database is not reachable: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
