"""Commands to boxes: recorded, published over MQTT, then tracked to their outcome.

Where it sits in a message's journey: the way back. An operator (or the courier reservations)
calls :func:`send_command`; it stores the command (``pending``), publishes it at QoS 1 on
``molo/v1/boxes/<id>/commands`` with the backend's ``ingest`` broker identity (the ACL lets it write
every box's command topic and nothing else of a box), and marks it ``sent`` when the broker's PUBACK
arrives. The box executes it at most once and answers on ``.../commands/ack``; ingest records the
answer (``succeeded`` / ``failed`` / ``rejected``; ``backend/ingest/writer.py``). No answer by
``expires_at`` makes it ``timed_out`` (the monitor sweep, :mod:`backend.operations.monitor`).

``failed`` at once means *never handed to the MQTT client*: the sender is not connected (a
publish waits for the first connection only in the first seconds after start) or the client
refused it. Nothing is queued then, so a command the caller was told failed can never run later.
Once paho has the message it may still deliver it (QoS 1 messages are re-sent after a reconnect),
so a publish whose PUBACK does not come in time, or that paho queued because the connection dropped
at that instant, is recorded ``sent`` with a detail (delivery unknown): the box's ack or the
monitor's timeout decides.

Status: ``pending`` -> ``sent`` -> ``succeeded`` | ``failed`` | ``rejected`` | ``timed_out``
(``pending`` -> ``failed`` when the client never took it). The box's ack is the truth: it is
recorded even after ``timed_out`` or a ``failed`` the backend set itself.

:class:`CommandSender` owns one paho-mqtt 2.x client (``CallbackAPIVersion.VERSION2``) on its own
network thread; ``publish`` awaits the PUBACK through an asyncio future, so the event loop never
blocks. The API makes one in its lifespan (``request.app.state.commands``); other code may make its
own (``start()``/``stop()``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from backend.operations.alerts import COMMAND_COLUMNS, command_data
from backend.operations.live import CHANNEL, LiveEvent
from backend.operations.live import encode as encode_live
from contract import MessageKind, encode, topic_for
from contract.messages import SCHEMA_VERSION, Command, CommandAction

log = logging.getLogger(__name__)
Row = dict[str, Any]

#: How long to wait for the broker's PUBACK before the command counts as sent, delivery unknown.
PUBLISH_TIMEOUT_S = 5.0
#: How long after :meth:`CommandSender.start` a publish may wait for the first connection before
#: the command counts as failed (later, a sender that is not connected fails at once).
CONNECT_WAIT_S = 3.0


class CommandSendError(Exception):
    """The command was not sent: not connected (nothing handed to paho), refused by the client or
    the broker."""


class DeliveryUnknownError(Exception):
    """paho has the message but the broker's PUBACK did not come in time (or paho queued it while
    reconnecting): it may still be delivered."""


class CommandSender:
    """One MQTT connection for sending commands (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str | None = None,
        protocol: str = "3.1.1",
        use_tls: bool = False,
        tls_ca_file: str | None = None,
        logger: logging.Logger | None = None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self.log = logger or log
        self.publish_timeout_s = publish_timeout_s
        self._host, self._port = host, port
        self._v5 = protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"commands-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        client.username_pw_set(username, password)
        if use_tls or tls_ca_file:
            client.tls_set(ca_certs=tls_ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[ReasonCode]]] = {}
        self._early: dict[int, ReasonCode] = {}
        self.connected = threading.Event()
        self.last_error: str | None = None
        self._started = False
        self._started_at = float("-inf")

    def start(self) -> None:
        """Connect in the background (paho reconnects by itself until :meth:`stop`)."""
        self._started_at = time.monotonic()
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()
        self._started = True

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets()  # close paho's wake-up socket pair now (paho 2.x has no public way)

    def is_connected(self) -> bool:
        return self.connected.is_set() and self._client.is_connected()

    async def publish(
        self, topic: str, payload: bytes, timeout: float | None = None, connect_wait_s: float = CONNECT_WAIT_S
    ) -> None:
        """Publish at QoS 1 and wait (asynchronously) for the broker's PUBACK. Not connected (after
        up to ``connect_wait_s``, only in the first :data:`CONNECT_WAIT_S` after :meth:`start`):
        :class:`CommandSendError` and nothing is handed to paho. No PUBACK in ``timeout``:
        :class:`DeliveryUnknownError`."""
        wait_s = min(connect_wait_s, self._started_at + CONNECT_WAIT_S - time.monotonic())
        if not self.is_connected() and wait_s > 0:  # just started: give it a moment, off the loop
            await asyncio.to_thread(self.connected.wait, wait_s)
        if not self.is_connected():
            raise CommandSendError(f"not connected to the broker {self._host}:{self._port} ({self.last_error})")
        wait = self.publish_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ReasonCode] = loop.create_future()
        info = self._client.publish(topic, payload, qos=1)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # dropped since the check: paho queued it for the reconnect
            raise DeliveryUnknownError("the connection dropped as it was published; paho re-sends it on reconnect")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise CommandSendError(f"the MQTT client did not take the command: {mqtt.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._waiting[info.mid] = (loop, future)
        if early is not None:
            future.set_result(early)
        try:
            reason = await asyncio.wait_for(future, wait)
        except TimeoutError:
            with self._lock:
                self._waiting.pop(info.mid, None)
            raise DeliveryUnknownError(f"no PUBACK from the broker within {wait:g} s") from None
        if reason.is_failure:
            raise CommandSendError(f"the broker refused the command: {reason}")

    # paho callbacks (network thread): only hand over.

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Properties | None
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            self.log.error("commands: broker refused the connection: %s", reason_code)
            return
        self.last_error = None
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Properties | None
    ) -> None:
        self.connected.clear()
        self.last_error = f"disconnected: {reason_code}"

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        with self._lock:
            waiting = self._waiting.pop(mid, None)
            if waiting is None:
                self._early[mid] = reason_code
                return
        loop, future = waiting
        loop.call_soon_threadsafe(_resolve, future, reason_code)


