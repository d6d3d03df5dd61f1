"""Message models: the event envelope and its payloads, box status, commands and their acks.

Every message is JSON (UTF-8) on the topics of :mod:`contract.topics`. Models forbid unknown fields,
are strict about types (``"5"`` is not a number), refuse NUL characters (PostgreSQL text cannot hold
them) and cap sizes. ``decode_*`` functions turn raw bytes into a model or raise
:class:`~contract.errors.ContractError` with a precise, machine-readable reason.

Event envelope (``molo/v1/boxes/{box_id}/events`` and ``.../telemetry``)::

    {"v": 1, "box_id": "aal-001", "seq": 42, "session": 3, "ts_ms": 1767225600000,
     "type": "parcel.deposited",
     "payload": {"compartment": 5, "size_class": "B", "parcel_id": "P-1", "carrier": "gls"}}

``seq`` is the box's own counter: it starts at 1, never goes backwards and survives restarts (the
firmware keeps it on disk), so ``(box_id, seq)`` names one event for ever. ``session`` counts the
box's boots/connections; the status topic uses it to order birth and Last Will.
"""

from __future__ import annotations

import json
import operator
import re
from enum import StrEnum
from types import UnionType
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    Self,
    TypeAlias,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
)
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from contract.domain import (
    MAX_COMPARTMENTS,
    PARCEL_MAX_WEIGHT_KG,
    BoxLayout,
    CompartmentKind,
    SizeClass,
    WasteFraction,
)
from contract.errors import ContractError, ErrorCode
from contract.topics import BOX_ID_PATTERN

