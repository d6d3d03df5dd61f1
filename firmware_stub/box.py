"""One box's firmware: outbox, MQTT link, birth and Last Will, command handling.

Where it sits in a message's journey (see ``shared/DESIGN.md``)::

    simulator / demo ──emit()──> Outbox (SQLite) ──sender──> paho ──QoS 1──> Mosquitto ──> ingest
                                    ^ deleted on the ingest's receipt           │
    BoxState <──execute── command worker <──on_message── paho <──QoS 1──────────┘ (commands)

Threads: the box has none of its own. A :class:`~firmware_stub.loop.BoxLoop` drives it -- a loop of
its own for a single box, one shared by a whole fleet -- and calls it back (paho runs callbacks on
the loop's network thread, so nothing slow runs there):

``network``    (loop) drives paho's read/write/keepalive through paho's *external event loop*
               interface, so that only this thread ever writes to the socket; on a lost link it
               asks :meth:`BoxFirmware.link_lost` for the jittered backoff (:mod:`.backoff`);
``connector``  (loop) runs :meth:`BoxFirmware.link_attempt`: a new session, the will, ``reconnect()``;
``worker``     (loop) runs :meth:`BoxFirmware.work`: commands (decode, journal, execute,
               acknowledge), then the sender's turn -- outbox rows handed to paho in ``seq`` order
               while the link is up and the in-flight window has room, rows deleted on their receipt.

Birth and Last Will: every connection -- the first after a start and every reconnect -- takes a
new ``session`` from the outbox's persistent counter. Its will (retained, QoS 1, set in the
CONNECT) says ``online=false, reason=connection_lost`` with that session; once connected the box
publishes a retained birth (``online=true, reason=birth``, same session, its layout).
:meth:`BoxFirmware.stop` publishes ``online=false, reason=shutdown`` itself and disconnects cleanly
(the broker then drops the will); :meth:`BoxFirmware.kill` closes the socket without a DISCONNECT,
and the broker publishes the will.

Why a new session per connection and not only per boot: the backend moves a box's status forward
only for a newer session, or for an offline status of the same session (the will of a connection
always comes after its birth). After a network blip within one boot, the broker publishes the will
of session S; a birth that said S again would be taken for stale and the box would look offline
until its next reboot. With S+1 the birth wins, and a late will of S still cannot overwrite it.
Events carry the session current when they were emitted.

Delivery rules of the sender:

- rows are handed to paho in ``seq`` order; after a reconnect paho itself re-sends what it still
  holds (with the DUP flag), so the sender does not hand those again;
- a row is deleted only when the ingest's receipt (:mod:`contract.receipts`) says it is committed.
  A broker's PUBACK says only that the broker took it: a broker killed before it handed the message
  on, or one that had no subscriber for it, has lost it. Rows PUBACKed but not receipted are
  handed again after every reconnect (the broker may have died with them) and after
  ``receipt_timeout_s``; the ingest stores each ``(box, seq)`` once and receipts copies again.
  (``confirm="puback"`` deletes on the PUBACK instead: for a broker with no ingest behind it.)
- a PUBACK with reason code 16, "no matching subscribers" (Mosquitto's answer between its restart
  and the ingest's new SUBSCRIBE), means nobody got the message: the row is kept and handed again,
  in order, after a jittered backoff during which nothing newer is handed;
- at process start everything still in the outbox is handed again (a replay, in order);
- a PUBACK with a failure reason code (e.g. 135, not authorised) is logged as an error and
  counted, and the row is kept (it is retried at the next start): nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal
from uuid import UUID

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from contract import (
    BoxLayout,
    ContractError,
    EventPayload,
    MessageKind,
    Status,
    decode_command,
    default_layout,
    encode,
    make_event,
    topic_for,
)
from contract.messages import (
    SCHEMA_VERSION,
    Command,
    CommandAck,
    CommandResult,
    PowerSource,
    StatusReason,
    Telemetry,
    check_layout,
)
from contract.receipts import decode_receipt
from firmware_stub.backoff import Backoff
from firmware_stub.commands import CommandJournal, Outcome, clip_detail, execute
from firmware_stub.db import DB_FILE, Synchronous
from firmware_stub.errors import BrokerRefusedError, FirmwareError, FirmwareStateError
from firmware_stub.loop import BoxLoop
from firmware_stub.outbox import Outbox, OutboxRow
from firmware_stub.state import BoxState

__all__ = ["FIRMWARE_VERSION", "BoxFirmware", "FirmwareStats", "wall_clock_ms"]

FIRMWARE_VERSION: Final = "molo-stub/0.1"
#: In-flight slots kept free below the broker's Receive Maximum for the birth, command acks and
#: the offline status, which do not go through the outbox window.
_RESERVED_INFLIGHT: Final = 4
_NO_RECEIVE_MAXIMUM: Final = 65535  # MQTT v5 default when CONNACK carries none
_JOIN_TIMEOUT_S: Final = 10.0
#: PUBACK reason code 16: the broker took the message but no subscriber matched, so nobody got it.
_NO_MATCHING_SUBSCRIBERS: Final = 16
#: How often the sender looks for rows whose receipt is overdue (it sleeps until then, or until the
#: end of a pause after PUBACK 16, unless something happens: a thousand idle boxes stay asleep).
_RECEIPT_CHECK_S: Final = 30.0


def wall_clock_ms() -> int:
    """The device clock of a real box: UTC wall time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class FirmwareStats:
    """Counters since this :class:`BoxFirmware` was created (a snapshot; see ``stats``)."""

    connects: int = 0
    #: Rows handed to the MQTT client (replays at start included, paho's own re-sends not).
    handed: int = 0
    #: Rows deleted from the outbox: committed by the ingest (its receipt), or with
    #: ``confirm="puback"`` acknowledged by the broker.
    acked: int = 0
    #: Successful PUBACKs of outbox rows (the broker took them).
    delivered: int = 0
    #: PUBACKs with reason code 16 (no matching subscribers): the rows were kept and handed again.
    no_subscribers: int = 0
    #: Rows handed again in this process: after a reconnect, a PUBACK 16 or an overdue receipt.
    resent: int = 0
    #: PUBACKs carrying a failure reason code; the rows were kept.
    refused: int = 0
    commands_executed: int = 0
    #: Commands whose id was already journalled: answered with the stored ack, not executed.
    commands_repeated: int = 0
    #: Commands that did not validate but whose id could be read: answered ``rejected``.
    commands_invalid: int = 0
    #: Messages on the command topic without a readable id: logged and dropped (nobody to answer).
    commands_unreadable: int = 0


