"""Endpoints under ``/api/v1/boxes``: the box list, one box with its compartments, a box's events.

Read-only: operators and researchers (``ViewerDep``).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from backend.api import repository, service
from backend.api.auth import ViewerDep
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import ApiError
from backend.api.schemas import BoxDetail, BoxStatus, BoxSummary, EventOut, EventPage, HistoryBucket, HistoryPage
from contract.messages import EVENT_TYPES
from contract.topics import BOX_ID_PATTERN

router = APIRouter(prefix="/api/v1/boxes", tags=["boxes"])
#: Not under /boxes: "status" is a valid box id.
status_router = APIRouter(prefix="/api/v1/box-status", tags=["boxes"])
BoxIdPath = Annotated[str, Path(pattern=BOX_ID_PATTERN, description="the box id, e.g. aal-001")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
    403: {"description": "`forbidden_role`: operators and researchers only"},
    404: {"description": "no such box (code `box_not_found`)"},
}


def _now() -> datetime:
    return datetime.now(UTC)


#: The largest page of the box list.
MAX_BOX_PAGE = 1000


@router.get(
    "",
    response_model=list[BoxSummary],
    response_class=Response,
    summary="All boxes with their live status, by id; in pages with ?limit=",
    responses={
        **{k: v for k, v in _NOT_FOUND.items() if k != 404},
        200: {
            "description": 'the boxes by id; with `limit`, a `Link` header with `rel="next"` while more follow',
            "headers": {"Link": {"description": '`</api/v1/boxes?limit=N&after=ID>; rel="next"`, the next page'}},
        },
    },
)
async def list_boxes(
    request: Request,
    conn: ConnDep,
    settings: SettingsDep,
    viewer: ViewerDep,
    limit: Annotated[
        int | None,
        Query(ge=1, le=MAX_BOX_PAGE, description="at most this many boxes (a page); without it, every box"),
    ] = None,
    after: Annotated[
        str | None, Query(pattern=BOX_ID_PATTERN, description="only boxes whose id sorts after this one")
    ] = None,
) -> Response:
    rows = await repository.list_boxes(conn, after=after, limit=None if limit is None else limit + 1)
    more = limit is not None and len(rows) > limit
    if more:
        del rows[limit:]
    # A page reads the red-box fills and open alerts of its own id range only.
    span = (rows[0]["box_id"], rows[-1]["box_id"]) if rows and (limit or after) else None
    fills = await repository.red_box_fills(conn, span=span) if rows else {}
    alerts = await repository.open_alerts_by_box(conn, span=span) if rows else {}
    body = service.summaries_json(rows, _now(), timedelta(seconds=settings.heartbeat_timeout_s), fills, alerts)
    headers = {}
    if more:
        following = request.url.include_query_params(limit=limit, after=rows[-1]["box_id"])
        headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return Response(body, media_type="application/json", headers=headers)


@status_router.get(
    "",
    response_model=list[BoxStatus],
    response_class=Response,
    summary="Every box's live status only: compact, for polling",
    responses={k: v for k, v in _NOT_FOUND.items() if k != 404},
)
async def box_status(
    conn: ConnDep,
    settings: SettingsDep,
    viewer: ViewerDep,
    online: Annotated[bool | None, Query(description="only the boxes online (true) or not online (false)")] = None,
) -> Response:
    """Online or not, why, since when, the session and the open alerts' level of every box, by id --
    what ``GET /api/v1/boxes`` says of a box's status, without its doors, red boxes and readings
    (a fraction of the bytes and the time at thousands of boxes: docs/benchmarks.md)."""
    # A box stored online may be offline by the heartbeat rule, so only "online=true" narrows the query.
    rows = await repository.box_statuses(conn, online_stored=True if online else None)
    timeout = timedelta(seconds=settings.heartbeat_timeout_s)
    return Response(service.statuses_json(rows, _now(), timeout, online=online), media_type="application/json")


@router.get(
    "/{box_id}",
    response_model=BoxDetail,
    responses=_NOT_FOUND,
    summary="One box with its compartments and latest telemetry",
)
async def get_box(box_id: BoxIdPath, conn: ConnDep, settings: SettingsDep, viewer: ViewerDep) -> BoxDetail:
    row = await repository.get_box(conn, box_id)
    if row is None:
        raise ApiError(404, "box_not_found", f"no box {box_id!r}")
    fills = await repository.red_box_fills(conn, box_id)
    alerts = await repository.list_alerts(conn, box_id=box_id, state="open", limit=1000)
    return service.detail(row, _now(), timedelta(seconds=settings.heartbeat_timeout_s), fills, alerts)


def _encode_cursor(ts: datetime, seq: int) -> str:
    raw = json.dumps({"ts": ts.isoformat(), "seq": seq}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        ts = datetime.fromisoformat(data["ts"])
        seq = int(data["seq"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this API returned") from exc
    if ts.tzinfo is None:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this API returned")
    return ts, seq


def _utc(value: datetime) -> datetime:
    """Naive times are UTC, like every device timestamp."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


