"""Commands to a box: ``POST``/``GET /api/v1/boxes/{box_id}/commands``, ``GET /api/v1/commands/{id}``.

Where it sits in a message's journey: the start of the way back. The API records and publishes the
command (:func:`backend.operations.commands.send_command`, over MQTT with the backend's ``ingest``
identity); the box's acknowledgement comes back through ingest; no acknowledgement by
``expires_at`` ends ``timed_out``. Operators send; operators and researchers read.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request
from pydantic import ValidationError

from backend.api import repository
from backend.api.auth import OperatorDep, ViewerDep
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import ApiError
from backend.api.schemas import CommandIn, CommandOut
from backend.api.service import _layout
from backend.operations.commands import CommandRequest, CommandSender, get_command, send_command
from contract.messages import CommandAction
from contract.topics import BOX_ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["commands"])
BoxIdPath = Annotated[str, Path(pattern=BOX_ID_PATTERN, description="the box id, e.g. aal-001")]
_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"description": "`missing_api_key`, `invalid_api_key` or `revoked_api_key`"},
    403: {"description": "`forbidden_role`"},
}


#: What operators may send. Holds (reserve_compartment / release_compartment) belong to courier
#: reservations (backend/couriers), which keep the hold and the box's door in step.
OPERATOR_ACTIONS = frozenset(
    {
        CommandAction.OPEN_COMPARTMENT,
        CommandAction.SET_COMPARTMENT_SERVICE,
        CommandAction.SET_MAINTENANCE,
        CommandAction.PING,
    }
)


def _sender(request: Request) -> CommandSender | None:
    sender: CommandSender | None = getattr(request.app.state, "commands", None)
    return sender


@router.post(
    "/boxes/{box_id}/commands",
    response_model=CommandOut,
    status_code=202,
    summary="Send a command to a box (operators); its outcome arrives later",
    responses={
        **_AUTH,
        404: {"description": "`box_not_found`"},
        422: {
            "description": "`invalid_command` (missing parameters, or an action other than open_compartment, "
            "set_compartment_service, set_maintenance, ping) or `unknown_compartment`"
        },
        503: {"description": "`broker_unavailable`: recorded as failed, not sent (details: the command)"},
    },
)
async def post_command(
    box_id: BoxIdPath,
    body: CommandIn,
    request: Request,
    conn: ConnDep,
    settings: SettingsDep,
    operator: OperatorDep,
) -> CommandOut:
    if body.action not in OPERATOR_ACTIONS:
        raise ApiError(
            422,
            "invalid_command",
            f"{body.action.value} is not an operator command (holds are made through courier reservations)",
            {"allowed": sorted(a.value for a in OPERATOR_ACTIONS)},
        )
    box = await repository.get_box(conn, box_id)
    if box is None:
        raise ApiError(404, "box_not_found", f"no box {box_id!r}")
    layout = _layout(box)
    if layout is not None and body.compartment is not None and layout.get(body.compartment) is None:
        raise ApiError(422, "unknown_compartment", f"box {box_id} has no compartment {body.compartment}")
    try:
        row = await send_command(
            conn,
            _sender(request),
            CommandRequest(box_id=box_id, action=body.action, compartment=body.compartment, enabled=body.enabled),
            requested_by=f"{operator.name} [{operator.key_id}]",
            timeout_s=body.timeout_s or settings.command_timeout_s,
        )
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise ApiError(
            422, "invalid_command", "; ".join(str(e["msg"]) for e in errors), [{"msg": e["msg"]} for e in errors]
        ) from None
    out = CommandOut(**row)
    if out.status == "failed":
        raise ApiError(503, "broker_unavailable", out.detail or "not sent", out.model_dump(mode="json"))
    return out


@router.get(
    "/boxes/{box_id}/commands",
    response_model=list[CommandOut],
    summary="A box's commands, newest first",
    responses={**_AUTH, 404: {"description": "`box_not_found`"}},
)
async def box_commands(
    box_id: BoxIdPath, conn: ConnDep, viewer: ViewerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[CommandOut]:
    if await repository.get_box(conn, box_id) is None:
        raise ApiError(404, "box_not_found", f"no box {box_id!r}")
    await repository.expire_commands(conn, box_id)
    return [CommandOut(**r) for r in await repository.list_commands(conn, box_id, limit)]


@router.get(
    "/commands/{command_id}",
    response_model=CommandOut,
    summary="One command and what became of it",
    responses={**_AUTH, 404: {"description": "`command_not_found`"}},
)
async def command(command_id: UUID, conn: ConnDep, viewer: ViewerDep) -> CommandOut:
    row = await get_command(conn, command_id)
    if row is None:
        raise ApiError(404, "command_not_found", f"no command {command_id}")
    if row["status"] in ("pending", "sent"):
        await repository.expire_commands(conn, row["box_id"])
        row = await get_command(conn, command_id) or row
    return CommandOut(**row)
