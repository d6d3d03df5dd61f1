"""Tests of the broker hop: provisioning, broker_config's auth/ACL/persistence, on a real Mosquitto.

Negative checks ("X is never delivered") do not rely on a timeout alone: after the forbidden
message the test sends a control message the same subscriber may receive, and asserts the control
is the first thing that arrives. Mosquitto routes each publish before acknowledging it, so once
the forbidden publish is acknowledged, anything it would have delivered is queued ahead of the
control.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import shutil
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contract.topics import INGEST_SHARE_GROUP, MessageKind, subscription, topic_for
from molo.brokers import BROKER_CONFIG_DIR, RunningBroker, local_config, start_amqtt, start_mosquitto
from molo.provision import (
    HASH_ITERATIONS,
    Credentials,
    box_ids,
    hash_password,
    provision,
    verify_password,
)
from tests.fixtures.broker import (
    client_state,
    close,
    connect,
    mqtt_client,
    new_client,
    next_message,
    publish,
    subscribe,
)

NOT_AUTHORIZED = 135
#: How long a test waits for a message that must NOT arrive (after its control message arrived).
QUIET_S = 0.2
#: Mosquitto's $7$ format: 12-byte salt (16 base64 chars), 64-byte PBKDF2-SHA512 key (88 chars).
PASSWD_LINE = re.compile(r"^(?P<user>[^:]+):\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==$")
SHARED_EVENTS = subscription(MessageKind.EVENTS, shared_group=INGEST_SHARE_GROUP)
#: Tests that are not about the share group use plain subscriptions: an offline persistent session
#: left in the molo-ingest group by another test would take its round-robin share of their messages.
ALL_EVENTS = subscription(MessageKind.EVENTS)


def payload() -> bytes:
    """A payload unique to the calling test, so no stray message can be mistaken for it."""
    return json.dumps({"test": uuid.uuid4().hex}).encode()


def box_client(broker: RunningBroker, credentials: Credentials, box_id: str) -> mqtt.Client:
    return mqtt_client(broker, box_id, credentials.boxes[box_id])


def ingest_client(broker: RunningBroker, credentials: Credentials) -> mqtt.Client:
    return mqtt_client(broker, "ingest", credentials.services["ingest"])


# --- authentication ---------------------------------------------------------------------------


def test_anonymous_client_is_refused(broker: RunningBroker) -> None:
    """A client without username and password gets CONNACK 135 (not authorized)."""
    rc = connect(new_client(), broker, None, None)
    assert rc.is_failure, rc
    assert rc.value == NOT_AUTHORIZED, rc


def test_wrong_password_is_refused(broker: RunningBroker, credentials: Credentials) -> None:
    """A known box id with a wrong password, or an unknown box id, gets CONNACK 135."""
    assert connect(new_client(), broker, "box-001", credentials.boxes["box-002"]).value == NOT_AUTHORIZED
    assert connect(new_client(), broker, "box-999", "whatever").value == NOT_AUTHORIZED


def test_every_provisioned_user_can_connect(broker: RunningBroker, credentials: Credentials) -> None:
    """Mosquitto accepts the passwd that provisioning hashed, for every provisioned box and the ingest user."""
    for username, password in credentials.users().items():
        close(mqtt_client(broker, username, password))


def test_connack_announces_the_configured_limits(broker: RunningBroker, credentials: Credentials) -> None:
    """broker_config's max_inflight_messages and max_packet_size reach MQTT v5 clients."""
    client = box_client(broker, credentials, "box-001")
    try:
        props = client_state(client).connack_properties
        assert props is not None
        # paho sets received properties as attributes named after the MQTT property.
        assert getattr(props, "ReceiveMaximum", None) == 5000
        assert getattr(props, "MaximumPacketSize", None) == 65536
    finally:
        close(client)


# --- ACL ------------------------------------------------------------------------------------


def test_box_event_reaches_ingest_via_shared_subscription(broker: RunningBroker, credentials: Credentials) -> None:
    """A box's event on its own topic reaches the ingest through $share/molo-ingest/.../+/events."""
    worker, sender = ingest_client(broker, credentials), box_client(broker, credentials, "box-001")
    try:
        assert SHARED_EVENTS == "$share/molo-ingest/molo/v1/boxes/+/events"
        assert not subscribe(worker, SHARED_EVENTS).is_failure
        body = payload()
        assert not publish(sender, topic_for("box-001", MessageKind.EVENTS), body).is_failure
        message = next_message(worker)
        assert message is not None, "ingest received nothing"
        assert (message.topic, message.payload, message.qos) == ("molo/v1/boxes/box-001/events", body, 1)
    finally:
        close(worker)
        close(sender)