@router.get(
    "/{box_id}/events",
    response_model=EventPage,
    summary="A box's events over a time range",
    responses={**_NOT_FOUND, 400: {"description": "`invalid_range` or `invalid_cursor`"}},
)
async def box_events(
    box_id: BoxIdPath,
    conn: ConnDep,
    viewer: ViewerDep,
    since: Annotated[datetime | None, Query(description="inclusive, device time (UTC if no offset)")] = None,
    until: Annotated[datetime | None, Query(description="exclusive, device time (UTC if no offset)")] = None,
    type: Annotated[
        list[Literal[EVENT_TYPES]] | None,  # type: ignore[valid-type]
        Query(description="only these event types (repeatable)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Literal["asc", "desc"] = "asc",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> EventPage:
    since, until = _aware(since), _aware(until)
    if since is not None and until is not None and since >= until:
        raise ApiError(400, "invalid_range", "since must be before until")
    if await repository.get_box(conn, box_id) is None:
        raise ApiError(404, "box_not_found", f"no box {box_id!r}")
    after = _decode_cursor(cursor) if cursor else None
    rows = await repository.box_events(
        conn, box_id, since=since, until=until, types=type, after=after, limit=limit + 1, descending=order == "desc"
    )
    more = len(rows) > limit
    rows = rows[:limit]
    items = [EventOut(**r) for r in rows]
    next_cursor = _encode_cursor(rows[-1]["ts"], rows[-1]["seq"]) if more else None
    return EventPage(items=items, next_cursor=next_cursor)


#: Bucket widths the history accepts, and the most buckets one answer may hold.
BUCKETS = {"5m": timedelta(minutes=5), "15m": timedelta(minutes=15), "1h": timedelta(hours=1),
           "6h": timedelta(hours=6), "1d": timedelta(days=1)}  # fmt: skip
MAX_BUCKETS = 2000


@router.get(
    "/{box_id}/history",
    response_model=HistoryPage,
    summary="A box's occupancy, red-box fill and temperature over a time range, in time buckets",
    responses={**_NOT_FOUND, 400: {"description": "`invalid_range` (also: more than 2,000 buckets)"}},
)
async def box_history(
    box_id: BoxIdPath,
    conn: ConnDep,
    viewer: ViewerDep,
    since: Annotated[datetime, Query(description="inclusive, the box's clock (UTC if no offset)")],
    until: Annotated[datetime, Query(description="exclusive, the box's clock (UTC if no offset)")],
    bucket: Annotated[Literal["5m", "15m", "1h", "6h", "1d"], Query(description="bucket width")] = "1h",
) -> HistoryPage:
    """Telemetry of the box aggregated per bucket (by the box's clock, buckets aligned to ``since``):
    doors occupied (mean and max), the fullest red box's weight (max), temperature (mean, min, max) and
    the readings behind each bucket. Buckets without a reading are left out."""
    start, end = _utc(since), _utc(until)
    if start >= end:
        raise ApiError(400, "invalid_range", "since must be before until")
    width = BUCKETS[bucket]
    if (end - start) / width > MAX_BUCKETS:
        raise ApiError(
            400, "invalid_range", f"{(end - start) / width:,.0f} buckets of {bucket}: at most {MAX_BUCKETS:,}; "
            "choose a wider bucket or a shorter range", details={"max_buckets": MAX_BUCKETS},
        )  # fmt: skip
    if await repository.get_box(conn, box_id) is None:
        raise ApiError(404, "box_not_found", f"no box {box_id!r}")
    rows = await repository.box_history(conn, box_id, since=start, until=end, bucket=width)
    return HistoryPage(box_id=box_id, since=start, until=end, bucket=bucket, items=[HistoryBucket(**r) for r in rows])
