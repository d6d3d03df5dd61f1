"""The firmware stub against a real Mosquitto started with broker_config (auth and ACL included).

Every test uses its own box id (box-021 .. box-039; other test modules use other ids) and listens as
the ``ingest`` user with plain, non-shared subscriptions. Negative checks ("nothing else was sent")
send a control message the same subscriber will receive and assert the control arrives next: the
firmware's outbox and Mosquitto both keep order, so anything sent before the control would come
first.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract import (
    MessageKind,
    SizeClass,
    Status,
    WasteFraction,
    decode_command_ack,
    decode_event,
    decode_status,
    encode,
    topic_for,
)
from contract.errors import ContractError, ErrorCode
from contract.messages import (
    BoxEvent,
    Command,
    CommandAction,
    CommandResult,
    DoorClosed,
    DoorOpened,
    ParcelDeposited,
    StatusReason,
    Telemetry,
    WasteDeposited,
)
from firmware_stub import BoxFirmware, BrokerRefusedError
from firmware_stub.db import DB_FILE
from firmware_stub.outbox import Outbox
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import Credentials
from tests.fixtures.broker import (
    TIMEOUT_S,
    add_service_user,
    close,
    mqtt_client,
    new_client,
    next_message,
    publish,
    service_client,
    subscribe,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class FakeClock:
    """A device clock the test controls: each reading is 1 ms after the previous one."""

    def __init__(self, start: int = T0) -> None:
        self.now = start

    def __call__(self) -> int:
        self.now += 1
        return self.now


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


def parcel(compartment: int = 5, parcel_id: str = "P-1") -> ParcelDeposited:
    return ParcelDeposited(compartment=compartment, size_class=SizeClass.A, parcel_id=parcel_id, carrier="gls")


def expect(client: mqtt.Client, topic: str | None = None) -> mqtt.MQTTMessage:
    """The next message (which must come within the helper timeout, on ``topic`` if given)."""
    message = next_message(client)
    assert message is not None, f"no message within {TIMEOUT_S} s"
    if topic is not None:
        assert message.topic == topic
    return message


def expect_payload(client: mqtt.Client, topic: str | None = None) -> bytes:
    """The payload of the next message (see :func:`expect`)."""
    return bytes(expect(client, topic).payload)


def expect_status(client: mqtt.Client, box_id: str) -> Status:
    return decode_status(expect_payload(client, topic_for(box_id, MessageKind.STATUS)), topic_box_id=box_id)


@pytest.fixture
def boxes(credentials: Credentials, broker: RunningBroker, tmp_path: Path) -> Iterator[Callable[..., BoxFirmware]]:
    """Factory of started boxes (state in tmp_path/<box_id>, test broker, fast reconnects);
    every box still running at teardown is killed."""
    made: list[BoxFirmware] = []

    def make(box_id: str, **overrides: Any) -> BoxFirmware:
        options: dict[str, Any] = {
            "password": credentials.boxes[box_id],
            "host": broker.host,
            "port": broker.port,
            "state_dir": tmp_path / box_id,
            "clock": FakeClock(),
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "rng": random.Random(1),
            # No ingest sends receipts here: these tests are about the box-broker hop.
            "confirm": "puback",
        }
        box = BoxFirmware(box_id, **(options | overrides))
        made.append(box)
        box.start()
        return box

    yield make
    for box in made:
        box.kill()


@pytest.fixture
def listen(broker: RunningBroker, credentials: Credentials) -> Iterator[Callable[..., mqtt.Client]]:
    """Factory of ``ingest`` clients subscribed to the given topics; closed at teardown."""
    clients: list[mqtt.Client] = []

    def make(*topics: str, on: RunningBroker | None = None) -> mqtt.Client:
        client = service_client(on or broker, credentials)
        clients.append(client)
        for topic in topics:
            assert not subscribe(client, topic).is_failure
        return client

    yield make
    for client in clients:
        close(client)


@contextmanager
def persistent_listener(broker: RunningBroker, credentials: Credentials, topic: str) -> Iterator[mqtt.Client]:
    """An ``ingest`` client with a persistent session subscribed to ``topic``, which keeps its
    subscription and queue across a broker restart (as the real ingest's does) and reconnects 1 s
    after losing the broker.

    Mosquitto 2.0.11 saves a v5 session to disk only if it was *started* with clean_start=False:
    one started clean (paho's default: clean on the first connect only) lives while the broker runs
    but is lost when it restarts, whatever its session expiry.
    """
    user = add_service_user(broker, credentials)
    client = new_client(user)
    client.username_pw_set(user, credentials.services[user])
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 300
    client.connect(broker.host, broker.port, keepalive=5, clean_start=False, properties=props)
    client.loop_start()
    try:
        assert not subscribe(client, topic).is_failure
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def own_broker(tmp_path: Path, credentials: Credentials) -> Iterator[RunningBroker]:
    """A broker of this test alone (same broker_config), for tests that stop it or need silence."""
    running = start_mosquitto(tmp_path / "own-broker", credentials)
    try:
        yield running
    finally:
        running.stop()


# --------------------------------------------------------------------------- events


def test_emitted_events_arrive_with_the_contract_envelope(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client]
) -> None:
    """emit() publishes QoS 1 envelopes (seq from 1, this session, device ts_ms) on events/telemetry."""
    box_id = "box-021"
    events_topic, telemetry_topic = topic_for(box_id, MessageKind.EVENTS), topic_for(box_id, MessageKind.TELEMETRY)
    events, telemetry = listen(events_topic), listen(telemetry_topic)
    clock = FakeClock()
    box = boxes(box_id, clock=clock)
    assert box.wait_connected(TIMEOUT_S)

    assert box.emit(parcel()) == 1
    stamped = clock.now
    assert box.telemetry(temperature_c=7.5) == 2

    message = expect(events, events_topic)
    assert message.qos == 1
    event = decode_event(bytes(message.payload), topic_box_id=box_id)
    assert (event.seq, event.session, event.ts_ms, event.type) == (1, box.session, stamped, "parcel.deposited")
    assert event.payload == parcel()
    reading = decode_event(expect_payload(telemetry, telemetry_topic), topic_box_id=box_id)
    assert reading.seq == 2
    assert isinstance(reading.payload, Telemetry)
    assert reading.payload.temperature_c == 7.5
    assert len(reading.payload.compartments) == len(box.layout.compartments)
    assert box.flush(TIMEOUT_S)
    assert box.pending_count == 0
    assert box.stats.acked == 2


def test_emit_refuses_what_the_backend_would_refuse_and_keeps_seqs_gap_free(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client]
) -> None:
    """An event naming a door the box lacks (or a parcel in a red-box door) raises and uses no seq."""
    box_id = "box-022"
    events = listen(topic_for(box_id, MessageKind.EVENTS))
    box = boxes(box_id)
    with pytest.raises(ContractError) as missing:
        box.emit(parcel(compartment=40))
    assert missing.value.code is ErrorCode.UNKNOWN_COMPARTMENT
    with pytest.raises(ContractError) as wrong_kind:
        box.emit(parcel(compartment=1))
    assert wrong_kind.value.code is ErrorCode.WRONG_COMPARTMENT_KIND
    assert box.emit(WasteDeposited(compartment=1, fraction=WasteFraction.BATTERIES, weight_kg=0.3)) == 1
    assert decode_event(expect_payload(events)).seq == 1
    assert box.pending_count == 0 or box.flush(TIMEOUT_S)


# --------------------------------------------------------------------------- birth and will


def test_birth_is_retained_online_with_session_and_layout(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client]
) -> None:
    """On connect the box publishes a retained online status with its session and layout."""
    box_id = "box-023"
    box = boxes(box_id)
    assert box.wait_connected(TIMEOUT_S)
    # Subscribing after the box is online: what arrives is the retained birth.
    late = listen()
    assert not subscribe(late, topic_for(box_id, MessageKind.STATUS)).is_failure
    message = expect(late, topic_for(box_id, MessageKind.STATUS))
    assert message.retain is True
    birth = decode_status(bytes(message.payload), topic_box_id=box_id)
    assert (birth.online, birth.reason) == (True, StatusReason.BIRTH)
    assert birth.session == box.session == 1
    assert birth.layout == box.layout
    assert birth.firmware == "molo-stub/0.1"


def test_kill_makes_the_broker_publish_the_will_and_a_reboot_a_higher_session(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client], tmp_path: Path
) -> None:
    """kill() drops the link without DISCONNECT: the retained will (offline, same session) follows;
    the rebooted box announces itself with session + 1."""
    box_id = "box-024"
    status_topic = topic_for(box_id, MessageKind.STATUS)
    watcher = listen(status_topic)
    box = boxes(box_id, keepalive=60)  # the will must come from the socket closing, not a timeout
    birth = expect_status(watcher, box_id)
    assert (birth.online, birth.session) == (True, box.session)

    started = time.monotonic()
    box.kill()
    will = expect_status(watcher, box_id)
    assert time.monotonic() - started < 5
    assert (will.online, will.session, will.reason) == (False, birth.session, StatusReason.CONNECTION_LOST)
    retained = listen(status_topic)
    assert decode_status(expect_payload(retained, status_topic)) == will

    rebooted = boxes(box_id, state_dir=tmp_path / box_id)
    second = expect_status(watcher, box_id)
    assert (second.online, second.session) == (True, birth.session + 1)
    assert rebooted.session == birth.session + 1


def test_stop_publishes_offline_itself_and_the_broker_drops_the_will(
    own_broker: RunningBroker,
    credentials: Credentials,
    boxes: Callable[..., BoxFirmware],
    listen: Callable[..., mqtt.Client],
) -> None:
    """stop() publishes a retained offline status (same session) and disconnects: no will follows."""
    box_id = "box-025"
    status_topic = topic_for(box_id, MessageKind.STATUS)
    watcher = listen(status_topic, on=own_broker)
    box = boxes(box_id, port=own_broker.port)
    birth = expect_status(watcher, box_id)
    box.stop()
    offline = expect_status(watcher, box_id)
    assert (offline.online, offline.session, offline.reason) == (False, birth.session, StatusReason.SHUTDOWN)
    assert offline.ts_ms is not None  # the graceful one is stamped; the will is not

    control = mqtt_client(own_broker, box_id, credentials.boxes[box_id], client_id=f"{box_id}-control")
    marker = json.dumps({"control": uuid.uuid4().hex}).encode()
    assert not publish(control, status_topic, marker).is_failure
    close(control)
    assert expect_payload(watcher, status_topic) == marker  # the control, not a will


# --------------------------------------------------------------------------- outbox and outages


def test_events_emitted_while_the_broker_is_down_arrive_in_order_after_it_returns(
    own_broker: RunningBroker, credentials: Credentials, boxes: Callable[..., BoxFirmware]
) -> None:
    """Events emitted during a broker outage wait in the outbox and are delivered in seq order after."""
    box_id = "box-026"
    events_topic = topic_for(box_id, MessageKind.EVENTS)
    with persistent_listener(own_broker, credentials, events_topic) as sub:
        box = boxes(box_id, port=own_broker.port)
        assert box.wait_connected(TIMEOUT_S)
        box.emit(parcel(parcel_id="P-before"))
        assert decode_event(expect_payload(sub, events_topic)).seq == 1
        first_session = box.session

        own_broker.stop()
        assert wait_for(lambda: not box.connected)
        seqs = [box.emit(parcel(parcel_id=f"P-{i}")) for i in range(5)]
        assert seqs == [2, 3, 4, 5, 6]
        assert box.pending_count == 5

        own_broker.restart()
        assert box.wait_connected(TIMEOUT_S)
        assert box.flush(TIMEOUT_S)
        # The reconnect is a new session, so the backend takes its birth over the will of the old one.
        assert box.session > first_session
        status = service_client(own_broker, credentials)
        assert not subscribe(status, topic_for(box_id, MessageKind.STATUS)).is_failure
        birth = expect_status(status, box_id)
        close(status)
        assert (birth.online, birth.session, birth.reason) == (True, box.session, StatusReason.BIRTH)
        # The subscriber's own session may redeliver seq 1 (its PUBACK can be lost in the restart):
        # at-least-once on that hop too. Count each seq once, in order of first arrival.
        seen, received = {1}, list[BoxEvent]()
        while len(received) < len(seqs):
            event = decode_event(expect_payload(sub, events_topic))
            if event.seq not in seen:
                seen.add(event.seq)
                received.append(event)
        assert [e.seq for e in received] == seqs
        assert [e.payload for e in received] == [parcel(parcel_id=f"P-{i}") for i in range(5)]


def test_messages_in_flight_when_the_link_drops_are_resent_once_by_paho_not_handed_again(
    own_broker: RunningBroker, credentials: Credentials, boxes: Callable[..., BoxFirmware]
) -> None:
    """A broker stopped in the middle of a burst: every seq arrives, first arrivals in seq order, and
    the sender handed each row to paho exactly once (paho re-sends its unacknowledged ones itself)."""
    box_id = "box-032"
    events_topic = topic_for(box_id, MessageKind.EVENTS)
    total = 300
    with persistent_listener(own_broker, credentials, events_topic) as sub:
        box = boxes(box_id, port=own_broker.port, synchronous="NORMAL")
        assert box.wait_connected(TIMEOUT_S)
        for i in range(total):
            if i == 100:
                own_broker.stop()  # with up to 100 rows handed and unacknowledged
            box.emit(parcel(parcel_id=f"P-{i}"))
        own_broker.restart()
        assert box.wait_connected(TIMEOUT_S)
        assert box.flush(TIMEOUT_S)
        assert box.stats.handed == total
        first_arrivals: list[int] = []
        while len(first_arrivals) < total:
            seq = decode_event(expect_payload(sub, events_topic)).seq
            if seq not in first_arrivals:
                first_arrivals.append(seq)
        assert first_arrivals == list(range(1, total + 1))


def test_a_rebooted_box_replays_unacked_rows_in_order_and_continues_numbering(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client], tmp_path: Path
) -> None:
    """Rows left in the outbox by a box that never reached the broker are replayed, in order, by the
    next boot on the same state_dir, whose own events continue the numbering."""
    box_id = "box-027"
    events_topic = topic_for(box_id, MessageKind.EVENTS)
    events = listen(events_topic)
    # First boot: the broker address is wrong, so nothing leaves the box.
    offline = boxes(box_id, port=1)
    assert [offline.emit(parcel(parcel_id=f"P-{i}")) for i in range(3)] == [1, 2, 3]
    offline.kill()

    box = boxes(box_id, state_dir=tmp_path / box_id)
    assert box.session == 2
    assert box.emit(parcel(parcel_id="P-new")) == 4
    received = [decode_event(expect_payload(events, events_topic)) for _ in range(4)]
    assert [e.seq for e in received] == [1, 2, 3, 4]
    assert [e.session for e in received] == [1, 1, 1, 2]  # the session they were emitted in
    assert box.flush(TIMEOUT_S)


def test_a_refused_publish_is_counted_and_kept_in_the_outbox(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client], tmp_path: Path
) -> None:
    """A row the broker refuses (PUBACK 135: another box's topic) is counted, kept, and does not
    block the rows behind it."""
    box_id = "box-028"
    events_topic = topic_for(box_id, MessageKind.EVENTS)
    with Outbox(tmp_path / box_id / DB_FILE) as outbox:
        outbox.enqueue(topic_for("box-001", MessageKind.EVENTS), lambda seq: b'{"forged": true}')
    events = listen(events_topic)
    box = boxes(box_id)
    assert box.emit(parcel()) == 2
    assert decode_event(expect_payload(events, events_topic)).seq == 2
    assert wait_for(lambda: box.stats.refused == 1)
    assert wait_for(lambda: box.stats.acked == 1)
    assert box.pending_count == 1
    assert box.flush(0.2) is False


def test_a_wrong_password_is_reported_with_the_reason_code(boxes: Callable[..., BoxFirmware]) -> None:
    """wait_connected raises BrokerRefusedError carrying the CONNACK reason code for bad credentials."""
    box = boxes("box-029", password="not-the-password")
    with pytest.raises(BrokerRefusedError) as refused:
        box.wait_connected(TIMEOUT_S)
    assert refused.value.rc in (134, 135)  # bad user name or password / not authorized
    assert box.connected is False


# --------------------------------------------------------------------------- commands


def command_bytes(box_id: str, action: CommandAction, **fields: Any) -> tuple[uuid.UUID, bytes]:
    command = Command(v=1, command_id=uuid.uuid4(), box_id=box_id, ts_ms=T0, action=action, **fields)
    return command.command_id, encode(command)


def test_a_command_runs_once_and_a_repeat_gets_the_same_ack_even_after_a_reboot(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client], tmp_path: Path
) -> None:
    """open_compartment opens the door once (one door.opened); repeats of the same command id, before
    and after a reboot, get byte-identical acks and execute nothing."""
    box_id = "box-030"
    ack_topic, events_topic = topic_for(box_id, MessageKind.COMMAND_ACK), topic_for(box_id, MessageKind.EVENTS)
    commands_topic = topic_for(box_id, MessageKind.COMMANDS)
    acks, events = listen(ack_topic), listen(events_topic)
    backend = listen()
    box = boxes(box_id)
    assert box.wait_connected(TIMEOUT_S)

    command_id, raw = command_bytes(box_id, CommandAction.OPEN_COMPARTMENT, compartment=5)
    assert not publish(backend, commands_topic, raw).is_failure
    first = expect_payload(acks, ack_topic)
    ack = decode_command_ack(first, topic_box_id=box_id)
    assert (ack.command_id, ack.result) == (command_id, CommandResult.SUCCEEDED)
    assert decode_event(expect_payload(events, events_topic)).payload == DoorOpened(compartment=5)
    assert box.state[5].door_open is True

    assert not publish(backend, commands_topic, raw).is_failure
    assert expect_payload(acks, ack_topic) == first
    assert (box.stats.commands_executed, box.stats.commands_repeated) == (1, 1)
    box.emit(DoorClosed(compartment=5))  # control: a second door.opened would arrive before it
    assert decode_event(expect_payload(events, events_topic)).payload == DoorClosed(compartment=5)

    box.stop()
    rebooted = boxes(box_id, state_dir=tmp_path / box_id)
    assert rebooted.wait_connected(TIMEOUT_S)
    assert not publish(backend, commands_topic, raw).is_failure
    assert expect_payload(acks, ack_topic) == first
    assert (rebooted.stats.commands_executed, rebooted.stats.commands_repeated) == (0, 1)
    assert rebooted.state[5].door_open is False  # the reboot did not open it again


def test_invalid_commands_get_a_rejected_ack_and_unreadable_ones_none(
    boxes: Callable[..., BoxFirmware], listen: Callable[..., mqtt.Client]
) -> None:
    """A command that fails validation but has a readable id is acked 'rejected' with the contract's
    reason; one without a readable id is counted and gets no ack."""
    box_id = "box-031"
    ack_topic, commands_topic = topic_for(box_id, MessageKind.COMMAND_ACK), topic_for(box_id, MessageKind.COMMANDS)
    acks, backend = listen(ack_topic), listen()
    box = boxes(box_id)
    assert box.wait_connected(TIMEOUT_S)

    bad_id = uuid.uuid4()
    bad = {"v": 1, "command_id": str(bad_id), "box_id": box_id, "ts_ms": T0, "action": "self_destruct"}
    assert not publish(backend, commands_topic, json.dumps(bad).encode()).is_failure
    ack = decode_command_ack(expect_payload(acks, ack_topic), topic_box_id=box_id)
    assert (ack.command_id, ack.result) == (bad_id, CommandResult.REJECTED)
    assert ack.detail is not None
    assert ack.detail.startswith(f"{ErrorCode.INVALID_VALUE.value}: action")

    other_id, other = command_bytes("box-001", CommandAction.PING)  # names another box
    assert not publish(backend, commands_topic, other).is_failure
    ack = decode_command_ack(expect_payload(acks, ack_topic), topic_box_id=box_id)
    assert (ack.command_id, ack.result) == (other_id, CommandResult.REJECTED)
    assert (ack.detail or "").startswith(ErrorCode.BOX_ID_MISMATCH.value)

    assert not publish(backend, commands_topic, b"\xff not json").is_failure
    ping_id, ping = command_bytes(box_id, CommandAction.PING)
    assert not publish(backend, commands_topic, ping).is_failure
    ack = decode_command_ack(expect_payload(acks, ack_topic), topic_box_id=box_id)
    assert (ack.command_id, ack.result) == (ping_id, CommandResult.SUCCEEDED)  # nothing came before it
    assert box.stats.commands_unreadable == 1
    assert box.stats.commands_invalid == 2