def test_box_cannot_publish_as_another_box(broker: RunningBroker, credentials: Credentials) -> None:
    """A box publishing on another box's events topic gets PUBACK 135 and nothing is delivered."""
    worker = ingest_client(broker, credentials)
    intruder, owner = box_client(broker, credentials, "box-002"), box_client(broker, credentials, "box-003")
    try:
        subscribe(worker, ALL_EVENTS)
        forged = payload()
        rc = publish(intruder, topic_for("box-003", MessageKind.EVENTS), forged)
        assert rc.value == NOT_AUTHORIZED, rc
        assert publish(intruder, "molo/v1/elsewhere", forged).value == NOT_AUTHORIZED
        control = payload()
        publish(owner, topic_for("box-003", MessageKind.EVENTS), control)
        first = next_message(worker)
        assert first is not None
        assert first.payload == control, "forged event was delivered"
        assert next_message(worker, QUIET_S) is None
    finally:
        close(worker)
        close(intruder)
        close(owner)


def test_ingest_cannot_impersonate_a_box(broker: RunningBroker, credentials: Credentials) -> None:
    """The ingest user may not write a box's events, telemetry or status (PUBACK 135)."""
    worker = ingest_client(broker, credentials)
    try:
        for kind in (MessageKind.EVENTS, MessageKind.TELEMETRY, MessageKind.STATUS, MessageKind.COMMAND_ACK):
            rc = publish(worker, topic_for("box-001", kind), payload())
            assert rc.value == NOT_AUTHORIZED, (kind, rc)
    finally:
        close(worker)


def test_ingest_command_reaches_the_right_box_and_ack_comes_back(
    broker: RunningBroker, credentials: Credentials
) -> None:
    """A command from the ingest reaches exactly its box, and the box's ack reaches the ingest."""
    worker = ingest_client(broker, credentials)
    target, bystander = box_client(broker, credentials, "box-006"), box_client(broker, credentials, "box-007")
    try:
        subscribe(worker, subscription(MessageKind.COMMAND_ACK))
        subscribe(target, topic_for("box-006", MessageKind.COMMANDS))
        subscribe(bystander, topic_for("box-007", MessageKind.COMMANDS))
        command = payload()
        assert not publish(worker, topic_for("box-006", MessageKind.COMMANDS), command).is_failure
        received = next_message(target)
        assert received is not None
        assert received.payload == command
        assert next_message(bystander, QUIET_S) is None

        ack = payload()
        assert not publish(target, topic_for("box-006", MessageKind.COMMAND_ACK), ack).is_failure
        got_ack = next_message(worker)
        assert got_ack is not None
        assert (got_ack.topic, got_ack.payload) == ("molo/v1/boxes/box-006/commands/ack", ack)
    finally:
        close(worker)
        close(target)
        close(bystander)


def test_box_cannot_read_another_box_commands(broker: RunningBroker, credentials: Credentials) -> None:
    """A box subscribing to another box's commands receives none of them.

    Mosquitto 2.0's acl_file does not check SUBSCRIBE (the SUBACK grants the QoS); it checks read
    access per message, on delivery. If a later Mosquitto refuses the SUBACK, that is fine too.
    """
    worker = ingest_client(broker, credentials)
    snoop, victim = box_client(broker, credentials, "box-004"), box_client(broker, credentials, "box-005")
    try:
        rc = subscribe(snoop, topic_for("box-005", MessageKind.COMMANDS))
        assert rc.is_failure or rc.value == 1, rc
        subscribe(snoop, topic_for("box-004", MessageKind.COMMANDS))
        subscribe(victim, topic_for("box-005", MessageKind.COMMANDS))
        secret = payload()
        publish(worker, topic_for("box-005", MessageKind.COMMANDS), secret)
        delivered = next_message(victim)
        assert delivered is not None
        assert delivered.payload == secret
        control = payload()
        publish(worker, topic_for("box-004", MessageKind.COMMANDS), control)
        first = next_message(snoop)
        assert first is not None
        assert first.payload == control, "another box's command was delivered"
        assert next_message(snoop, QUIET_S) is None
    finally:
        close(worker)
        close(snoop)
        close(victim)


def test_box_wildcard_subscription_sees_no_other_box(broker: RunningBroker, credentials: Credentials) -> None:
    """A box subscribed to molo/v1/boxes/# receives other boxes' events and status never, only its commands."""
    worker = ingest_client(broker, credentials)
    snoop, other = box_client(broker, credentials, "box-008"), box_client(broker, credentials, "box-009")
    try:
        subscribe(snoop, "molo/v1/boxes/#")
        publish(other, topic_for("box-009", MessageKind.EVENTS), payload())
        publish(other, topic_for("box-009", MessageKind.STATUS), payload())
        control = payload()
        publish(worker, topic_for("box-008", MessageKind.COMMANDS), control)
        first = next_message(snoop)
        assert first is not None
        assert first.payload == control, f"box-008 received {first.topic}"
        assert next_message(snoop, QUIET_S) is None
    finally:
        close(worker)
        close(snoop)
        close(other)


