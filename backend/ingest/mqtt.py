"""The ingest side of MQTT: a persistent, manually acknowledged session on the shared subscription.

- A persistent session (MQTT 3.1.1 ``clean_session=False`` by default, or MQTT 5 ``clean_start=False``
  with a session expiry): while a worker is down, the broker keeps its session and queues its share.
- ``manual_ack``: paho does not PUBACK on its own; :meth:`IngestMqtt.ack` is called after commit.
  A message unacknowledged when the connection drops is redelivered by the broker.
- ``on_message`` only puts the message on a queue (paho runs it on its network thread).
- Each connection has a generation number: an ack for a message from an older connection is not
  sent (its packet id may already name another message on the new connection).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from contract.messages import encode
from contract.receipts import receipts_for
from contract.topics import INGEST_SHARE_GROUP, MessageKind, subscription, topic_for

SUBSCRIBED_KINDS = (MessageKind.STATUS, MessageKind.EVENTS, MessageKind.TELEMETRY, MessageKind.COMMAND_ACK)


@dataclass(frozen=True, slots=True)
class Received:
    """One message as it came off the wire, with what is needed to acknowledge it later."""

    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float  # wall clock, seconds


class IngestMqtt:
    """A paho client for one ingest worker. Messages land in :attr:`inbox`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str,
        session_expiry_s: int,
        receive_maximum: int,
        tls_ca_file: str | None = None,
        use_tls: bool = False,
        protocol: str = "3.1.1",
        shared: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.inbox: queue.Queue[Received] = queue.Queue()
        self.log = logger or logging.getLogger(__name__)
        self._host, self._port = host, port
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._generation = 0
        self._closing = False
        #: (generation, mid) of messages delivered on the current connection and not yet acked.
        self._unacked: set[tuple[int, int]] = set()
        self._v5 = protocol == "5"
        self._client_id, self._username, self._password = client_id, username, password
        self._tls, self._tls_ca_file = use_tls or tls_ca_file is not None, tls_ca_file
        self._group = INGEST_SHARE_GROUP if shared else None
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.last_error: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            # MQTT 3.1.1 has no session expiry: a persistent session is clean_session=False.
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        client.username_pw_set(username, password)
        if use_tls or tls_ca_file:
            client.tls_set(ca_certs=tls_ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        # Reconnect at once and often: between a broker restart and this worker's SUBSCRIBE, the boxes'
        # publishes find no subscriber (Mosquitto 2.0 does not restore shared subscriptions from its
        # persistence). They keep such messages and retry, but the window should be short: a second
        # or two, not paho's default of doubling up to 2 minutes. A few workers are no load.
        client.reconnect_delay_set(min_delay=0.1, max_delay=2)  # type: ignore[arg-type]  # floats work; paho annotates int
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def username(self) -> str:
        """The broker user, which is also this worker's client id and so its session."""
        return self._username

    def start(self) -> None:
        """Connect in the background (retrying until :meth:`stop`)."""
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry_s
            props.ReceiveMaximum = self._receive_maximum
            self._client.connect_async(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        else:
            self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly; the broker keeps the session (and queues messages) until it expires."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        _dispose(self._client)

    def unsubscribe_all(self) -> None:
        """Leave the share group: the broker stops assigning new messages to this session."""
        self._client.unsubscribe(self._topics())

    def end_session(self) -> None:
        """Disconnect and ask the broker to drop the session now (session expiry 0)."""
        self._closing = True
        if self._v5:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            self._client.loop_stop()
            _dispose(self._client)
            return
        self._client.disconnect()
        self._client.loop_stop()
        _dispose(self._client)
        # MQTT 3.1.1 has no expiry on DISCONNECT: a clean-session connect with the same client id
        # discards the stored session.
        cleaner = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        cleaner.username_pw_set(self._username, self._password)
        if self._tls:
            cleaner.tls_set(ca_certs=self._tls_ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        cleaner.connect(self._host, self._port, keepalive=10)
        cleaner.loop_start()
        cleaner.disconnect()
        cleaner.loop_stop()
        _dispose(cleaner)

    def _topics(self) -> list[str]:
        return [subscription(kind, shared_group=self._group) for kind in SUBSCRIBED_KINDS]

    def ack(self, message: Received) -> bool:
        """PUBACK ``message`` if it came on the current connection; False if it was not acked."""
        if message.qos == 0:
            return True
        with self._lock:
            if message.generation != self._generation or not self.connected.is_set():
                return False
            self._client.ack(message.mid, message.qos)
            self._unacked.discard((message.generation, message.mid))
            return True

    def send_receipts(self, committed: dict[str, list[int]]) -> int:
        """Tell each box which of its seqs are committed (QoS 0: a lost receipt costs the box a
        re-send, which is stored once and receipted again). Returns the receipts handed to paho."""
        sent = 0
        for box_id, seqs in committed.items():
            topic = topic_for(box_id, MessageKind.RECEIPTS)
            for receipt in receipts_for(box_id, seqs):
                info = self._client.publish(topic, encode(receipt), qos=0)
                sent += info.rc == mqtt.MQTT_ERR_SUCCESS
        return sent

    @property
    def outstanding(self) -> int:
        """Messages received on the current connection and not acknowledged yet."""
        with self._lock:
            return len(self._unacked)

    # -- paho callbacks: network thread, keep them short

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            self.log.error("ingest: broker refused the connection: %s", reason_code)
            return
        with self._lock:
            self._generation += 1
            self._unacked.clear()  # the broker redelivers those on this new connection
        self.connected.set()
        self.log.info("ingest: connected (session present: %s)", flags.session_present)
        client.subscribe([(topic, 1) for topic in self._topics()])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            self.last_error = f"subscribe refused: {failed}"
            self.log.error("ingest: broker refused subscriptions: %s", failed)
        else:
            self.subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self._closing:
            self.log.info("ingest: disconnected")
        else:
            self.log.warning("ingest: connection lost (%s); unacknowledged messages will be redelivered", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            with self._lock:
                self._unacked.add((self._generation, msg.mid))
        self.inbox.put(Received(self._generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload), time.time()))


def _dispose(client: mqtt.Client) -> None:
    """Close paho's internal wake-up socket pair now. paho closes it only in ``__del__``, and when a
    client is freed by the cycle collector its sockets may be finalised first (ResourceWarning)."""
    client._reset_sockets()  # paho 2.x has no public way to close it
