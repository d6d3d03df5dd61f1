"""No client can use another identity's client id (issue 9, part 2), on the real broker and database.

broker_config sets ``use_username_as_clientid``: the broker replaces every client id with the
client's username. A box logged in with its own password can then only ever reach its own session,
whatever client id it sends, and so can every ingest worker (each has a user of its own). Boxes
box-081 .. box-088.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest

from backend.ingest.worker import IngestWorker
from contract.topics import MessageKind, topic_for
from molo.brokers import RunningBroker
from molo.provision import Credentials
from tests.fixtures.broker import add_service_user, client_state, close, connect, mqtt_client, new_client, publish
from tests.fixtures.pipeline import scalar, wait_for
from tests.test_ingest import deposited

#: How long the victim's connection is watched after the intruder's CONNACK: a takeover disconnects
#: the old connection before the new one's CONNACK is sent, so this only has to cover the delivery.
WATCH_S = 0.5


def stored(db: psycopg.Connection[Any], box: str) -> int:
    return int(scalar(db, "SELECT count(*) FROM events WHERE box_id = %s", (box,)))


def intruder(broker: RunningBroker, username: str, password: str, client_id: str, *, clean: bool) -> mqtt.Client:
    """Connect as ``username`` but ask for ``client_id``; asserts the broker accepted the login."""
    client = new_client(client_id)
    client.username_pw_set(username, password)
    client.connect(broker.host, broker.port, keepalive=30, clean_start=clean)
    client.loop_start()
    assert client_state(client).connected.wait(5)
    connack = client_state(client).connack
    assert connack is not None
    assert not connack.is_failure, connack
    return client


def watch(victim: mqtt.Client) -> list[object]:
    """Record the victim's disconnects from now on."""
    lost: list[object] = []
    victim.on_disconnect = lambda _c, _u, _f, rc, _p: lost.append(rc)
    return lost


def broker_saw(broker: RunningBroker, username: str, client_id: str) -> bool:
    """The broker's log names a connection of ``username`` under ``client_id``."""
    log = broker.log_path.read_text(encoding="utf-8", errors="replace")
    return re.search(rf" as {re.escape(client_id)} \([^)]*u'{re.escape(username)}'\)", log) is not None


@pytest.mark.parametrize("clean", [True, False], ids=["clean-start", "resumed-session"])
def test_box_using_the_ingest_client_id_takes_nothing_from_it(
    broker: RunningBroker,
    credentials: Credentials,
    start_ingest: Callable[..., IngestWorker],
    db: psycopg.Connection[Any],
    clean: bool,
) -> None:
    """A box logging in with the running ingest worker's client id, again and again, never disconnects
    the worker: every one of 200 events published meanwhile is stored once."""
    box, rogue = ("box-081", "box-082") if clean else ("box-083", "box-084")
    worker = start_ingest()
    generation = worker.mqtt.generation
    sender = mqtt_client(broker, box, credentials.boxes[box])
    topic = topic_for(box, MessageKind.EVENTS)
    try:
        for seq in range(1, 201):
            publish(sender, topic, deposited(box, seq))
            if seq % 25 == 0:
                close(intruder(broker, rogue, credentials.boxes[rogue], worker.mqtt.username, clean=clean))
        wait_for(lambda: stored(db, box) == 200, timeout=20)
    finally:
        close(sender)
    assert worker.mqtt.generation == generation, "the ingest lost its connection"
    assert worker.mqtt.connected.is_set()
    assert broker_saw(broker, rogue, rogue)
    assert not broker_saw(broker, rogue, worker.mqtt.username)


def test_clean_start_under_the_ingest_id_while_it_is_down_loses_nothing(
    broker: RunningBroker,
    credentials: Credentials,
    start_ingest: Callable[..., IngestWorker],
    db: psycopg.Connection[Any],
) -> None:
    """With the ingest down (its session queueing), a box connecting with clean start under the ingest's
    client id does not discard that session: all 200 queued events are stored when the ingest returns."""
    box, rogue = "box-085", "box-086"
    worker = start_ingest()
    username = worker.mqtt.username
    worker.stop()  # disconnects; the broker keeps the session and queues its share
    sender = mqtt_client(broker, box, credentials.boxes[box])
    try:
        for seq in range(1, 201):
            publish(sender, topic_for(box, MessageKind.EVENTS), deposited(box, seq))
        close(intruder(broker, rogue, credentials.boxes[rogue], username, clean=True))
    finally:
        close(sender)
    assert stored(db, box) == 0
    start_ingest(worker_id=worker.worker_id, mqtt_username=username)
    wait_for(lambda: stored(db, box) == 200, timeout=20)


def test_box_using_another_boxs_client_id_does_not_disconnect_it(
    broker: RunningBroker, credentials: Credentials
) -> None:
    """box-087 asking for box-088's client id gets its own session: box-088 stays connected."""
    victim = mqtt_client(broker, "box-088", credentials.boxes["box-088"], client_id="box-088")
    lost = watch(victim)
    try:
        close(intruder(broker, "box-087", credentials.boxes["box-087"], "box-088", clean=True))
        time.sleep(WATCH_S)
        assert lost == []
        assert victim.is_connected()
        assert broker_saw(broker, "box-087", "box-087")
    finally:
        close(victim)


def test_ingest_worker_using_another_workers_client_id_does_not_disconnect_it(
    broker: RunningBroker, credentials: Credentials
) -> None:
    """An ingest worker's user asking for another worker's client id gets its own session: the other
    worker stays connected."""
    first, second = add_service_user(broker, credentials), add_service_user(broker, credentials)
    victim = mqtt_client(broker, first, credentials.services[first], client_id=first)
    lost = watch(victim)
    try:
        close(intruder(broker, second, credentials.services[second], first, clean=False))
        time.sleep(WATCH_S)
        assert lost == []
        assert victim.is_connected()
    finally:
        close(victim)


def test_same_user_twice_is_one_identity(broker: RunningBroker, credentials: Credentials) -> None:
    """Control for the tests above: a second connection of the *same* user, under any client id, does
    take the first one's place (so the checks above would see a takeover if there were one)."""
    user = add_service_user(broker, credentials)
    victim = mqtt_client(broker, user, credentials.services[user], client_id=user)
    lost = watch(victim)
    try:
        second = new_client("some-other-id")
        assert not connect(second, broker, user, credentials.services[user]).is_failure
        wait_for(lambda: lost, timeout=5)
        close(second)
    finally:
        close(victim)