# --------------------------------------------------------------------------- sender mailbox


@dataclass(frozen=True, slots=True)
class _PubAck:
    mid: int
    reason: ReasonCode


@dataclass(frozen=True, slots=True)
class _LinkUp:
    receive_maximum: int


@dataclass(frozen=True, slots=True)
class _Receipt:
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Command:
    raw: bytes


class _Signal(Enum):
    WAKE = "wake"
    LINK_DOWN = "link_down"
    HALT = "halt"


_SenderEvent = _PubAck | _LinkUp | _Receipt | _Signal
_Event = _SenderEvent | _Command


@dataclass
class _SenderState:
    """What the sender knows of the rows it handed; touched by the loop's worker thread only."""

    window: int
    up: bool = False
    #: paho mid -> outbox seq, handed and not yet PUBACKed.
    in_flight: dict[int, int] = field(default_factory=dict)
    #: Highest seq handed by this process in order (rows after it are new).
    handed_upto: int = 0
    #: seq -> monotonic time of its PUBACK: the broker took it, no receipt yet.
    awaiting: dict[int, float] = field(default_factory=dict)
    #: Rows to hand again, lowest first, before anything new.
    resend: set[int] = field(default_factory=set)
    #: Receipted while a copy was in flight: that copy's PUBACK ends it.
    receipted: set[int] = field(default_factory=set)
    #: After a PUBACK 16, nothing is handed before this monotonic time.
    hold_until: float = 0.0