SCHEMA_VERSION: Literal[1] = 1
#: Events and telemetry larger than this are refused before parsing.
MAX_EVENT_BYTES = 8 * 1024
#: Status messages carry the box layout and may be larger.
MAX_STATUS_BYTES = 32 * 1024
#: 2000-01-01 .. 2100-01-01 in ms: a device clock outside this is broken, not early or late.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_byte", "text must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
BoxId = Annotated[str, Field(pattern=BOX_ID_PATTERN)]
ParcelId = Annotated[Text, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
CarrierId = Annotated[Text, Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,31}$")]
CompartmentId = Annotated[int, Field(ge=1, le=MAX_COMPARTMENTS)]
TimestampMs = Annotated[int, Field(ge=MIN_TS_MS, lt=MAX_TS_MS)]
Seq = Annotated[int, Field(ge=1, lt=2**63)]
Session = Annotated[int, Field(ge=1, lt=2**63)]
Detail = Annotated[Text, Field(max_length=500)]


class WireModel(BaseModel):
    """Base of every message: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- event payloads


class EventPayload(WireModel):
    """Base of event payloads; ``TYPE`` is the envelope's ``type`` string."""

    TYPE: ClassVar[str]


class ParcelDeposited(EventPayload):
    """A courier put a parcel into a compartment for a resident to collect."""

    TYPE: ClassVar[str] = "parcel.deposited"
    compartment: CompartmentId
    size_class: SizeClass
    parcel_id: ParcelId
    carrier: CarrierId
    weight_kg: Annotated[float, Field(gt=0, le=PARCEL_MAX_WEIGHT_KG)] | None = None


class ParcelCollected(EventPayload):
    """The resident collected the parcel."""

    TYPE: ClassVar[str] = "parcel.collected"
    compartment: CompartmentId
    parcel_id: ParcelId


class ParcelExpired(EventPayload):
    """The pickup window ran out and the carrier took the parcel back."""

    TYPE: ClassVar[str] = "parcel.expired"
    compartment: CompartmentId
    parcel_id: ParcelId
    carrier: CarrierId


class ParcelDroppedOff(EventPayload):
    """A resident dropped off a parcel for sending."""

    TYPE: ClassVar[str] = "parcel.dropped_off"
    compartment: CompartmentId
    size_class: SizeClass
    parcel_id: ParcelId
    carrier: CarrierId
    weight_kg: Annotated[float, Field(gt=0, le=PARCEL_MAX_WEIGHT_KG)] | None = None


class ParcelPickedUp(EventPayload):
    """A carrier picked up a parcel that a resident had dropped off for sending."""

    TYPE: ClassVar[str] = "parcel.picked_up"
    compartment: CompartmentId
    parcel_id: ParcelId
    carrier: CarrierId


class WasteDeposited(EventPayload):
    """A resident put hazardous household waste into a red box."""

    TYPE: ClassVar[str] = "waste.deposited"
    compartment: CompartmentId
    fraction: WasteFraction
    weight_kg: Annotated[float, Field(gt=0, le=10)]


class WasteCollected(EventPayload):
    """A red box was collected (emptied and replaced)."""

    TYPE: ClassVar[str] = "waste.collected"
    compartment: CompartmentId
    carrier: CarrierId
    courier_id: Annotated[Text, Field(min_length=1, max_length=64)] | None = None
    weight_kg: Annotated[float, Field(ge=0, le=50)]


class DoorOpened(EventPayload):
    TYPE: ClassVar[str] = "door.opened"
    compartment: CompartmentId


class DoorClosed(EventPayload):
    TYPE: ClassVar[str] = "door.closed"
    compartment: CompartmentId


class DoorLeftOpen(EventPayload):
    """A door has stood open longer than the box's limit."""

    TYPE: ClassVar[str] = "door.left_open"
    compartment: CompartmentId
    open_s: Annotated[int, Field(ge=0, le=10_000_000)]


class FaultKind(StrEnum):
    JAMMED_DOOR = "jammed_door"
    LOCK_FAILURE = "lock_failure"
    SENSOR_FAILURE = "sensor_failure"
    OUT_OF_SERVICE = "out_of_service"


class CompartmentFault(EventPayload):
    """A compartment stopped working."""

    TYPE: ClassVar[str] = "compartment.fault"
    compartment: CompartmentId
    fault: FaultKind
    detail: Detail | None = None


class CompartmentRestored(EventPayload):
    """A faulty compartment works again."""

    TYPE: ClassVar[str] = "compartment.restored"
    compartment: CompartmentId


class CompartmentReading(WireModel):
    id: CompartmentId
    occupied: bool
    door_open: bool = False
    in_service: bool = True


class RedBoxReading(WireModel):
    compartment: CompartmentId
    weight_kg: Annotated[float, Field(ge=0, le=50)]


class PowerSource(StrEnum):
    MAINS = "mains"
    BATTERY = "battery"


class Telemetry(EventPayload):
    """Periodic reading of the whole box; also the heartbeat the backend watches."""

    TYPE: ClassVar[str] = "telemetry"
    power: PowerSource
    battery_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    temperature_c: Annotated[float, Field(ge=-50, le=90)]
    compartments: Annotated[list[CompartmentReading], Field(max_length=MAX_COMPARTMENTS)]
    red_boxes: Annotated[list[RedBoxReading], Field(max_length=MAX_COMPARTMENTS)]


PAYLOAD_TYPES: tuple[type[EventPayload], ...] = (
    ParcelDeposited,
    ParcelCollected,
    ParcelExpired,
    ParcelDroppedOff,
    ParcelPickedUp,
    WasteDeposited,
    WasteCollected,
    DoorOpened,
    DoorClosed,
    DoorLeftOpen,
    CompartmentFault,
    CompartmentRestored,
    Telemetry,
)
PAYLOAD_BY_TYPE: dict[str, type[EventPayload]] = {p.TYPE: p for p in PAYLOAD_TYPES}
EVENT_TYPES: tuple[str, ...] = tuple(PAYLOAD_BY_TYPE)


# --------------------------------------------------------------------------- envelope


class BoxEvent(WireModel):
    """The envelope of every event and telemetry message (see the module docstring).

    Concrete messages are one subclass per ``type`` (generated below), so validation picks the payload
    model from the ``type`` tag in one pass.
    """

    v: Literal[1]
    box_id: BoxId
    seq: Seq
    session: Session
    ts_ms: TimestampMs
    type: str
    payload: EventPayload


def _envelope_class(payload_cls: type[EventPayload]) -> type[BoxEvent]:
    name = "".join(part.title() for part in re.split(r"[._]", payload_cls.TYPE)) + "Event"
    tag: Any = Literal[payload_cls.TYPE]  # a Literal built at runtime from the table
    cls = create_model(
        name,
        __base__=BoxEvent,
        __doc__=f"Envelope of a ``{payload_cls.TYPE}`` event.",
        type=(tag, ...),
        payload=(payload_cls, ...),
    )
    return cls


EVENT_CLASSES: dict[str, type[BoxEvent]] = {t: _envelope_class(p) for t, p in PAYLOAD_BY_TYPE.items()}
# A discriminated union over the generated classes: the ``type`` tag selects the payload model.
EventUnion: TypeAlias = Annotated[  # type: ignore[valid-type]
    Union[tuple(EVENT_CLASSES.values())],  # noqa: UP007 - built at runtime from the table above
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[BoxEvent] = cast(TypeAdapter[BoxEvent], TypeAdapter(EventUnion))


def make_event(*, box_id: str, seq: int, session: int, ts_ms: int, payload: EventPayload) -> BoxEvent:
    """Wrap ``payload`` in its envelope (validating everything, as the receiver will)."""
    cls = EVENT_CLASSES[payload.TYPE]
    return cls(
        v=SCHEMA_VERSION, box_id=box_id, seq=seq, session=session, ts_ms=ts_ms, type=payload.TYPE, payload=payload
    )


# --------------------------------------------------------------------------- status


class StatusReason(StrEnum):
    """Why a status was published: a birth, the box's own orderly shutdown, or the Last Will that
    the broker publishes when the connection is lost without a DISCONNECT."""

    BIRTH = "birth"
    SHUTDOWN = "shutdown"
    CONNECTION_LOST = "connection_lost"


class Status(WireModel):
    """Retained on ``.../status``: the birth (online, with the layout) or the Last Will (offline).

    ``session`` orders them: it grows with every connection of the box (not only every boot), and
    the will registered for a connection carries that connection's session. A status with a lower
    session than the newest seen is stale and must not overwrite it; an offline status of the same
    session ends that session (the backend enforces both).
    """

    v: Literal[1]
    box_id: BoxId
    online: bool
    session: Session
    reason: StatusReason | None = None
    ts_ms: TimestampMs | None = None
    firmware: Annotated[Text, Field(max_length=64)] | None = None
    layout: BoxLayout | None = None


# --------------------------------------------------------------------------- commands


class CommandAction(StrEnum):
    OPEN_COMPARTMENT = "open_compartment"
    SET_COMPARTMENT_SERVICE = "set_compartment_service"
    SET_MAINTENANCE = "set_maintenance"
    PING = "ping"
    #: Hold a parcel door for a courier's reservation: the box offers it for nothing else.
    RESERVE_COMPARTMENT = "reserve_compartment"
    #: End a hold (cancelled, expired or fulfilled).
    RELEASE_COMPARTMENT = "release_compartment"


class Command(WireModel):
    """Sent by the backend on ``.../commands``. Boxes execute each ``command_id`` at most once."""

    v: Literal[1]
    command_id: UUID
    box_id: BoxId
    ts_ms: TimestampMs
    action: CommandAction
    compartment: CompartmentId | None = None
    enabled: bool | None = None

    @model_validator(mode="after")
    def _params(self) -> Self:
        needs_compartment = {
            CommandAction.OPEN_COMPARTMENT,
            CommandAction.SET_COMPARTMENT_SERVICE,
            CommandAction.RESERVE_COMPARTMENT,
            CommandAction.RELEASE_COMPARTMENT,
        }
        if self.action in needs_compartment and self.compartment is None:
            raise PydanticCustomError("missing", f"action {self.action.value} needs a compartment")
        needs_flag = {CommandAction.SET_COMPARTMENT_SERVICE, CommandAction.SET_MAINTENANCE}
        if self.action in needs_flag and self.enabled is None:
            raise PydanticCustomError("missing", f"action {self.action.value} needs enabled")
        return self


class CommandResult(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"


class CommandAck(WireModel):
    """The box's answer to a command, on ``.../commands/ack``. Repeats of a command get the same ack."""

    v: Literal[1]
    command_id: UUID
    box_id: BoxId
    ts_ms: TimestampMs
    result: CommandResult
    detail: Detail | None = None


# --------------------------------------------------------------------------- encode / decode

_ERROR_CODES: dict[str, ErrorCode] = {
    "extra_forbidden": ErrorCode.UNKNOWN_FIELD,
    "missing": ErrorCode.MISSING_FIELD,
    "union_tag_not_found": ErrorCode.MISSING_FIELD,
    "union_tag_invalid": ErrorCode.UNKNOWN_TYPE,
    "json_invalid": ErrorCode.INVALID_JSON,
    "json_type": ErrorCode.INVALID_JSON,
    "nul_byte": ErrorCode.NUL_BYTE,
    "greater_than": ErrorCode.OUT_OF_RANGE,
    "greater_than_equal": ErrorCode.OUT_OF_RANGE,
    "less_than": ErrorCode.OUT_OF_RANGE,
    "less_than_equal": ErrorCode.OUT_OF_RANGE,
    "too_long": ErrorCode.OUT_OF_RANGE,
    "too_short": ErrorCode.OUT_OF_RANGE,
    "string_too_long": ErrorCode.OUT_OF_RANGE,
    "string_too_short": ErrorCode.OUT_OF_RANGE,
    "finite_number": ErrorCode.OUT_OF_RANGE,
}


def _loc(loc: tuple[int | str, ...]) -> str:
    # Drop the union tag pydantic puts first for discriminated unions.
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in EVENT_CLASSES)]
    return ".".join(parts) or "(message)"


def _contract_error(exc: ValidationError) -> ContractError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    code = _ERROR_CODES.get(kind)
    if code is None:
        code = ErrorCode.WRONG_TYPE if kind.endswith("_type") else ErrorCode.INVALID_VALUE
    if kind == "literal_error" and first["loc"][-1:] == ("v",):
        code = ErrorCode.UNSUPPORTED_VERSION
    parts = []
    for err in errors[:5]:
        given = "" if err["type"] in {"missing", "json_invalid"} else f" (got {err.get('input')!r:.60})"
        parts.append(f"{_loc(err['loc'])}: {err['msg']}{given}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return ContractError(code, "; ".join(parts))


M = TypeVar("M", bound=WireModel)


def _precheck(raw: bytes, limit: int) -> None:
    if len(raw) > limit:
        raise ContractError(ErrorCode.PAYLOAD_TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {limit}")
    if b"\x00" in raw:
        raise ContractError(ErrorCode.NUL_BYTE, "raw NUL byte in message")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(ErrorCode.INVALID_UTF8, f"not UTF-8 at byte {exc.start}") from exc


# Duplicate keys. pydantic's JSON parser keeps the last of two equal keys ("seq":29,"seq":30 is seq
# 30), other parsers keep the first or refuse: a message that means different things to different
# readers is refused (``duplicate_key``). Parsing every message a second time with an
# ``object_pairs_hook`` would double the decode cost (docs/protocol.md), so the full check runs only
# when a cheap count cannot rule a duplicate out:
#
# - every key in the raw JSON is followed by exactly one ``:`` byte, so K (keys, counting repeats)
#   <= C (``:`` bytes in the message; a string value may hold more);
# - the models forbid unknown fields and fill ``model_fields_set`` from the input only (no aliases,
#   no "before" validators adding keys), so D, the fields set summed over the validated message and
#   its nested models, is the number of *distinct* keys per object;
# - a duplicate means K > D. So C == D proves there is none; only C > D (a ``:`` in a string value,
#   or a duplicate) pays for the full parse. A message that fails validation is checked in full too,
#   so a duplicate is reported as such even when the winning value is also invalid.


def _holds_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(arg) for arg in get_args(annotation))


def _is_leaf_list(annotation: Any) -> bool:
    """``list[M]`` (or ``list[M] | None``) of a model ``M`` with no nested models of its own."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return _is_leaf_list(args[0])
    if get_origin(annotation) is not list or len(args) != 1:
        return False
    item = args[0]
    return isinstance(item, type) and issubclass(item, BaseModel) and not _shape(item)


def _shape(cls: type[BaseModel]) -> tuple[tuple[str, bool], ...]:
    """The fields of ``cls`` that may hold nested models, each with whether it is a leaf list."""
    found = _SHAPES.get(cls)
    if found is None:
        found = tuple(
            (name, _is_leaf_list(info.annotation))
            for name, info in cls.model_fields.items()
            if _holds_model(info.annotation)
        )
        _SHAPES[cls] = found
    return found


_SHAPES: dict[type[BaseModel], tuple[tuple[str, bool], ...]] = {}
_FIELDS_SET = operator.attrgetter("__pydantic_fields_set__")  # model_fields_set, without the property


def _keys_given(message: BaseModel) -> int:
    """D above: the keys the input gave ``message`` and its nested models, each counted once."""
    count = len(_FIELDS_SET(message))
    for name, leaf_list in _shape(message.__class__):
        value = getattr(message, name)
        if value is None:
            continue
        if leaf_list:  # e.g. telemetry's compartments: counted without a Python call per item
            count += sum(map(len, map(_FIELDS_SET, value)))
        elif isinstance(value, BaseModel):
            count += _keys_given(value)
        elif isinstance(value, list | tuple):
            count += sum(_keys_given(item) for item in value if isinstance(item, BaseModel))
    return count


class _Duplicated(dict[str, Any]):
    """A JSON object that named some keys more than once: ``repeated`` maps each to its values."""

    repeated: dict[str, list[Any]]


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Duplicated(obj)
    given: dict[str, list[Any]] = {}
    for key, value in pairs:
        given.setdefault(key, []).append(value)
    marked.repeated = {key: values for key, values in given.items() if len(values) > 1}
    return marked


def _find_duplicates(node: Any, path: tuple[str, ...], out: list[str]) -> None:
    if isinstance(node, dict):
        repeated: dict[str, list[Any]] = getattr(node, "repeated", {})
        for key, values in repeated.items():
            given = ", ".join(json.dumps(v)[:40] for v in values)
            out.append(f"{'.'.join(path) or '(message)'}: duplicate key {key!r} (given {given})")
        for key, value in node.items():
            for item in repeated.get(key, [value]):  # look inside every value of a repeated key
                _find_duplicates(item, (*path, key), out)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _find_duplicates(item, (*path, str(index)), out)


def _duplicate_key_error(raw: bytes) -> ContractError | None:
    """``duplicate_key`` naming each object (field path) and key repeated in ``raw``, or None. Also
    None when ``raw`` is not JSON to Python's parser (the validator's own error then stands)."""
    try:
        tree = json.loads(raw, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return None
    found: list[str] = []
    _find_duplicates(tree, (), found)
    if not found:
        return None
    more = f"; ... and {len(found) - 5} more" if len(found) > 5 else ""
    return ContractError(ErrorCode.DUPLICATE_KEY, "; ".join(found[:5]) + more)


def _refuse_duplicate_keys(raw: bytes, message: BaseModel) -> None:
    if raw.count(b":") == _keys_given(message):
        return  # no key can be repeated (see above)
    error = _duplicate_key_error(raw)
    if error is not None:
        raise error


def decode_event(raw: bytes, *, topic_box_id: str | None = None) -> BoxEvent:
    """Parse and validate an event or telemetry message.

    ``topic_box_id`` is the box the topic (and so the broker's ACL, and so the credentials) says sent
    it; an envelope claiming another box is refused.
    """
    _precheck(raw, MAX_EVENT_BYTES)
    try:
        event = EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise (_duplicate_key_error(raw) or _contract_error(exc)) from None
    _refuse_duplicate_keys(raw, event)
    if topic_box_id is not None and event.box_id != topic_box_id:
        raise ContractError(
            ErrorCode.BOX_ID_MISMATCH,
            f"envelope box_id {event.box_id!r} was published on the topic of box {topic_box_id!r}",
        )
    return event


def _decode_model(model: type[M], raw: bytes, limit: int, topic_box_id: str | None) -> M:
    _precheck(raw, limit)
    try:
        message = model.model_validate_json(raw)
    except ValidationError as exc:
        raise (_duplicate_key_error(raw) or _contract_error(exc)) from None
    _refuse_duplicate_keys(raw, message)
    box_id = getattr(message, "box_id", None)
    if topic_box_id is not None and box_id != topic_box_id:
        raise ContractError(
            ErrorCode.BOX_ID_MISMATCH,
            f"message box_id {box_id!r} was published on the topic of box {topic_box_id!r}",
        )
    return message


def decode_status(raw: bytes, *, topic_box_id: str | None = None) -> Status:
    """Parse and validate a birth or Last Will message."""
    return _decode_model(Status, raw, MAX_STATUS_BYTES, topic_box_id)


def decode_command(raw: bytes, *, topic_box_id: str | None = None) -> Command:
    """Parse and validate a command (the box's side)."""
    return _decode_model(Command, raw, MAX_EVENT_BYTES, topic_box_id)


def decode_command_ack(raw: bytes, *, topic_box_id: str | None = None) -> CommandAck:
    """Parse and validate a command acknowledgement (the backend's side)."""
    return _decode_model(CommandAck, raw, MAX_EVENT_BYTES, topic_box_id)


def encode(message: WireModel) -> bytes:
    """Serialise a message to its wire bytes (compact JSON, fields in model order, nulls omitted)."""
    return message.model_dump_json(exclude_none=True).encode()


def check_layout(event: BoxEvent, layout: BoxLayout) -> None:
    """Refuse an event that names a door the box does not have, or the wrong kind of door."""
    payload = event.payload
    if isinstance(payload, Telemetry):
        ids = [c.id for c in payload.compartments] + [r.compartment for r in payload.red_boxes]
        for cid in ids:
            if layout.get(cid) is None:
                raise ContractError(ErrorCode.UNKNOWN_COMPARTMENT, f"box {event.box_id} has no compartment {cid}")
        for reading in payload.red_boxes:
            _expect_kind(event, layout, reading.compartment, CompartmentKind.RED_BOX)
        return
    compartment_id: int | None = getattr(payload, "compartment", None)  # every non-telemetry payload has one
    if compartment_id is None:
        return
    if layout.get(compartment_id) is None:
        raise ContractError(ErrorCode.UNKNOWN_COMPARTMENT, f"box {event.box_id} has no compartment {compartment_id}")
    if isinstance(payload, WasteDeposited | WasteCollected):
        _expect_kind(event, layout, compartment_id, CompartmentKind.RED_BOX)
    elif event.type.startswith("parcel."):
        _expect_kind(event, layout, compartment_id, CompartmentKind.PARCEL)


def _expect_kind(event: BoxEvent, layout: BoxLayout, cid: int, kind: CompartmentKind) -> None:
    compartment = layout.get(cid)
    if compartment is not None and compartment.kind is not kind:
        raise ContractError(
            ErrorCode.WRONG_COMPARTMENT_KIND,
            f"{event.type} names compartment {cid} of box {event.box_id}, which is a "
            f"{compartment.kind.value} door, not a {kind.value} door",
        )


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of every wire message, by file name (written to docs/schemas/)."""
    return {
        "event.schema.json": EVENT_ADAPTER.json_schema(),
        "status.schema.json": Status.model_json_schema(),
        "command.schema.json": Command.model_json_schema(),
        "command-ack.schema.json": CommandAck.model_json_schema(),
    }
