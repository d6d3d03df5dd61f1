"""Unit tests of the wire contract: what it accepts, what it refuses and with which code."""

from __future__ import annotations

import json
from pathlib import Path
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
    CommandAction,
    ParcelDeposited,
    Status,
    Telemetry,
    WasteDeposited,
    check_layout,
    json_schemas,
)

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
