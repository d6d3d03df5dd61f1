"""A lean load generator for the ingest benches: many box connections in one process, pre-encoded payloads.

Each :class:`LeanBox` is a real MQTT v5 connection with its box's own credentials (so the broker's
authentication and ACL are on the path), but with no outbox, no receipts and no commands: the bench
publishes contract envelopes it encoded beforehand and counts the broker's PUBACKs. Every box of a
process is driven by one :class:`firmware_stub.loop.BoxLoop` -- the fleet's own network loop, one
thread for every socket -- so the generator's cost per event is paho's and little more, and what the
benches measure of ingest is not hidden behind the load generator's threads.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from contract import SizeClass, encode, make_event
from contract.messages import ParcelDeposited
from firmware_stub.loop import BoxLoop

__all__ = ["LeanBox", "cpu_seconds", "event_payloads", "postgres_cpu_seconds"]

#: Device time of seq 1 of the benches' events (2026-01-01); seq s is s seconds later.
T0_MS = 1_767_225_600_000


def event_payloads(box_id: str, events: int) -> list[bytes]:
    """Seqs 1..``events`` of ``box_id``: parcel deposits, encoded as the box would send them."""
    return [
        encode(
            make_event(
                box_id=box_id,
                seq=seq,
                session=1,
                ts_ms=T0_MS + seq * 1000,
                payload=ParcelDeposited(compartment=3, size_class=SizeClass.A, parcel_id=f"P{seq}", carrier="gls"),
            )
        )
        for seq in range(1, events + 1)
    ]


class LeanBox:
    """One box's connection for a bench (implements :class:`firmware_stub.loop.Driven`)."""

    def __init__(self, box_id: str, password: str, host: str, port: int, loop: BoxLoop, *, window: int) -> None:
        self.name = box_id
        self.keepalive = 60
        self.acked = 0  # PUBACKs (network thread)
        self.connected = threading.Event()
        self.detached = threading.Event()
        self.closing = False
        self._loop = loop
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=box_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(box_id, password)
        client.max_inflight_messages_set(window)  # paho queues the rest and sends them as PUBACKs come
        client.on_connect = lambda c, u, f, reason, p: None if reason.is_failure else self.connected.set()
        client.on_publish = self._on_publish
        client.on_socket_register_write = lambda c, u, s: loop.want_write(self)
        client.connect_async(host, port, self.keepalive)
        self.client = client

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        self.acked += 1

    def start(self) -> None:
        self._loop.attach(self)

    def stop(self) -> None:
        self.closing = True
        self.client.disconnect()
        self._loop.close(self, halt=False)

    # Driven
    def mqtt_client(self) -> mqtt.Client:
        return self.client

    def link_attempt(self) -> float | None:
        if self.closing:
            return -1.0
        try:
            self.client.reconnect()
        except OSError:
            return 0.5
        return None

    def link_serviced(self) -> None:
        pass

    def link_lost(self) -> float | None:
        self.connected.clear()
        return None if self.closing else 0.5

    def link_detached(self) -> None:
        self.detached.set()

    def work(self) -> float | None:
        return None if self.closing else math.inf


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds of every process on this machine named ``postgres`` (the server, its backends and
    its background workers): PostgreSQL's whole cost, whichever cluster the bench uses."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return total
