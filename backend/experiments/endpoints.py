"""Endpoints under ``/api/v1/experiments``: what-if experiments for researchers (and operators).

Submit an experiment file (the TOML text as the body, ``Content-Type: application/toml`` or
``text/plain``), follow its job, fetch its summary and comparisons as JSON, its tables as CSV and its
HTML report, and cancel it. Couriers get 403 ``forbidden_role``. Jobs are run by ``molo worker``;
docs/experiments.md, "Over the API".
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from backend.api.auth import ViewerDep
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import ApiError
from backend.experiments import queue, repository, service
from backend.settings import Settings
from simulator.experiment import ExperimentError

router = APIRouter(prefix="/api/v1/experiments", tags=["experiments"])

PREFIX = "/api/v1/experiments"
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ExperimentId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the experiment's id (from its submission)")]
MEDIA_TYPES = ("application/toml", "text/plain")
#: A report is the runner's self-contained page: its own styles and data: images, nothing fetched,
#: no scripts, and (sandbox) an origin of its own, so nothing in it can act as the caller.
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; base-uri 'none'; "
    "form-action 'none'; sandbox"
)

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
    403: {"description": "`forbidden_role`: researchers and operators only"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "`experiment_not_found`"}}
_RESULTS: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    404: {"description": "`experiment_not_found`, or `results_missing` (the results folder has no such table)"},
    409: {"description": "`results_not_ready`: the tables are written when the experiment succeeds"},
}


class Replications(BaseModel):
    done: int = Field(description="finished and stored replications")
    target: int = Field(description="replications the runner wants now (sequential designs may raise it)")
    max: int = Field(description="replications at most (points x n, or x max for sequential replications)")


class ExperimentOut(BaseModel):
    id: int
    name: str
    description: str
    status: Status
    cancel_requested: bool = Field(description="a cancel was asked; a running job ends cancelled within seconds")
    points: int = Field(description="design points")
    replications: Replications
    box_days: int = Field(description="simulated box-days at most (its size against MOLO_EXPERIMENT_MAX_BOX_DAYS)")
    attempts: int = Field(description="times a worker started it (more than 1: resumed after a worker stopped)")
    error: str | None = Field(description="why it failed: the runner's one-line message")
    report_available: bool
    submitted_by: str | None = Field(description="name of the API key that submitted it")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    status_url: str
    links: dict[str, str] = Field(description="summary, comparisons, results_csv, summary_csv, comparisons_csv, report")


class TableOut(BaseModel):
    id: int
    name: str
    table: Literal["summary", "comparisons"]
    rows: list[dict[str, Any]] = Field(description="the runner's table, a row per point and metric (NaN as null)")


def _out(row: repository.Row, settings: Settings) -> ExperimentOut:
    experiment_id = int(row["id"])
    url = f"{PREFIX}/{experiment_id}"
    report = (
        row["status"] == "succeeded"
        and service.report_file(service.job_dir(settings.experiments_dir, experiment_id), row["report"]) is not None
    )
    return ExperimentOut(
        id=experiment_id,
        name=row["name"],
        description=row["description"],
        status=row["status"],
        cancel_requested=row["cancel_requested_at"] is not None,
        points=row["points"],
        replications=Replications(
            done=row["replications_done"], target=row["replications_target"], max=row["replications_max"]
        ),
        box_days=row["box_days"],
        attempts=row["attempts"],
        error=row["error"],
        report_available=report,
        submitted_by=row["submitted_by_name"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        status_url=url,
        links={
            "summary": f"{url}/summary",
            "comparisons": f"{url}/comparisons",
            "results_csv": f"{url}/results.csv",
            "summary_csv": f"{url}/summary.csv",
            "comparisons_csv": f"{url}/comparisons.csv",
            "report": f"{url}/report",
        },
    )


async def _row(conn: ConnDep, experiment_id: int) -> repository.Row:
    row = await repository.get(conn, experiment_id)
    if row is None:
        raise ApiError(404, "experiment_not_found", f"no experiment {experiment_id}")
    return row


def _finished(row: repository.Row) -> None:
    if row["status"] != "succeeded":
        progress = f"{row['replications_done']} of {row['replications_target']} replications"
        raise ApiError(
            409,
            "results_not_ready",
            f"experiment {row['id']} is {row['status']} ({progress}); its tables are written when it succeeds",
            {"status": row["status"]},
        )


@router.post(
    "",
    response_model=ExperimentOut,
    status_code=201,
    summary="Submit an experiment file (TOML) to run as a job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the experiment file as `molo experiment run` takes it (see simulator/experiments/)",
            "content": {media: {"schema": {"type": "string"}} for media in MEDIA_TYPES},
        }
    },
    responses={
        **_AUTH,
        201: {"description": "queued; `status_url` follows it (also in the Location header)"},
        415: {"description": "`unsupported_media_type`: send application/toml or text/plain"},
        422: {
            "description": "`invalid_experiment` (the runner's one-line message, naming the line) or "
            "`experiment_too_large` (the limit, the job's size and the setting; details give the numbers)"
        },
    },
)
async def submit(
    request: Request, response: Response, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> ExperimentOut:
    """Checked as `molo experiment run` checks it, sized against the limits, stored and queued in one
    transaction. Over the API the base scenario is a bundled one and `network.file` cannot be set."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the experiment file as {' or '.join(MEDIA_TYPES)}")
    try:
        source = (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, "invalid_experiment", f"the experiment file is not UTF-8 text (byte {exc.start})") from None
    if not source.strip():
        raise ApiError(422, "invalid_experiment", "the experiment file is empty")
    try:
        checked = await to_thread.run_sync(service.check_experiment, source, service.Limits.of(settings))
    except ExperimentError as exc:
        raise ApiError(422, "invalid_experiment", str(exc)) from None
    except service.ExperimentTooLargeError as exc:
        raise ApiError(422, "experiment_too_large", exc.message, exc.details) from None
    app = await queue.opened(request.app.state.pool, request.app.state)
    experiment_id = await service.submit(conn, app, checked, source, who.key_id)
    out = _out(await _row(conn, experiment_id), settings)
    response.headers["Location"] = out.status_url
    return out


