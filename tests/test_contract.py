"""Unit tests of the wire contract: what it accepts, what it refuses and with which code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from contract import (
    SIZE_DIMENSIONS_MM,
    BoxLayout,
    ContractError,
    Dimensions,
    ErrorCode,
    MessageKind,
    SizeClass,
    decode_command,
    decode_command_ack,
    decode_event,
    decode_status,
    default_layout,
    encode,
    make_event,
    parse_topic,
    topic_for,
)
from contract.domain import WasteFraction
from contract.messages import (
    EVENT_TYPES,
    Command,
    CommandAck,
    CommandAction,
    CommandResult,
    CompartmentReading,
    ParcelDeposited,
    PowerSource,
    RedBoxReading,
    Status,
    Telemetry,
    WasteDeposited,
    check_layout,
    json_schemas,
)
from contract.receipts import Receipt, decode_receipt

T0 = 1_767_225_600_000
GOOD = encode(
    make_event(
        box_id="aal-001",
        seq=7,
        session=2,
        ts_ms=T0,
        payload=ParcelDeposited(compartment=5, size_class=SizeClass.B, parcel_id="P-1", carrier="gls"),
    )
)


def refused(raw: bytes, **kwargs: str) -> ContractError:
    with pytest.raises(ContractError) as info:
        decode_event(raw, **kwargs)
    return info.value


def test_event_round_trips_through_bytes() -> None:
    """An encoded event decodes to an equal model of the right envelope class."""
    event = decode_event(GOOD, topic_box_id="aal-001")
    assert type(event).__name__ == "ParcelDepositedEvent"
    assert isinstance(event.payload, ParcelDeposited)
    assert (event.seq, event.session, event.ts_ms, event.payload.size_class) == (7, 2, T0, SizeClass.B)
    assert encode(event) == GOOD


def test_every_event_type_has_a_payload_model_and_schema() -> None:
    """The discriminated union covers all 13 event types, and the JSON Schema lists each of them."""
    assert len(EVENT_TYPES) == 13
    schema = json.dumps(json_schemas()["event.schema.json"])
    for event_type in EVENT_TYPES:
        assert f'"{event_type}"' in schema


@pytest.mark.parametrize(
    ("raw", "code", "where"),
    [
        (GOOD.replace(b'"seq":7', b'"seq":"7"'), ErrorCode.WRONG_TYPE, "seq"),
        (GOOD.replace(b'"seq":7', b'"seq":0'), ErrorCode.OUT_OF_RANGE, "seq"),
        (GOOD.replace(b'"carrier":"gls"', b'"carrier":"gls","x":1'), ErrorCode.UNKNOWN_FIELD, "payload.x"),
        (GOOD.replace(b',"carrier":"gls"', b""), ErrorCode.MISSING_FIELD, "payload.carrier"),
        (GOOD.replace(b'"compartment":5', b'"compartment":-1'), ErrorCode.OUT_OF_RANGE, "payload.compartment"),
        (GOOD.replace(b'"size_class":"B"', b'"size_class":"Z"'), ErrorCode.INVALID_VALUE, "payload.size_class"),
        (GOOD.replace(b'"P-1"', b'"P\\u0000"'), ErrorCode.NUL_BYTE, "payload.parcel_id"),
        (GOOD.replace(b'"v":1', b'"v":2'), ErrorCode.UNSUPPORTED_VERSION, "v"),
        (GOOD.replace(b"parcel.deposited", b"parcel.teleported"), ErrorCode.UNKNOWN_TYPE, "parcel.teleported"),
        (GOOD.replace(str(T0).encode(), b"1"), ErrorCode.OUT_OF_RANGE, "ts_ms"),
        (b"[1,2]", ErrorCode.WRONG_TYPE, ""),
        (b'{"v":1', ErrorCode.INVALID_JSON, ""),
        (b"\xc3\x28", ErrorCode.INVALID_UTF8, "byte 0"),
        (b'{"v":1}\x00', ErrorCode.NUL_BYTE, "NUL"),
        (b" " * 9000, ErrorCode.PAYLOAD_TOO_LARGE, "9000 bytes"),
    ],
)
def test_malformed_events_are_refused_with_a_precise_code(raw: bytes, code: ErrorCode, where: str) -> None:
    """Each kind of malformed event gets its own code and a reason naming the field or limit."""
    error = refused(raw)
    assert error.code is code, error.detail
    assert where in error.detail


def test_negative_waste_weight_is_out_of_range() -> None:
    """A waste deposit with a negative weight is refused before it can distort KPIs."""
    raw = encode(
        make_event(
            box_id="aal-001",
            seq=1,
            session=1,
            ts_ms=T0,
            payload=WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=0.5),
        )
    ).replace(b'"weight_kg":0.5', b'"weight_kg":-0.5')
    assert refused(raw).code is ErrorCode.OUT_OF_RANGE


def test_envelope_must_name_the_topic_box() -> None:
    """An event claiming another box than its topic (and credential) is refused."""
    assert refused(GOOD, topic_box_id="aal-002").code is ErrorCode.BOX_ID_MISMATCH


def test_layout_check_refuses_unknown_and_wrong_kind_doors() -> None:
    """Compartment 40 does not exist in the default layout; door 1 is a red box, not a parcel door."""
    layout = default_layout()
    event = decode_event(GOOD)
    check_layout(event, layout)  # door 5 is a parcel door: fine
    for compartment, code in ((40, ErrorCode.UNKNOWN_COMPARTMENT), (1, ErrorCode.WRONG_COMPARTMENT_KIND)):
        bad = decode_event(GOOD.replace(b'"compartment":5', f'"compartment":{compartment}'.encode()))
        with pytest.raises(ContractError) as info:
            check_layout(bad, layout)
        assert info.value.code is code


def test_default_layout_has_two_bottom_red_boxes() -> None:
    """Doors 1 and 2 are the hazardous-waste red boxes (Nordværk's arrangement); the rest hold parcels."""
    layout = default_layout()
    assert [c.id for c in layout.red_boxes] == [1, 2]
    assert all(c.red_box_capacity_kg == 4.0 for c in layout.red_boxes)
    assert {c.size_class for c in layout.parcel_compartments} == set(SizeClass)


def test_layout_refuses_duplicate_doors() -> None:
    """Two doors with the same number make an invalid layout."""
    with pytest.raises(ValueError, match="unique"):
        BoxLayout.model_validate({"compartments": [{"id": 1, "kind": "red_box"}, {"id": 1, "kind": "red_box"}]})


def test_parcel_fits_by_rotation() -> None:
    """A 600x350x70 mm parcel fits an A compartment lying flat; a 100 mm high one does not."""
    a = SIZE_DIMENSIONS_MM[SizeClass.A]
    assert Dimensions(height_mm=600, width_mm=350, depth_mm=70).fits_in(a)
    assert not Dimensions(height_mm=600, width_mm=350, depth_mm=100).fits_in(a)


def test_topics_round_trip_and_reject_foreign_topics() -> None:
    """Box topics parse back to (box, kind); wildcards and other trees are unknown topics."""
    for kind in MessageKind:
        info = parse_topic(topic_for("aal-001", kind))
        assert (info.box_id, info.kind) == ("aal-001", kind)
    for topic in ("molo/v2/boxes/aal-001/events", "molo/v1/boxes/+/events", "molo/v1/boxes/aal-001/other"):
        with pytest.raises(ContractError) as info_:
            parse_topic(topic)
        assert info_.value.code is ErrorCode.UNKNOWN_TOPIC
    with pytest.raises(ValueError, match="invalid box id"):
        topic_for("Bad/Id", MessageKind.EVENTS)


def test_status_and_command_decode_and_validate() -> None:
    """Birth carries the layout; a command missing a needed parameter is refused."""
    birth = Status(v=1, box_id="aal-001", online=True, session=3, layout=default_layout())
    assert decode_status(encode(birth), topic_box_id="aal-001") == birth
    cmd = Command(
        v=1, command_id=uuid4(), box_id="aal-001", ts_ms=T0, action=CommandAction.OPEN_COMPARTMENT, compartment=4
    )
    assert decode_command(encode(cmd)) == cmd
    bad = encode(cmd).replace(b',"compartment":4', b"")
    with pytest.raises(ContractError) as info:
        decode_command(bad)
    assert info.value.code is ErrorCode.MISSING_FIELD


def test_telemetry_limits() -> None:
    """Telemetry temperatures outside -50..90 C are refused as out of range."""
    with pytest.raises(ValueError, match="less than or equal to 90"):
        Telemetry.model_validate({"power": "mains", "temperature_c": 120.0, "compartments": [], "red_boxes": []})


def test_committed_json_schemas_match_the_code() -> None:
    """docs/schemas/ is what `molo schemas` generates from the models (regenerate after changes)."""
    directory = Path(__file__).parent.parent / "docs" / "schemas"
    for name, schema in json_schemas().items():
        on_disk = json.loads((directory / name).read_text())
        assert on_disk == json.loads(json.dumps(schema)), f"{name} is stale: run `molo schemas`"


# --------------------------------------------------------------------------- duplicate keys

TELEMETRY = encode(
    make_event(
        box_id="aal-001",
        seq=8,
        session=2,
        ts_ms=T0,
        payload=Telemetry(
            power=PowerSource.MAINS,
            temperature_c=20.5,
            compartments=[CompartmentReading(id=i, occupied=i % 3 == 0) for i in range(3, 17)],
            red_boxes=[RedBoxReading(compartment=1, weight_kg=1.5), RedBoxReading(compartment=2, weight_kg=0.0)],
        ),
    )
)
BIRTH = encode(Status(v=1, box_id="aal-001", online=True, session=3, ts_ms=T0, firmware="t", layout=default_layout()))
ACK = encode(CommandAck(v=1, command_id=uuid4(), box_id="aal-001", ts_ms=T0, result=CommandResult.SUCCEEDED))
COMMAND = encode(
    Command(v=1, command_id=uuid4(), box_id="aal-001", ts_ms=T0, action=CommandAction.OPEN_COMPARTMENT, compartment=4)
)
RECEIPT = encode(Receipt(box_id="aal-001", seqs=[(1, 4), (7, 7)]))
Decoder = Callable[..., Any]
KINDS: dict[str, tuple[Decoder, bytes]] = {
    "event": (decode_event, GOOD),
    "telemetry": (decode_event, TELEMETRY),
    "status": (decode_status, BIRTH),
    "command_ack": (decode_command_ack, ACK),
    "command": (decode_command, COMMAND),
    "receipt": (decode_receipt, RECEIPT),
}


def _twice(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1, old
    return raw.replace(old, new)


@pytest.mark.parametrize(
    ("kind", "raw", "where", "key"),
    [
        ("event", _twice(GOOD, b'"seq":7', b'"seq":7,"seq":8'), "(message)", "seq"),
        ("event", _twice(GOOD, b'"compartment":5', b'"compartment":5,"compartment":6'), "payload", "compartment"),
        ("telemetry", _twice(TELEMETRY, b'"seq":8', b'"seq":8,"seq":9'), "(message)", "seq"),
        ("telemetry", _twice(TELEMETRY, b'"power":"mains"', b'"power":"mains","power":"battery"'), "payload", "power"),
        (
            "telemetry",
            _twice(TELEMETRY, b'{"id":5,"occupied":false', b'{"id":5,"occupied":false,"occupied":true'),
            "payload.compartments.2",
            "occupied",
        ),
        ("status", _twice(BIRTH, b'"session":3', b'"session":3,"session":2'), "(message)", "session"),
        (
            "status",
            _twice(BIRTH, b'{"id":1,"kind":"red_box"', b'{"id":1,"kind":"red_box","kind":"parcel"'),
            "layout.compartments.0",
            "kind",
        ),
        (
            "command_ack",
            _twice(ACK, b'"result":"succeeded"', b'"result":"succeeded","result":"failed"'),
            "(message)",
            "result",
        ),
        ("command_ack", _twice(ACK, b'"v":1', b'"v":1,"x":{"a":1,"a":2}'), "x", "a"),
        (
            "command",
            _twice(COMMAND, b'"compartment":4', b'"compartment":4,"compartment":5'),
            "(message)",
            "compartment",
        ),
        ("command", _twice(COMMAND, b'"v":1', b'"v":1,"x":[{"a":1,"a":2}]'), "x.0", "a"),
        (
            "receipt",
            _twice(RECEIPT, b'"box_id":"aal-001"', b'"box_id":"aal-001","box_id":"aal-001"'),
            "(message)",
            "box_id",
        ),
    ],
)
def test_duplicate_keys_are_refused_for_every_kind(kind: str, raw: bytes, where: str, key: str) -> None:
    """A key repeated in any object of any inbound kind is refused as duplicate_key, naming the path and key."""
    decode, good = KINDS[kind]
    decode(good, topic_box_id="aal-001")  # the message without the repeat is fine
    with pytest.raises(ContractError) as info:
        decode(raw, topic_box_id="aal-001")
    assert info.value.code is ErrorCode.DUPLICATE_KEY, info.value.detail
    assert f"{where}: duplicate key {key!r}" in info.value.detail


@pytest.mark.parametrize(
    ("raw", "given"),
    [
        (GOOD.replace(b'"seq":7', b'"seq":7,"seq":7'), "given 7, 7"),  # even with the same value
        (GOOD.replace(b'"seq":7', b'"seq":7 , "se\\u0071" :8'), "given 7, 8"),  # the same key, escaped and spaced
        (GOOD.replace(b'"seq":7', b'"seq":7,"seq":"x"'), 'given 7, "x"'),  # the winning value is invalid too
        (GOOD.replace(b'"seq":7', b'"seq":"x","seq":7'), 'given "x", 7'),  # the losing value is invalid
        (GOOD.replace(b'"seq":7', b'"seq":7,"seq":8,"seq":9'), "given 7, 8, 9"),
    ],
)
def test_duplicate_key_is_refused_however_it_is_spelled(raw: bytes, given: str) -> None:
    """Repeats with equal or invalid values, or an escaped spelling, are duplicate_key, with the values given."""
    error = refused(raw)
    assert error.code is ErrorCode.DUPLICATE_KEY, error.detail
    assert "duplicate key 'seq'" in error.detail
    assert given in error.detail


def test_every_duplicate_is_named_even_inside_a_repeated_value() -> None:
    """Both the repeated outer key and a repeat inside the value it overrode are reported."""
    raw = GOOD.replace(b'"v":1', b'"v":1,"w":{"a":1,"a":2},"w":3')
    detail = refused(raw).detail
    assert "(message): duplicate key 'w'" in detail
    assert "w: duplicate key 'a'" in detail


def test_colons_in_string_values_are_not_taken_for_duplicates() -> None:
    """A ':' in a string value (a parcel id may hold one) takes the full check and is accepted."""
    event = decode_event(GOOD.replace(b'"P-1"', b'"P:1:2"'))
    assert isinstance(event.payload, ParcelDeposited)
    assert event.payload.parcel_id == "P:1:2"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_valid_messages_take_the_cheap_duplicate_check(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid message of each kind is cleared by the ':' count alone: no second JSON parse."""
    decode, good = KINDS[kind]

    def no_second_parse(*args: object, **kwargs: object) -> object:
        raise AssertionError("the full duplicate-key parse ran for a valid message")

    monkeypatch.setattr(json, "loads", no_second_parse)
    decode(good, topic_box_id="aal-001")


#: One payload of every event type, optional fields given (they count as keys too).
EXAMPLES: dict[str, dict[str, Any]] = {
    "parcel.deposited": {"compartment": 5, "size_class": "B", "parcel_id": "P-1", "carrier": "gls", "weight_kg": 1.5},
    "parcel.collected": {"compartment": 5, "parcel_id": "P-1"},
    "parcel.expired": {"compartment": 5, "parcel_id": "P-1", "carrier": "gls"},
    "parcel.dropped_off": {"compartment": 6, "size_class": "A", "parcel_id": "P-2", "carrier": "dao", "weight_kg": 2},
    "parcel.picked_up": {"compartment": 6, "parcel_id": "P-2", "carrier": "dao"},
    "waste.deposited": {"compartment": 1, "fraction": "batteries", "weight_kg": 0.4},
    "waste.collected": {"compartment": 1, "carrier": "gls", "courier_id": "c-7", "weight_kg": 3.1},
    "door.opened": {"compartment": 3},
    "door.closed": {"compartment": 3},
    "door.left_open": {"compartment": 3, "open_s": 600},
    "compartment.fault": {"compartment": 4, "fault": "lock_failure", "detail": "motor stalls"},
    "compartment.restored": {"compartment": 4},
    "telemetry": {
        "power": "battery",
        "battery_pct": 80.0,
        "temperature_c": -3.5,
        "compartments": [{"id": 3, "occupied": True}, {"id": 4, "occupied": False, "door_open": True}],
        "red_boxes": [{"compartment": 1, "weight_kg": 0.4}],
    },
}


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_takes_the_cheap_duplicate_check(event_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid event of each of the 13 types, optional fields included, needs no second JSON parse."""
    envelope = {"v": 1, "box_id": "aal-001", "seq": 1, "session": 1, "ts_ms": T0, "type": event_type}
    raw = json.dumps({**envelope, "payload": EXAMPLES[event_type]}).encode()
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("the full duplicate-key parse ran"))
    assert decode_event(raw).type == event_type


def test_deep_nesting_is_refused_without_crashing_the_duplicate_check() -> None:
    """Nesting beyond Python's recursion limit still gets a contract code, not a RecursionError."""
    raw = b'{"a":' * 1300 + b"1" + b"}" * 1300
    assert refused(raw).code is ErrorCode.INVALID_JSON
    with pytest.raises(ContractError) as info:
        decode_status(b'{"v":1,"x":' * 1300 + b"1" + b"}" * 1300)
    assert info.value.code is ErrorCode.INVALID_JSON