# --- persistence and restarts -------------------------------------------------------------


def test_retained_status_survives_broker_restart(tmp_path: Path, credentials: Credentials) -> None:
    """A retained status message is still delivered after the broker is stopped and started again."""
    status = payload()
    with start_mosquitto(tmp_path, credentials) as own:
        sender = box_client(own, credentials, "box-010")
        assert not publish(sender, topic_for("box-010", MessageKind.STATUS), status, retain=True).is_failure
        close(sender)
        port = own.port
        own.restart()
        assert own.port == port
        assert (own.data_dir / "mosquitto.db").exists()
        worker = ingest_client(own, credentials)
        try:
            subscribe(worker, subscription(MessageKind.STATUS))
            message = next_message(worker)
            assert message is not None, "retained status lost in the restart"
            assert (message.topic, message.payload, message.retain) == ("molo/v1/boxes/box-010/status", status, True)
        finally:
            close(worker)


def test_broker_comes_back_after_a_crash(tmp_path: Path, credentials: Credentials) -> None:
    """After SIGKILL, restart() brings Mosquitto back on the same port, accepting the same users."""
    with start_mosquitto(tmp_path, credentials) as own:
        own.kill()
        assert not own.is_running
        own.restart()
        assert own.is_running
        close(box_client(own, credentials, "box-011"))


def test_local_config_only_changes_paths_listener_and_tls(tmp_path: Path) -> None:
    """The test config keeps every production setting but paths, the plain listener and TLS."""

    def settings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    production = settings((BROKER_CONFIG_DIR / "mosquitto.conf").read_text())
    local = settings(local_config("\n".join(production), tmp_path, 12345))
    assert not [line for line in local if "/mosquitto/" in line]
    assert "listener 12345 127.0.0.1" in local
    tls = production[production.index("listener 8883") :]
    # Settings both listeners share (the client-id binding) may appear once in the local config.
    tls_only = set(tls[2:]) - set(production[: production.index("listener 8883")])
    assert tls_only
    assert not tls_only & set(local), "TLS listener settings leaked into the local config"
    assert f"password_file {tmp_path}/passwd" in local
    assert f"acl_file {tmp_path}/acl" in local
    assert f"persistence_location {tmp_path}/data/" in local
    unchanged = [line for line in production[: production.index("listener 8883")] if "/mosquitto/" not in line]
    assert [line for line in unchanged if line not in local] == ["listener 1883"]


# --- provisioning -----------------------------------------------------------------------------


def test_box_ids_are_numbered_from_one() -> None:
    """box_ids(50) gives aal-001 .. aal-050, all valid box ids."""
    ids = box_ids(50)
    assert ids[0] == "aal-001"
    assert ids[-1] == "aal-050"
    assert len(set(ids)) == 50
    assert box_ids(2, prefix="box") == ["box-001", "box-002"]


def test_passwd_uses_mosquittos_hash_format(tmp_path: Path) -> None:
    """Every passwd line is user:$7$101$<b64 12-byte salt>$<b64 64-byte PBKDF2-SHA512>."""
    creds = provision(tmp_path, ["aal-001", "aal-002"])
    lines = creds.passwd_path.read_text().splitlines()
    users = {m.group("user"): line for line in lines if (m := PASSWD_LINE.match(line))}
    assert sorted(users) == ["aal-001", "aal-002", "api", "ingest", "ingest-1", "ingest-2"], lines
    for user, line in users.items():
        assert verify_password(creds.password(user), line.split(":", 1)[1])
        assert not verify_password(creds.password(user) + "x", line.split(":", 1)[1])


MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd not installed (apt-get install mosquitto)")
def test_hash_equals_mosquitto_passwd_output(tmp_path: Path) -> None:
    """Our PBKDF2 hash, given mosquitto_passwd's salt, is byte for byte what mosquitto_passwd wrote."""
    assert MOSQUITTO_PASSWD is not None
    passwd = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(passwd), "aal-001", "pä55 wörd"], check=True)
    line = passwd.read_text().strip()
    user, hashed = line.split(":", 1)
    _, _, iterations, salt, _ = hashed.split("$")
    assert user == "aal-001"
    assert int(iterations) == HASH_ITERATIONS
    assert hash_password("pä55 wörd", salt=base64.b64decode(salt), iterations=int(iterations)) == hashed
    assert verify_password("pä55 wörd", hashed)


