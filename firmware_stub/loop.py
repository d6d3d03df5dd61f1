"""The threads that drive boxes: a handful for any number of them.

Where it sits in a message's journey (see ``shared/DESIGN.md``): inside the box process, between
each :class:`~firmware_stub.box.BoxFirmware` and its MQTT connection. A single box gets a loop of
its own; a fleet of thousands (``molo boxes``) shares one, so a box costs a socket and its SQLite
file, not three threads::

    connector ──paho reconnect()──> socket ──> network: one selector over every box's socket,
                                                        keepalives, reconnect timers
    network ──paho callbacks──> box mailbox ──> worker: each box's sender and commands, in turn

``network``    the only thread that reads or writes a socket: paho's *external event loop*
               (``loop_read``/``loop_write``/``loop_misc``) for every attached box, from one
               ``selectors`` selector (epoll: no limit of 1024 descriptors);
``connector``  runs paho's ``reconnect()``, which blocks (DNS, TCP, TLS handshake), so that a
               broker slow to answer holds up no other box's keepalive; a fleet has several
               (``connectors``), so that thousands of boxes reconnecting after a broker restart do
               not queue behind one slow handshake;
``worker``     runs each box's mailbox (PUBACKs, receipts, commands) one box at a time, in the order
               they became ready, and wakes a box again at the time it asked for (receipt checks,
               pauses after PUBACK 16).

The loop does not know MQTT rules or the outbox: it calls the box back (:class:`Driven`). Every
decision about delivery stays in :mod:`firmware_stub.box`, the same code for one box or five
thousand. All of a box's connection state changes on the network thread; other threads ask for
them with :meth:`BoxLoop.call_soon`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Final, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from firmware_stub.errors import FirmwareStateError

__all__ = ["BoxLoop", "Driven"]

_JOIN_TIMEOUT_S: Final = 10.0
#: The longest the network thread sleeps: it runs every box's keepalive (``loop_misc``) this often,
#: or at a quarter of the shortest keepalive if that is shorter.
_MISC_INTERVAL_S: Final = 1.0


class Driven(Protocol):
    """What a box offers the loop (implemented by :class:`~firmware_stub.box.BoxFirmware`)."""

    name: str
    keepalive: int

    def mqtt_client(self) -> mqtt.Client:
        """The box's paho client."""
        ...

    def link_attempt(self) -> float | None:
        """Connector thread: open the connection (``reconnect()``). None once the socket is open and
        the CONNECT queued; otherwise the seconds to wait before the next attempt, or ``-1`` to give
        up (the box is stopping)."""
        ...

    def link_serviced(self) -> None:
        """Network thread: called after the box's socket was read (CONNACK handling goes here)."""
        ...

    def link_lost(self) -> float | None:
        """Network thread: the connection is gone. The seconds before the next attempt, or None if the
        box is stopping (it then leaves the loop)."""
        ...

    def link_detached(self) -> None:
        """Network thread: the box has left the loop's network side for good."""
        ...

    def work(self) -> float | None:
        """Worker thread: handle everything in the mailbox. The monotonic time at which to be called
        again even if nothing arrives (``math.inf``: only when something arrives), or None once the
        box has retired (it is then never called again)."""
        ...


class _Net(Enum):
    WAITING = "waiting"  # a reconnect timer runs
    CONNECTING = "connecting"  # queued for, or in, the connector
    REGISTERED = "registered"  # its socket is in the selector
    DETACHED = "detached"


class _Entry:
    """The loop's bookkeeping of one box; each field has one owning thread, named beside it."""

    __slots__ = ("box", "due", "halt", "net", "queued", "sock", "watching_write")

    def __init__(self, box: Driven) -> None:
        self.box = box
        self.net = _Net.WAITING  # network thread
        self.sock: socket.socket | None = None  # network thread: the socket registered
        self.watching_write = False  # network thread
        self.halt = False  # network thread: close without DISCONNECT when next seen
        self.queued = False  # under BoxLoop._ready_lock: in the worker's queue
        self.due = math.inf  # worker thread: the time of its pending wake-up