def _resolve(future: asyncio.Future[ReasonCode], reason: ReasonCode) -> None:
    if not future.done():
        future.set_result(reason)


@dataclass(frozen=True)
class CommandRequest:
    """What to send: the contract's action and its parameters."""

    box_id: str
    action: CommandAction
    compartment: int | None = None
    enabled: bool | None = None


async def _notify(conn: AsyncConnection[Any], row: Row) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode_live(LiveEvent.COMMAND_UPDATED, command_data(row))))


async def _update(conn: AsyncConnection[Any], sql: str, params: dict[str, Any]) -> Row | None:
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql + f" RETURNING {COMMAND_COLUMNS}", params)
        row = await cur.fetchone()
        if row is not None:
            await _notify(conn, row)
        return row


async def send_command(
    conn: AsyncConnection[Any],
    sender: CommandSender | None,
    request: CommandRequest,
    *,
    requested_by: str,
    timeout_s: float,
    connect_wait_s: float = CONNECT_WAIT_S,
) -> Row:
    """Record, publish and return the command row: ``sent`` (with a ``detail`` when the PUBACK did
    not come: delivery unknown), or ``failed`` when it was never handed to the client (see the module
    docstring). The outcome arrives later through ingest; ``Command`` validation errors raise
    ``ValueError`` before anything is stored."""
    command_id = uuid.uuid4()
    now = datetime.now(UTC)
    message = Command(
        v=SCHEMA_VERSION,
        command_id=command_id,
        box_id=request.box_id,
        ts_ms=int(now.timestamp() * 1000),
        action=request.action,
        compartment=request.compartment,
        enabled=request.enabled,
    )
    params = {
        "id": command_id,
        "box": request.box_id,
        "action": request.action.value,
        "compartment": request.compartment,
        "enabled": request.enabled,
        "by": requested_by,
        "timeout": timeout_s,
    }
    await _update(
        conn,
        """INSERT INTO commands (command_id, box_id, action, compartment, enabled, status, requested_by,
                                 created_at, expires_at)
           VALUES (%(id)s, %(box)s, %(action)s, %(compartment)s, %(enabled)s, 'pending', %(by)s, now(),
                   now() + make_interval(secs => %(timeout)s))""",
        params,
    )
    detail = None
    try:
        if sender is None:
            raise CommandSendError("this API has no broker connection (MOLO_MQTT_HOST is not set)")
        await sender.publish(
            topic_for(request.box_id, MessageKind.COMMANDS), encode(message), connect_wait_s=connect_wait_s
        )
    except CommandSendError as exc:
        log.warning("command %s to %s not sent: %s", command_id, request.box_id, exc)
        row = await _update(
            conn,
            "UPDATE commands SET status = 'failed', detail = %(detail)s"
            " WHERE command_id = %(id)s AND status = 'pending'",
            {"id": command_id, "detail": f"not sent: {exc}"[:500]},
        )
        return row or await _must_get(conn, command_id)
    except DeliveryUnknownError as exc:
        log.warning("command %s to %s: delivery unknown: %s", command_id, request.box_id, exc)
        detail = f"delivery unknown: {exc}"[:500]
    # The box may have answered already (the ack can beat this update): keep its result.
    row = await _update(
        conn,
        """UPDATE commands SET sent_at = coalesce(sent_at, now()),
               status = CASE WHEN status = 'pending' THEN 'sent' ELSE status END,
               detail = CASE WHEN status = 'pending' THEN %(detail)s ELSE detail END
           WHERE command_id = %(id)s""",
        {"id": command_id, "detail": detail},
    )
    return row or await _must_get(conn, command_id)


async def _must_get(conn: AsyncConnection[Any], command_id: UUID) -> Row:
    row = await get_command(conn, command_id)
    if row is None:  # the row was deleted under us: not expected
        raise RuntimeError(f"command {command_id} vanished")
    return row


async def get_command(conn: AsyncConnection[Any], command_id: UUID) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = %s", (command_id,))
        return await cur.fetchone()
