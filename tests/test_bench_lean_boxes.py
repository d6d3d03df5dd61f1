"""The ingest benches' load generator (bench/lean_boxes.py) does what their figures assume.

Each lean box is its own authenticated connection on one shared BoxLoop; every pre-encoded event it
publishes reaches a subscriber exactly as encoded and is PUBACKed once, and the boxes leave the loop
when stopped. (Its speed is the benches' business; this checks the counting the figures rest on.)
"""

from __future__ import annotations

import queue

from bench.lean_boxes import LeanBox, event_payloads
from contract import MessageKind, decode_event, topic_for
from contract.topics import parse_topic, subscription
from firmware_stub.loop import BoxLoop
from molo.brokers import RunningBroker
from molo.provision import Credentials
from tests.fixtures.broker import client_state, close, mqtt_client, subscribe
from tests.fixtures.pipeline import wait_for

BOXES = ("box-096", "box-097", "box-098")
EVENTS = 50


def test_lean_boxes_publish_every_event_once_through_the_real_broker(
    broker: RunningBroker, credentials: Credentials
) -> None:
    """Three lean boxes on one loop publish 50 pre-encoded events each: the broker delivers all 150,
    byte for byte and in each box's seq order, and each box counts 50 PUBACKs."""
    watcher = mqtt_client(broker, "ingest", credentials.services["ingest"])
    assert not subscribe(watcher, subscription(MessageKind.EVENTS)).is_failure
    loop = BoxLoop("lean-test", connectors=2).start()
    boxes = [LeanBox(b, credentials.boxes[b], broker.host, broker.port, loop, window=10) for b in BOXES]
    try:
        for box in boxes:
            box.start()
        assert all(box.connected.wait(10) for box in boxes)
        payloads = {box.name: event_payloads(box.name, EVENTS) for box in boxes}
        for i in range(EVENTS):
            for box in boxes:
                box.client.publish(topic_for(box.name, MessageKind.EVENTS), payloads[box.name][i], qos=1)
        received: dict[str, list[bytes]] = {b: [] for b in BOXES}
        messages = client_state(watcher).messages
        for _ in range(len(BOXES) * EVENTS):
            message = messages.get(timeout=10)
            event = decode_event(bytes(message.payload), topic_box_id=parse_topic(message.topic).box_id)
            received[event.box_id].append(bytes(message.payload))
        assert received == payloads
        try:
            extra = messages.get(timeout=0.5)
        except queue.Empty:
            extra = None
        assert extra is None, "a message was delivered twice"
        wait_for(lambda: all(box.acked == EVENTS for box in boxes))
    finally:
        for box in boxes:
            box.stop()
        assert all(box.detached.wait(5) for box in boxes)
        loop.stop()
        close(watcher)