class _Phase(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class BoxFirmware:
    """The reference firmware of one box, speaking the wire contract over MQTT v5.

    :param box_id: the box id, also its MQTT username and client id.
    :param password: its MQTT password (from provisioning).
    :param host, port: the broker.
    :param state_dir: directory of the box's SQLite file (outbox, counters, command journal);
        a new ``BoxFirmware`` on the same directory is the same box after a reboot.
    :param layout: the doors of the box, announced in the birth message.
    :param clock: device time in epoch ms (the simulator passes simulated time).
    :param keepalive: MQTT keepalive in seconds (the broker declares the box lost after 1.5x).
    :param max_inflight: at most this many outbox rows unacknowledged at once (also capped by
        the broker's Receive Maximum).
    :param reconnect_min_delay, reconnect_max_delay: backoff ceiling of the first retry and the
        largest ceiling, in seconds (full jitter below the ceiling).
    :param rng: randomness for the backoff jitter (inject a seeded one for reproducible runs).
    :param session_expiry_s: MQTT v5 session expiry. 0 (default): the broker forgets the box's
        session when the link drops, so commands sent while it is offline are not queued for it
        (commands to an offline box fail or time out at the sender). >0 queues them across short outages.
    :param synchronous: SQLite durability, see :mod:`firmware_stub.db`.
    :param confirm: when a row leaves the outbox: ``"receipt"`` (default) when the ingest's receipt
        says it is committed; ``"puback"`` when the broker acknowledges it (a broker with no ingest
        behind it, as in broker-only tests; a broker crash can then lose what it had taken).
    :param receipt_timeout_s: a row PUBACKed this long ago with no receipt is handed again.
    :param tls_ca_file: connect over TLS (the broker's 8883 listener), trusting only the CA in this
        file and checking that the broker's certificate names ``host``; None: plain MQTT.
    :param logger: where to log (default ``firmware_stub.<box_id>``).
    """

    def __init__(
        self,
        box_id: str,
        password: str,
        host: str,
        port: int,
        state_dir: Path,
        *,
        layout: BoxLayout | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        keepalive: int = 10,
        max_inflight: int = 100,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        rng: random.Random | None = None,
        session_expiry_s: int = 0,
        synchronous: Synchronous = "FULL",
        confirm: Literal["receipt", "puback"] = "receipt",
        receipt_timeout_s: float = 300.0,
        tls_ca_file: Path | None = None,
        firmware_version: str = FIRMWARE_VERSION,
        protocol: Literal["5", "3.1.1"] = "5",
        logger: logging.Logger | None = None,
        loop: BoxLoop | None = None,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if keepalive < 1:
            raise ValueError(f"keepalive must be >= 1 s, got {keepalive}")
        self.box_id = box_id
        self.name = box_id
        self.host = host
        self.port = port
        self.state_dir = state_dir
        self.layout = layout if layout is not None else default_layout()
        self.keepalive = keepalive
        self.protocol = protocol
        self.max_inflight = max_inflight
        self.session_expiry_s = session_expiry_s
        if receipt_timeout_s <= 0:
            raise ValueError(f"receipt_timeout_s must be > 0, got {receipt_timeout_s}")
        self.confirm = confirm
        self.receipt_timeout_s = receipt_timeout_s
        self.tls_ca_file = tls_ca_file
        self.firmware_version = firmware_version
        self._password = password
        self._clock = clock
        self._log = logger if logger is not None else logging.getLogger("firmware_stub").getChild(box_id)
        self._topic = {kind: topic_for(box_id, kind) for kind in MessageKind}  # validates box_id
        self._backoff = Backoff(reconnect_min_delay, reconnect_max_delay, rng)
        # Retries after PUBACK 16: short, since the ingest resubscribes within a second or two.
        self._no_sub_backoff = Backoff(0.25, 10.0, rng)

        state_dir.mkdir(parents=True, exist_ok=True)
        self._outbox = Outbox(state_dir / DB_FILE, synchronous=synchronous)
        self._journal = CommandJournal(state_dir / DB_FILE, synchronous=synchronous)
        self._state = BoxState(self.layout)

        self._phase = _Phase.NEW
        self._phase_lock = threading.Lock()
        self._session = 0
        self._stats = FirmwareStats()
        self._client: mqtt.Client | None = None
        self._loop = loop
        self._own_loop = loop is None  # a loop of its own, started and stopped with the box
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()  # the mailbox (worker thread)
        self._link = _SenderState(window=max_inflight)  # worker thread
        self._next_check = time.monotonic() + _RECEIPT_CHECK_S  # worker thread
        self._session_used = False  # start() took the first connection's session (connector thread)
        self._closing = threading.Event()  # graceful stop: no more reconnects, no more sends
        self._detached = threading.Event()  # the loop's network side is done with the box
        self._retired = threading.Event()  # ... and its worker side
        self._conn_cv = threading.Condition()
        self._connected = False  # CONNACK accepted
        self._subscribed = False  # ... and the commands subscription acknowledged
        self._subscribe_mid: int | None = None
        self._refusal: BrokerRefusedError | None = None
        self._drained = threading.Condition()
        self._link_up_pending: int | None = None  # set by on_connect, announced by the network thread
        self._connected_at: float | None = None  # monotonic time of the last CONNACK (network thread)

    # ------------------------------------------------------------------ properties

    @property
    def session(self) -> int:
        """The session of the current (or next) connection; 0 before :meth:`start`."""
        return self._session

    @property
    def state(self) -> BoxState:
        """The live compartment state (the simulator drives it; commands change it)."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        with self._conn_cv:
            return self._connected

    @property
    def pending_count(self) -> int:
        """Rows in the outbox: not yet committed by the ingest (or acknowledged by the broker, with
        ``confirm="puback"``), or refused."""
        return len(self._outbox)

    @property
    def stats(self) -> FirmwareStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def topic(self, kind: MessageKind) -> str:
        """This box's topic for ``kind``."""
        return self._topic[kind]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Boot: take a new session, then connect in the background (returns at once).

        A ``BoxFirmware`` starts once; after :meth:`stop` or :meth:`kill`, build a new one on the
        same ``state_dir``.
        """
        with self._phase_lock:
            if self._phase is not _Phase.NEW:
                raise FirmwareStateError(f"box {self.box_id} was already started ({self._phase.value})")
            self._phase = _Phase.RUNNING
        self._session = self._outbox.next_session()  # the first connection's; emit() needs one now
        self._client = self._make_client()
        self._log.info(
            "box %s: boot, first session %d, %d messages in the outbox", self.box_id, self._session, len(self._outbox)
        )
        if self._loop is None:
            self._loop = BoxLoop(self.box_id, logger=self._log).start()
        self._loop.attach(self)
        self._post(_Signal.WAKE)  # a replay of what the outbox still holds waits for the link

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the box is online -- connection accepted and subscribed to its commands
        (so a command sent now reaches it): True, or False after ``timeout``.

        Raises :class:`BrokerRefusedError` (with the CONNACK reason code) if the broker refused
        the last attempt, e.g. for a wrong password -- waiting longer would not help.
        """
        with self._conn_cv:
            self._conn_cv.wait_for(lambda: self._subscribed or self._refusal is not None, timeout)
            if self._subscribed:
                return True
            if self._refusal is not None:
                raise self._refusal
            return False

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every message committed by the ingest, or with
        ``confirm="puback"`` acknowledged by the broker): True, or False on timeout."""
        deadline = time.monotonic() + timeout
        with self._drained:
            while len(self._outbox) > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(min(remaining, 0.5))
        return True

    def stop(self, *, timeout: float = 5.0, flush_timeout: float = 0.0) -> None:
        """Shut down gracefully.

        Optionally wait up to ``flush_timeout`` for the outbox to drain; then, if connected,
        publish the retained offline status of this session (waiting up to ``timeout`` for its
        PUBACK) and send DISCONNECT, so the broker discards the Last Will. What is left in the
        outbox stays on disk for the next start. Idempotent.
        """
        if not self._begin_shutdown():
            return
        if flush_timeout > 0 and self.connected:
            self.flush(flush_timeout)
        self._closing.set()
        client = self._require_client()
        loop = self._require_loop()
        if self.connected:
            info = client.publish(self._topic[MessageKind.STATUS], self._status(online=False), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                self._log.warning("box %s: offline status not confirmed: %s", self.box_id, exc)
        # Also before the CONNACK: the network thread writes it, then paho closes the socket (and
        # a connection the connector opens from now on is closed the same way: link_attempt).
        client.disconnect()
        loop.close(self, halt=False)
        if not self._detached.wait(timeout):
            self._log.warning("box %s: link did not close in %.1f s; dropping it", self.box_id, timeout)
            loop.close(self, halt=True)
            self._detached.wait(_JOIN_TIMEOUT_S)
        left = self._shutdown_workers()
        self._log.info("box %s: stopped, %d messages left in the outbox", self.box_id, left)

    def kill(self) -> None:
        """Simulate a crash or power cut: drop the TCP connection without DISCONNECT (the broker
        then publishes the Last Will), stop every thread, keep the outbox on disk. Idempotent."""
        if not self._begin_shutdown():
            return
        self._closing.set()
        self._require_loop().close(self, halt=True)
        self._detached.wait(_JOIN_TIMEOUT_S)
        left = self._shutdown_workers()
        self._log.warning("box %s: killed, %d messages left in the outbox", self.box_id, left)

    def _begin_shutdown(self) -> bool:
        """Move RUNNING -> STOPPING and return True; otherwise (never started, already stopping
        or stopped) close what needs closing and return False."""
        with self._phase_lock:
            phase = self._phase
            if phase is _Phase.RUNNING:
                self._phase = _Phase.STOPPING
                return True
            if phase is _Phase.NEW:
                self._phase = _Phase.STOPPED
        if phase is _Phase.NEW:
            self._close_storage()
        return False

    def _shutdown_workers(self) -> int:
        """Retire the box from the worker and close the database; returns the rows left in the outbox."""
        # Every PUBACK the network thread saw is already in the mailbox, ahead of HALT.
        self._post(_Signal.HALT)
        if not self._retired.wait(_JOIN_TIMEOUT_S):
            self._log.warning("box %s: worker did not retire it in %.0f s", self.box_id, _JOIN_TIMEOUT_S)
        if self._own_loop and self._loop is not None:
            self._loop.stop()
        left = self._pending_or_unknown()
        self._close_storage()
        with self._conn_cv:
            self._connected = self._subscribed = False
            self._conn_cv.notify_all()
        self._phase = _Phase.STOPPED
        return left

    def _close_storage(self) -> None:
        self._outbox.close()
        self._journal.close()

    def _pending_or_unknown(self) -> int:
        try:
            return len(self._outbox)
        except FirmwareError:
            return -1

    # ------------------------------------------------------------------ emitting

    def emit(self, payload: EventPayload, *, ts_ms: int | None = None) -> int:
        """Store an event (or a :class:`Telemetry` reading) in the outbox and queue it for sending.

        Builds the envelope with the next ``seq``, the current ``session`` and ``ts_ms`` (default
        ``clock()``; the simulator passes the simulated time of the happening);
        returns the seq. Works while disconnected (it waits in the outbox). Raises ``ValueError``
        (:class:`contract.ContractError` or pydantic's ``ValidationError``) if the receiver would
        refuse the event -- e.g. a compartment this box does not have -- and then stores nothing.
        """
        if self._phase is not _Phase.RUNNING:
            raise FirmwareStateError(f"box {self.box_id} is not running ({self._phase.value}); call start()")
        kind = MessageKind.TELEMETRY if isinstance(payload, Telemetry) else MessageKind.EVENTS

        def build(seq: int) -> bytes:
            ts = self._clock() if ts_ms is None else ts_ms
            event = make_event(box_id=self.box_id, seq=seq, session=self._session, ts_ms=ts, payload=payload)
            check_layout(event, self.layout)
            return encode(event)

        seq = self._outbox.enqueue(self._topic[kind], build)
        self._post(_Signal.WAKE)
        return seq

    def telemetry(
        self,
        *,
        temperature_c: float = 15.0,
        power: PowerSource = PowerSource.MAINS,
        battery_pct: float | None = None,
    ) -> int:
        """Emit a telemetry reading of the whole box from :attr:`state`; returns its seq."""
        return self.emit(
            Telemetry(
                power=power,
                battery_pct=battery_pct,
                temperature_c=temperature_c,
                compartments=self._state.readings(),
                red_boxes=self._state.red_box_readings(),
            )
        )

    # ------------------------------------------------------------------ MQTT client

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.box_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 3.1.1 (only for the development broker): a clean session, as with expiry 0 on v5.
            clean_session=None if v5 else True,
        )
        client.username_pw_set(self.box_id, self._password)
        if self.tls_ca_file is not None:
            # TLS 1.2+, the server's certificate must chain to this CA and name the host we dial
            # (PROTOCOL_TLS_CLIENT verifies both); a failed handshake is retried like any refusal.
            client.tls_set(ca_certs=str(self.tls_ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.enable_logger(self._log.getChild("paho"))
        # The sender keeps its own window; paho must not queue behind a second one.
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # External event loop: publish() from other threads only queues the packet and calls this,
        # and the network thread does every socket write.
        client.on_socket_register_write = self._on_register_write
        properties: Properties | None = None
        if v5 and self.session_expiry_s > 0:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            properties.SessionExpiryInterval = self.session_expiry_s
        client.connect_async(self.host, self.port, self.keepalive, properties=properties)
        return client

    def _require_client(self) -> mqtt.Client:
        if self._client is None:
            raise FirmwareStateError(f"box {self.box_id} was never started")
        return self._client

    def _status(self, *, online: bool) -> bytes:
        return encode(
            Status(
                v=SCHEMA_VERSION,
                box_id=self.box_id,
                online=online,
                session=self._session,
                reason=StatusReason.BIRTH if online else StatusReason.SHUTDOWN,
                ts_ms=self._clock(),
                firmware=self.firmware_version,
                layout=self.layout if online else None,
            )
        )

    def _will(self) -> bytes:
        # No ts_ms: the will is written at connect time but published whenever the link dies.
        return encode(
            Status(
                v=SCHEMA_VERSION,
                box_id=self.box_id,
                online=False,
                session=self._session,
                reason=StatusReason.CONNECTION_LOST,
                firmware=self.firmware_version,
            )
        )

    # paho callbacks: all on the network thread, except on_socket_register_write, which runs on
    # whichever thread queued a packet. Each only records and hands off.

    def _on_register_write(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        self._require_loop().want_write(self)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            error = BrokerRefusedError(f"broker {self.host}:{self.port} refused box {self.box_id}", reason)
            self._log.error("box %s: %s", self.box_id, error)
            with self._conn_cv:
                self._refusal = error
                self._conn_cv.notify_all()
            return
        receive_maximum = int(getattr(properties, "ReceiveMaximum", _NO_RECEIVE_MAXIMUM))
        # Subscribe before the birth: the broker handles both in order, so whoever reacts to the
        # birth by sending a command reaches a box that is already listening.
        _, self._subscribe_mid = client.subscribe(
            [(self._topic[MessageKind.COMMANDS], 1), (self._topic[MessageKind.RECEIPTS], 0)]
        )
        client.publish(self._topic[MessageKind.STATUS], self._status(online=True), qos=1, retain=True)
        self._connected_at = time.monotonic()
        self._stats.connects += 1
        self._link_up_pending = receive_maximum
        with self._conn_cv:
            self._connected = True
            self._refusal = None
            self._conn_cv.notify_all()
        self._log.info(
            "box %s: connected to %s:%d (session %d, receive maximum %d)",
            self.box_id,
            self.host,
            self.port,
            self._session,
            receive_maximum,
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if self._subscribe_mid is None or mid != self._subscribe_mid:
            return
        if any(reason.is_failure for reason in reasons):
            self._log.error("box %s: subscription to its commands or receipts refused: %s", self.box_id, reasons)
        with self._conn_cv:
            self._subscribed = True
            self._conn_cv.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._conn_cv:
            was_connected, self._connected, self._subscribed = self._connected, False, False
            self._conn_cv.notify_all()
        self._post(_Signal.LINK_DOWN)
        if was_connected and not self._closing.is_set():
            self._log.warning("box %s: connection lost: %s", self.box_id, reason)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        self._post(_PubAck(mid, reason))

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._topic[MessageKind.COMMANDS]:
            self._post(_Command(bytes(message.payload)))
        elif message.topic == self._topic[MessageKind.RECEIPTS]:
            try:
                receipt = decode_receipt(bytes(message.payload), topic_box_id=self.box_id)
            except ContractError as exc:
                self._log.warning("box %s: unreadable receipt ignored: %s", self.box_id, exc)
                return
            self._post(_Receipt(tuple(receipt.each_seq())))
        else:
            self._log.warning("box %s: unexpected message on %s ignored", self.box_id, message.topic)

    # ------------------------------------------------------------------ the loop's calls (Driven)

    def mqtt_client(self) -> mqtt.Client:
        return self._require_client()

    def link_attempt(self) -> float | None:
        """Connector thread: one connection attempt (see :class:`firmware_stub.loop.Driven`)."""
        if self._closing.is_set():
            return -1.0
        client = self._require_client()
        if self._session_used:
            self._session = self._outbox.next_session()
        # The will goes out in the CONNECT, so it names the session of this connection.
        client.will_set(self._topic[MessageKind.STATUS], self._will(), qos=1, retain=True)
        try:
            client.reconnect()
        except OSError as exc:
            # No CONNECT was sent (the socket never opened): the session is still unused.
            self._log.warning("box %s: cannot reach %s:%d: %s", self.box_id, self.host, self.port, exc)
            if self._closing.is_set():
                return -1.0
            delay = self._backoff.next_delay()
            self._log.debug("box %s: reconnecting in %.2f s", self.box_id, delay)
            return delay
        self._session_used = True
        self._connected_at = None
        if self._closing.is_set():  # stop() came while connecting: leave cleanly (the broker drops the will)
            client.disconnect()
        return None

    def link_serviced(self) -> None:
        if self._link_up_pending is not None:
            # Announced only now, after paho queued its re-sends of unacknowledged messages
            # (it does so right after on_connect returns), so new rows go out behind them.
            self._post(_LinkUp(self._link_up_pending))
            self._link_up_pending = None

    def link_lost(self) -> float | None:
        self._link_up_pending = None
        with self._conn_cv:
            self._connected = self._subscribed = False
            self._conn_cv.notify_all()
        self._post(_Signal.LINK_DOWN)
        if self._closing.is_set():
            return None
        # Back off from scratch only after a connection that held: a broker that accepts and then
        # drops the box at once (say, a second box with the same id taking over the session) must
        # not be hammered.
        if self._connected_at is not None and time.monotonic() - self._connected_at >= self.keepalive:
            self._backoff.reset()
        delay = self._backoff.next_delay()
        self._log.debug("box %s: reconnecting in %.2f s", self.box_id, delay)
        return delay

    def link_detached(self) -> None:
        self._detached.set()

    def _post(self, event: _Event) -> None:
        """Into the mailbox, for the worker thread."""
        self._events.put(event)
        self._require_loop().ready(self)

    def _require_loop(self) -> BoxLoop:
        if self._loop is None:
            raise FirmwareStateError(f"box {self.box_id} was never started")
        return self._loop

    # ------------------------------------------------------------------ worker thread: sender, commands

    def work(self) -> float | None:
        """Worker thread: the mailbox's commands, then the sender's turn (see :class:`Driven`)."""
        if self._retired.is_set():
            return None
        batch: list[_SenderEvent] = []
        halt = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, _Command):
                self._command(event.raw)
            elif event is _Signal.HALT:
                halt = True
            else:
                batch.append(event)
        link = self._link
        try:
            self._sender_step(link, batch)
        except FirmwareError as exc:  # the outbox was closed under us: nothing left to do
            self._log.debug("box %s: sender stops: %s", self.box_id, exc)
            halt = True
        if halt:
            self._retired.set()
            return None
        return min(self._next_check, link.hold_until) if link.hold_until > time.monotonic() else self._next_check

    def _sender_step(self, link: _SenderState, batch: list[_SenderEvent]) -> None:
        now = time.monotonic()
        done: list[int] = []  # rows to delete from the outbox
        for event in batch:
            if isinstance(event, _PubAck):
                self._on_puback(link, event, done, now)
            elif isinstance(event, _Receipt):
                self._on_receipt(link, event, done)
            elif isinstance(event, _LinkUp):
                link.up = True
                link.window = min(self.max_inflight, max(1, event.receive_maximum - _RESERVED_INFLIGHT))
                # The broker took these, but may have died with them (a reconnect follows a broker
                # restart): hand them again; the ingest stores each seq once.
                link.resend.update(link.awaiting)
                link.awaiting.clear()
                link.hold_until = 0.0
            elif event is _Signal.LINK_DOWN:
                link.up = False
        if now >= self._next_check:
            self._next_check = now + _RECEIPT_CHECK_S
            overdue = [s for s, at in link.awaiting.items() if now - at >= self.receipt_timeout_s]
            for seq in overdue:
                del link.awaiting[seq]
                link.resend.add(seq)
        if done:
            self._stats.acked += self._outbox.ack_many(done)
            with self._drained:
                self._drained.notify_all()
        if link.up and not self._closing.is_set() and now >= link.hold_until:
            self._hand(link)

    def _on_puback(self, link: _SenderState, event: _PubAck, done: list[int], now: float) -> None:
        # PUBACKs of the birth, acks and status carry mids not in the map.
        seq = link.in_flight.pop(event.mid, None)
        if seq is None:
            if event.reason.is_failure:
                self._log.error("box %s: broker refused mid %d: %s", self.box_id, event.mid, event.reason)
            return
        if seq in link.receipted:  # the ingest committed an earlier copy; the row is gone
            link.receipted.discard(seq)
            return
        if event.reason.value == _NO_MATCHING_SUBSCRIBERS:
            # Taken by the broker, received by nobody (no ingest subscribed right now): keep it
            # and hand it again, in order, after a pause in which nothing newer is handed.
            self._stats.no_subscribers += 1
            link.resend.add(seq)
            if link.hold_until <= now:
                link.hold_until = now + self._no_sub_backoff.next_delay()
                self._log.info(
                    "box %s: no subscriber took seq %d; handing it again in %.2f s",
                    self.box_id,
                    seq,
                    link.hold_until - now,
                )
        elif event.reason.is_failure:
            self._refused(seq, event.reason)
        else:
            self._no_sub_backoff.reset()
            self._stats.delivered += 1
            if self.confirm == "puback":
                done.append(seq)
            else:
                link.awaiting[seq] = now

    def _on_receipt(self, link: _SenderState, event: _Receipt, done: list[int]) -> None:
        in_flight_seqs = set(link.in_flight.values())
        for seq in event.seqs:
            link.awaiting.pop(seq, None)
            link.resend.discard(seq)
            if seq in in_flight_seqs:  # a copy is on its way again: its PUBACK must not wait for a receipt
                link.receipted.add(seq)
        done.extend(event.seqs)

    def _hand(self, link: _SenderState) -> None:
        """Hand rows to paho while the window has room: first those to send again, then new ones."""
        room = link.window - len(link.in_flight)
        if room <= 0:
            return
        client = self._require_client()
        again = sorted(link.resend)[:room]
        rows = self._outbox.rows(again) if again else []
        link.resend.difference_update(again)  # rows no longer stored were receipted meanwhile
        for row in rows:
            if not self._publish_row(client, link, row):
                link.resend.update(r.seq for r in rows if r.seq >= row.seq)
                return
            self._stats.resent += 1
        room -= len(rows)
        if room <= 0 or link.resend:
            return
        for row in self._outbox.pending(after_seq=link.handed_upto, limit=room):
            if not self._publish_row(client, link, row):
                return
            link.handed_upto = row.seq
            self._stats.handed += 1

    def _publish_row(self, client: mqtt.Client, link: _SenderState, row: OutboxRow) -> bool:
        """Hand one row to paho; False if paho would not take it now (try again later)."""
        try:
            info = client.publish(row.topic, row.payload, qos=row.qos)
        except ValueError as exc:  # a row paho cannot send at all (say, a wildcard in its topic)
            self._stats.refused += 1
            self._log.error(
                "box %s: seq %d cannot be published (%s); it stays in the outbox", self.box_id, row.seq, exc
            )
            return True
        # NO_CONN: the link just dropped, but paho keeps the message and sends it on reconnect.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._log.warning(
                "box %s: MQTT client did not take seq %d: %s", self.box_id, row.seq, mqtt.error_string(info.rc)
            )
            return False
        link.in_flight[info.mid] = row.seq
        return True

    def _refused(self, seq: int, reason: ReasonCode) -> None:
        self._stats.refused += 1
        self._log.error(
            "box %s: broker REFUSED seq %d (reason code %d %s); the message stays in the outbox and "
            "is retried at the next start -- check the broker ACL",
            self.box_id,
            seq,
            reason.value,
            reason,
        )

    # ------------------------------------------------------------------ commands (worker thread)

    def _command(self, raw: bytes) -> None:
        try:
            self._handle_command(raw)
        except FirmwareError:
            raise
        except Exception:
            self._log.exception("box %s: command failed", self.box_id)

    def _handle_command(self, raw: bytes) -> None:
        try:
            command = decode_command(raw, topic_box_id=self.box_id)
        except ContractError as exc:
            command_id = _readable_command_id(raw)
            if command_id is None:
                self._stats.commands_unreadable += 1
                self._log.warning("box %s: command without a readable id dropped: %s", self.box_id, exc)
                return
            self._stats.commands_invalid += 1
            self._log.warning("box %s: invalid command %s rejected: %s", self.box_id, command_id, exc)
            detail = clip_detail(f"{exc.code.value}: {exc.detail}")
            self._answer(command_id, lambda: Outcome(CommandResult.REJECTED, detail))
            return
        self._answer(command.command_id, lambda: self._execute(command))

    def _execute(self, command: Command) -> Outcome:
        outcome = execute(command, self._state)
        self._stats.commands_executed += 1
        self._log.info(
            "box %s: command %s %s -> %s (%s)",
            self.box_id,
            command.command_id,
            command.action.value,
            outcome.result.value,
            outcome.detail,
        )
        for payload in outcome.events:
            self.emit(payload)
        return outcome

    def _answer(self, command_id: UUID, run: Callable[[], Outcome]) -> None:
        entry = self._journal.get(command_id)
        if entry is not None and entry.ack is not None:
            self._stats.commands_repeated += 1
            self._log.info("box %s: command %s repeated; sending the stored ack", self.box_id, command_id)
            self._publish_ack(entry.ack)
            return
        if entry is not None:
            outcome = Outcome(CommandResult.FAILED, "interrupted by a restart before it finished; not executed again")
        else:
            self._journal.begin(command_id)
            outcome = run()
        ack = encode(
            CommandAck(
                v=SCHEMA_VERSION,
                command_id=command_id,
                box_id=self.box_id,
                ts_ms=self._clock(),
                result=outcome.result,
                detail=outcome.detail,
            )
        )
        self._journal.finish(command_id, ack)
        self._publish_ack(ack)

    def _publish_ack(self, ack: bytes) -> None:
        client = self._require_client()
        # QoS 1 through paho (not the outbox): paho re-sends it after a reconnect, and after a
        # reboot the journal answers the backend's retry with the same bytes.
        client.publish(self._topic[MessageKind.COMMAND_ACK], ack, qos=1)

    def __enter__(self) -> BoxFirmware:
        """``with BoxFirmware(...) as box:`` starts the box and stops it gracefully at the end."""
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<BoxFirmware {self.box_id} session={self._session} {self._phase.value}>"


def _readable_command_id(raw: bytes) -> UUID | None:
    """The ``command_id`` of a command that failed validation, if it can still be read."""
    try:
        data: Any = json.loads(raw)
        return UUID(data["command_id"]) if isinstance(data, dict) and isinstance(data.get("command_id"), str) else None
    except (ValueError, TypeError, KeyError):
        return None