def test_reprovisioning_keeps_passwords_and_adds_ids(tmp_path: Path) -> None:
    """Provisioning again keeps every existing password (also of ids not named) and adds new ids."""
    first = provision(tmp_path, ["aal-001", "aal-002"])
    second = provision(tmp_path, ["aal-002", "aal-003"])
    assert second.boxes["aal-001"] == first.boxes["aal-001"]
    assert second.boxes["aal-002"] == first.boxes["aal-002"]
    assert second.services == first.services
    assert sorted(second.boxes) == ["aal-001", "aal-002", "aal-003"]
    assert Credentials.load(second.path) == second
    hashed = dict(line.split(":", 1) for line in second.passwd_path.read_text().splitlines())
    assert sorted(hashed) == ["aal-001", "aal-002", "aal-003", "api", "ingest", "ingest-1", "ingest-2"]
    assert all(verify_password(second.password(user), h) for user, h in hashed.items())

    rotated = provision(tmp_path, ["aal-001"], existing=False)
    assert sorted(rotated.boxes) == ["aal-001"]
    assert rotated.boxes["aal-001"] != first.boxes["aal-001"]


def test_credential_files_are_private(tmp_path: Path) -> None:
    """credentials.json and passwd are readable by their owner only (0600), also after re-provisioning."""
    provision(tmp_path, ["aal-001"])
    creds = provision(tmp_path, ["aal-002"])
    for path in (creds.path, creds.passwd_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("bad", ["", "a", "AAL-001", "aal_001", "aal/001", "aal+", "#", "-aal", "a" * 33, "aal 001"])
def test_invalid_box_ids_are_refused(tmp_path: Path, bad: str) -> None:
    """Box ids that are not valid MQTT usernames and topic levels raise ValueError; nothing is written."""
    with pytest.raises(ValueError, match="invalid box id"):
        provision(tmp_path, ["aal-001", bad])
    assert not (tmp_path / "credentials.json").exists()


def test_reserved_names_are_refused_as_box_ids(tmp_path: Path) -> None:
    """Role names, ROLE-<name> and every service user name cannot be a box id (it would share a
    service's identity or rights)."""
    for name in ("ingest", "ingest-9", "api", "api-2"):
        with pytest.raises(ValueError, match="reserved"):
            provision(tmp_path, [name])
    with pytest.raises(ValueError, match="reserved"):
        provision(tmp_path, ["ingest"], service_users=("api",))
    with pytest.raises(ValueError, match="has no role"):
        provision(tmp_path, ["aal-001"], service_users=("backend",))


def test_acl_gives_each_service_user_its_roles_block(tmp_path: Path) -> None:
    """The rendered ACL keeps the template's box patterns and gives every service user exactly the
    topic lines of its role's block in broker_config/acl."""
    creds = provision(tmp_path, ["aal-001"], service_users=("ingest-1", "ingest-7", "api-3"))
    acl = creds.acl_path.read_text()
    assert stat.S_IMODE(creds.acl_path.stat().st_mode) == 0o600
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in acl.splitlines():
        if line.startswith("user "):
            current = blocks.setdefault(line.split()[1], [])
        elif line.startswith("topic "):
            current.append(line)
    assert sorted(blocks) == ["api-3", "ingest-1", "ingest-7"]
    template = (BROKER_CONFIG_DIR / "acl").read_text().split("\nuser ")
    ingest_lines = [line for line in template[1].splitlines() if line.startswith("topic ")]
    assert blocks["ingest-1"] == blocks["ingest-7"] == ingest_lines
    assert blocks["api-3"] == ["topic write molo/v1/boxes/+/commands"]
    assert "pattern write molo/v1/boxes/%u/events" in acl


# --- development fallback ---------------------------------------------------------------------


def test_amqtt_fallback_passes_messages() -> None:
    """The in-process amqtt broker (development only) delivers a QoS 1 message over MQTT 3.1.1."""
    with start_amqtt() as dev:
        receiver = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}")
        sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}")
        got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        receiver.on_message = lambda _c, _u, message: got.put(message)
        receiver.on_subscribe = lambda *_args: subscribed.set()
        for client in (receiver, sender):
            client.connect(dev.host, dev.port)
            client.loop_start()
        try:
            receiver.subscribe(topic_for("aal-001", MessageKind.EVENTS), qos=1)
            assert subscribed.wait(5)
            body = payload()
            sender.publish(topic_for("aal-001", MessageKind.EVENTS), body, qos=1).wait_for_publish(5)
            assert got.get(timeout=5).payload == body
        finally:
            for client in (receiver, sender):
                client.disconnect()
                client.loop_stop()