class BoxLoop:
    """Network, connector and worker threads shared by every box attached to them (``connectors``:
    how many connection attempts may be under way at once).

    ``with BoxLoop() as loop:`` starts and stops it; boxes built with ``loop=loop`` attach on their
    :meth:`~firmware_stub.box.BoxFirmware.start` and leave on ``stop``/``kill``. Stop the boxes
    before the loop.
    """

    def __init__(self, name: str = "boxes", *, connectors: int = 1, logger: logging.Logger | None = None) -> None:
        if connectors < 1:
            raise ValueError(f"connectors must be >= 1, got {connectors}")
        self.name = name
        self.connectors = connectors
        self._log = logger if logger is not None else logging.getLogger("firmware_stub.loop")
        #: id(box) -> entry, from attach until the worker retires the box (its network side may have
        #: detached earlier).
        self._entries: dict[int, _Entry] = {}
        self._entries_lock = threading.Lock()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # network thread
        self._order = itertools.count()
        self._write_wanted: set[int] = set()
        self._write_lock = threading.Lock()
        self._connects: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._ready: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._ready_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._misc_interval = _MISC_INTERVAL_S
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BoxLoop:
        if self._started:
            raise FirmwareStateError(f"loop {self.name} was already started")
        self._started = True
        roles = [("net", self._network_main), ("work", self._worker_main)]
        roles += [(f"connect-{i}", self._connector_main) for i in range(self.connectors)]
        for role, target in roles:
            thread = threading.Thread(target=target, name=f"{self.name}-{role}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Stop the threads (boxes still attached are dropped without a DISCONNECT). Idempotent."""
        if self._stopping.is_set() or not self._started:
            return
        self._stopping.set()
        for _ in range(self.connectors):
            self._connects.put(None)
        self._ready.put(None)
        self._wake()
        for thread in self._threads:
            thread.join(_JOIN_TIMEOUT_S)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> BoxLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def attached(self) -> int:
        """Boxes attached and not yet retired."""
        with self._entries_lock:
            return len(self._entries)

    # ------------------------------------------------------------------ called by boxes, any thread

    def attach(self, box: Driven) -> None:
        """Take the box in: its first connection attempt is made at once."""
        if not self._started or self._stopping.is_set():
            raise FirmwareStateError(f"loop {self.name} is not running")
        entry = _Entry(box)
        with self._entries_lock:
            if id(box) in self._entries:
                raise FirmwareStateError(f"{box.name} is already attached to loop {self.name}")
            self._entries[id(box)] = entry
        self._misc_interval = min(self._misc_interval, box.keepalive / 4)
        self.call_soon(lambda: self._to_connector(entry))

    def ready(self, box: Driven) -> None:
        """Something is in the box's mailbox: the worker runs :meth:`Driven.work` soon."""
        entry = self._entry(box)
        if entry is None:
            return
        with self._ready_lock:
            if entry.queued:
                return
            entry.queued = True
        self._ready.put(entry)

    def want_write(self, box: Driven) -> None:
        """paho queued a packet for the box (from any thread): the network thread writes it."""
        key = id(box)
        with self._write_lock:
            if key in self._write_wanted:
                return
            self._write_wanted.add(key)
        self._wake()

    def close(self, box: Driven, *, halt: bool) -> None:
        """The box is stopping. ``halt``: drop its connection now, without a DISCONNECT (a power cut);
        otherwise only a box that is not connected leaves now (a connected one leaves once its
        DISCONNECT is written and the socket closed)."""
        entry = self._entry(box)
        if entry is None:
            return

        def run() -> None:
            if halt:
                entry.halt = True
            if entry.net is _Net.WAITING:
                self._detach(entry)
            elif entry.net is _Net.REGISTERED and halt:
                self._lost(entry)

        self.call_soon(run)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the network thread."""
        self._calls.put(fn)
        self._wake()

    def _entry(self, box: Driven) -> _Entry | None:
        with self._entries_lock:
            return self._entries.get(id(box))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed (stopping)
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ network thread

    def _network_main(self) -> None:
        next_misc = time.monotonic() + self._misc_interval
        while not self._stopping.is_set():
            now = time.monotonic()
            deadline = min(next_misc, self._timers[0][0] if self._timers else math.inf)
            try:
                ready = self._selector.select(max(0.0, deadline - now))
            except OSError as exc:  # a descriptor closed under the selector: drop it at its next use
                self._log.warning("loop %s: select failed: %s", self.name, exc)
                ready = []
            try:
                for key, mask in ready:
                    entry: _Entry | None = key.data
                    if entry is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(65536)
                    elif entry.net is _Net.REGISTERED and entry.sock is key.fileobj:
                        self._io(entry, readable=bool(mask & selectors.EVENT_READ))
                self._run_calls()
                self._run_writes()
                now = time.monotonic()
                if now >= next_misc:
                    next_misc = now + self._misc_interval
                    self._misc()
                while self._timers and self._timers[0][0] <= now:
                    _, _, fn = heapq.heappop(self._timers)
                    fn()
            except Exception:
                self._log.exception("loop %s: network thread error; carrying on", self.name)

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def _run_writes(self) -> None:
        with self._write_lock:
            keys, self._write_wanted = self._write_wanted, set()
        if not keys:
            return
        with self._entries_lock:
            entries = [self._entries[k] for k in keys if k in self._entries]
        for entry in entries:
            if entry.net is _Net.REGISTERED:
                self._io(entry, readable=False)

    def _io(self, entry: _Entry, *, readable: bool) -> None:
        """Read (if readable) and write what is queued; a failure is a lost link."""
        client = entry.box.mqtt_client()
        if readable:
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is not entry.sock:
                self._lost(entry)
                return
            entry.box.link_serviced()
        if client.want_write() and (
            client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is not entry.sock
        ):
            self._lost(entry)
            return
        self._watch(entry, client)

    def _watch(self, entry: _Entry, client: mqtt.Client) -> None:
        want = client.want_write()
        if want != entry.watching_write and entry.sock is not None:
            self._selector.modify(entry.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), entry)
            entry.watching_write = want

    def _misc(self) -> None:
        """Keepalive pings and their timeouts for every connected box."""
        with self._entries_lock:
            entries = [e for e in self._entries.values() if e.net is _Net.REGISTERED]
        for entry in entries:
            client = entry.box.mqtt_client()
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is not entry.sock:
                self._lost(entry)
            elif client.want_write():
                self._io(entry, readable=False)

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), fn))

    def _to_connector(self, entry: _Entry) -> None:
        if entry.net is _Net.DETACHED:
            return
        if entry.halt:
            self._detach(entry)
            return
        entry.net = _Net.CONNECTING
        self._connects.put(entry)

    def _connected(self, entry: _Entry, outcome: float | None) -> None:
        """The connector's answer for ``entry``: None (socket open), a delay, or -1 (give up)."""
        if entry.net is not _Net.CONNECTING:
            return
        client = entry.box.mqtt_client()
        if outcome is None:
            sock = client.socket()
            if entry.halt or not isinstance(sock, socket.socket):
                if isinstance(sock, socket.socket):
                    sock.close()
                self._lost(entry, registered=False)
                return
            entry.sock = sock
            entry.watching_write = False
            self._selector.register(sock, selectors.EVENT_READ, entry)
            entry.net = _Net.REGISTERED
            self._io(entry, readable=False)
        elif outcome < 0 or entry.halt:
            self._detach(entry)
        else:
            entry.net = _Net.WAITING
            self._after(outcome, lambda: self._to_connector(entry))

    def _lost(self, entry: _Entry, *, registered: bool = True) -> None:
        if registered and entry.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(entry.sock)
            if entry.halt:  # a power cut: the socket goes away without a DISCONNECT
                entry.sock.close()
        entry.sock = None
        entry.net = _Net.WAITING
        delay = entry.box.link_lost()
        if delay is None or entry.halt:
            self._detach(entry)
        else:
            self._after(delay, lambda: self._to_connector(entry))

    def _detach(self, entry: _Entry) -> None:
        if entry.net is _Net.DETACHED:
            return
        entry.net = _Net.DETACHED
        entry.box.link_detached()

    # ------------------------------------------------------------------ connector thread

    def _connector_main(self) -> None:
        while (entry := self._connects.get()) is not None:
            try:
                outcome = entry.box.link_attempt()
            except Exception:
                self._log.exception("loop %s: %s: connection attempt failed", self.name, entry.box.name)
                outcome = 1.0
            self.call_soon(lambda entry=entry, outcome=outcome: self._connected(entry, outcome))  # type: ignore[misc]

    # ------------------------------------------------------------------ worker thread

    def _worker_main(self) -> None:
        timers: list[tuple[float, int, _Entry]] = []
        while True:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                due, _, entry = heapq.heappop(timers)
                if due == entry.due:  # not superseded by a newer wake-up
                    entry.due = math.inf
                    self._work(entry, timers)
            try:
                entry_or_stop = self._ready.get(timeout=max(0.001, timers[0][0] - now) if timers else None)
            except queue.Empty:
                continue
            if entry_or_stop is None:
                return
            with self._ready_lock:
                entry_or_stop.queued = False
            self._work(entry_or_stop, timers)

    def _work(self, entry: _Entry, timers: list[tuple[float, int, _Entry]]) -> None:
        if entry.due == -math.inf:  # retired while queued
            return
        try:
            due = entry.box.work()
        except Exception:
            self._log.exception("loop %s: %s: worker error; retrying in 0.1 s", self.name, entry.box.name)
            due = time.monotonic() + 0.1
        if due is None:
            entry.due = -math.inf  # retired: no wake-up matches it again
            with self._entries_lock:
                self._entries.pop(id(entry.box), None)
        elif due < entry.due:
            entry.due = due
            heapq.heappush(timers, (due, next(self._order), entry))