@router.get("", response_model=list[ExperimentOut], summary="Experiment jobs, newest first", responses=_AUTH)
async def list_experiments(
    conn: ConnDep,
    settings: SettingsDep,
    who: ViewerDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ExperimentOut]:
    return [_out(row, settings) for row in await repository.list_recent(conn, limit=limit, status=status)]


@router.get(
    "/{experiment_id}",
    response_model=ExperimentOut,
    summary="One experiment job: status, replications done of the target, timestamps, error",
    responses={**_AUTH, **_NOT_FOUND},
)
async def get_experiment(
    experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> ExperimentOut:
    return _out(await _row(conn, experiment_id), settings)


async def _table(
    experiment_id: int, name: Literal["summary", "comparisons"], conn: ConnDep, settings: Settings
) -> TableOut:
    row = await _row(conn, experiment_id)
    _finished(row)
    out = service.job_dir(settings.experiments_dir, experiment_id)
    rows = await to_thread.run_sync(service.read_table, out, name)
    if rows is None:
        raise _missing(out, f"{name}.parquet")
    return TableOut(id=experiment_id, name=row["name"], table=name, rows=rows)


def _missing(out: Any, file: str) -> ApiError:
    return ApiError(
        404,
        "results_missing",
        f"the results folder {out} has no {file}; do the API and the workers share MOLO_EXPERIMENTS_DIR?",
    )


@router.get(
    "/{experiment_id}/summary",
    response_model=TableOut,
    summary="Per point and metric: n, mean, sd and the 95% CI (the runner's summary table)",
    responses=_RESULTS,
)
async def summary(experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep) -> TableOut:
    return await _table(experiment_id, "summary", conn, settings)


@router.get(
    "/{experiment_id}/comparisons",
    response_model=TableOut,
    summary="Per point and metric: the paired difference against the baseline, with its CI",
    responses=_RESULTS,
)
async def comparisons(experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep) -> TableOut:
    return await _table(experiment_id, "comparisons", conn, settings)


async def _csv(experiment_id: int, name: str, conn: ConnDep, settings: Settings) -> FileResponse:
    row = await _row(conn, experiment_id)
    _finished(row)
    out = service.job_dir(settings.experiments_dir, experiment_id)
    path = out / f"{name}.csv"
    if not path.is_file():
        raise _missing(out, path.name)
    return FileResponse(
        path,
        media_type="text/csv; charset=utf-8",
        filename=f"experiment-{experiment_id}-{row['name']}-{name}.csv",
    )


_CSV: dict[int | str, dict[str, Any]] = {**_RESULTS, 200: {"content": {"text/csv": {}}, "description": "the table"}}


@router.get(
    "/{experiment_id}/results.csv",
    summary="Tidy results: a row per point, replication, metric [, box]",
    response_class=FileResponse,
    responses=_CSV,
)
async def results_csv(
    experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> FileResponse:
    return await _csv(experiment_id, "results", conn, settings)


@router.get(
    "/{experiment_id}/summary.csv",
    summary="The summary table as CSV",
    response_class=FileResponse,
    responses=_CSV,
)
async def summary_csv(
    experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> FileResponse:
    return await _csv(experiment_id, "summary", conn, settings)


@router.get(
    "/{experiment_id}/comparisons.csv",
    summary="The comparisons table as CSV",
    response_class=FileResponse,
    responses=_CSV,
)
async def comparisons_csv(
    experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> FileResponse:
    return await _csv(experiment_id, "comparisons", conn, settings)


@router.get(
    "/{experiment_id}/report",
    summary="The experiment's HTML report, if the runner made one",
    response_class=FileResponse,
    responses={
        **_AUTH,
        200: {"content": {"text/html": {}}, "description": "a self-contained page (no scripts, nothing fetched)"},
        404: {"description": "`experiment_not_found`, or `report_not_available` (not finished, or no report made)"},
    },
)
async def report(experiment_id: ExperimentId, conn: ConnDep, settings: SettingsDep, who: ViewerDep) -> FileResponse:
    row = await _row(conn, experiment_id)
    path = service.report_file(service.job_dir(settings.experiments_dir, experiment_id), row["report"])
    if row["status"] != "succeeded" or path is None:
        why = (
            f"experiment {experiment_id} is {row['status']}"
            if row["status"] != "succeeded"
            else "the runner made no HTML report for it (simulator/report.py is not installed, or it failed)"
        )
        raise ApiError(404, "report_not_available", f"no report: {why}")
    return FileResponse(
        path,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": REPORT_CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


_CANCEL: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    **_NOT_FOUND,
    202: {"description": "cancelled (queued), or asked to stop (running: within seconds, finished replications kept)"},
    409: {"description": "`experiment_ended`: it succeeded or failed already"},
}


async def _cancel(request: Request, experiment_id: int, conn: ConnDep, settings: Settings) -> ExperimentOut:
    app = await queue.opened(request.app.state.pool, request.app.state)
    row = await service.cancel(conn, app, experiment_id)
    if row is None:
        raise ApiError(404, "experiment_not_found", f"no experiment {experiment_id}")
    if row["status"] in ("succeeded", "failed"):
        raise ApiError(
            409, "experiment_ended", f"experiment {experiment_id} has {row['status']} already; nothing to cancel"
        )
    return _out(row, settings)


@router.delete(
    "/{experiment_id}",
    response_model=ExperimentOut,
    status_code=202,
    summary="Cancel an experiment job",
    responses=_CANCEL,
)
async def delete_experiment(
    experiment_id: ExperimentId, request: Request, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> ExperimentOut:
    """The same as POST .../cancel: the job stops; its results folder and row are kept."""
    return await _cancel(request, experiment_id, conn, settings)


@router.post(
    "/{experiment_id}/cancel",
    response_model=ExperimentOut,
    status_code=202,
    summary="Cancel an experiment job",
    responses=_CANCEL,
)
async def cancel_experiment(
    experiment_id: ExperimentId, request: Request, conn: ConnDep, settings: SettingsDep, who: ViewerDep
) -> ExperimentOut:
    """A queued job is cancelled at once; a running one stops within seconds and keeps its finished
    replications."""
    return await _cancel(request, experiment_id, conn, settings)
