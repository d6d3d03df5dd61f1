"""Live mode: the same world, paced against the wall clock, driving real firmware stubs over MQTT.

Where it sits: the start of a message's journey, as boxes in the field would be. The model runs in a
SimPy ``RealtimeEnvironment`` (``speed`` simulated seconds per wall second). Its records go to a
:class:`LiveSink`, which only enqueues them, so publishing never blocks the simulation. One worker
thread per box hands each box event to that box's :class:`~firmware_stub.box.BoxFirmware`, stamped with
the simulated time of the happening, so what the backend ingests equals the batch trace of the same
scenario and seed.

Box faults become real ones: ``box.offline`` kills the stub (the broker publishes its Last Will) and
holds the box's events back; ``box.online`` starts a fresh stub on the same disk (a newer session, its
outbox replayed) and sends the held events with their original timestamps.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import simpy.rt

from contract.messages import PAYLOAD_BY_TYPE, EventPayload
from firmware_stub.box import BoxFirmware
from firmware_stub.loop import BoxLoop
from network import Box, Network
from simulator.model import World
from simulator.params import Scenario
from simulator.run import network_for, summarize
from simulator.trace import to_ms

log = logging.getLogger(__name__)


def payload_of(kind: str, data: dict[str, Any]) -> EventPayload:
    """The contract payload of a model record (validated as the wire would: from JSON)."""
    return PAYLOAD_BY_TYPE[kind].model_validate_json(json.dumps(data))


@dataclass
class LiveStats:
    """How well the run kept pace."""

    speed: float
    simulated_s: float = 0.0
    wall_s: float = 0.0
    max_lag_s: float = 0.0  # how far simulated time fell behind the wall clock (in wall seconds)
    max_backlog: int = 0  # most records waiting to be handed to firmware stubs
    events: int = 0
    drain_s: float = 0.0  # after the horizon: until every box's outbox was acknowledged

    @property
    def kept_up(self) -> bool:
        """True if the model never ran more than a second late and the stubs emptied their queues."""
        return self.max_lag_s <= 1.0


class BoxLink:
    """One box's firmware stub and the worker thread that feeds it, in record order."""

    def __init__(
        self,
        box: Box,
        password: str,
        host: str,
        port: int,
        state_dir: Path,
        clock_ms: Any,
        protocol: Literal["5", "3.1.1"],
        loop: BoxLoop | None = None,
    ) -> None:
        self.box = box
        self._loop = loop
        self._password, self._host, self._port = password, host, port
        self._state_dir, self._clock_ms, self._protocol = state_dir, clock_ms, protocol
        self.queue: queue.Queue[tuple[str, int, str, dict[str, Any]] | None] = queue.Queue()
        self.firmware: BoxFirmware | None = None
        self._held: list[tuple[int, str, dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._run, name=f"live-{box.id}", daemon=True)
        self._abandon = threading.Event()  # set when finishing ran out of time: count the rest, hand nothing
        self.errors = 0
        self.not_handed = 0  # records the run made that never reached the box (it was behind at the end)

    def _start_firmware(self) -> BoxFirmware:
        firmware = BoxFirmware(
            self.box.id,
            self._password,
            self._host,
            self._port,
            self._state_dir / self.box.id,
            layout=self.box.layout,
            clock=self._clock_ms,
            synchronous="NORMAL",
            protocol=self._protocol,
            logger=logging.getLogger(f"live.{self.box.id}"),
            loop=self._loop,
        )
        firmware.start()
        return firmware

    def start(self) -> None:
        self.firmware = self._start_firmware()
        self._thread.start()

    def _emit(self, ts_ms: int, kind: str, data: dict[str, Any]) -> None:
        if self.firmware is None:
            self._held.append((ts_ms, kind, data))
            return
        try:
            self.firmware.emit(payload_of(kind, data), ts_ms=ts_ms)
        except ValueError as exc:  # the model made an event the contract refuses: a model bug
            self.errors += 1
            log.error("live: box %s: %s refused by the contract: %s", self.box.id, kind, exc)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self._abandon.is_set():
                self.not_handed += 1
                continue
            op, ts_ms, kind, data = item
            if op == "event":
                self._emit(ts_ms, kind, data)
            elif op == "offline" and self.firmware is not None:
                self.firmware.kill()
                self.firmware = None
            elif op == "online" and self.firmware is None:
                self.firmware = self._start_firmware()
                held, self._held = self._held, []
                for held_ts, held_kind, held_data in held:
                    self._emit(held_ts, held_kind, held_data)

    def finish(self, deadline: float) -> int:
        """Hand over everything queued, wait until it is delivered or ``deadline`` (``time.monotonic``)
        passes, stop the stub. Returns the messages left in its outbox (kept on disk for the next start)."""

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.queue.put(None)
        self._thread.join(left())
        if self._thread.is_alive():  # still handing over records at the deadline: stop it, count the rest
            self._abandon.set()
            self._thread.join()
        if self.firmware is None:  # the run ended during an outage: come back to deliver
            self.firmware = self._start_firmware()
            for ts_ms, kind, data in self._held:
                self._emit(ts_ms, kind, data)
        if self.firmware.wait_connected(left()):
            self.firmware.flush(left())
        remaining = self.firmware.pending_count
        self.firmware.stop(timeout=min(5.0, max(left(), 1.0)))
        return remaining


@dataclass
class LiveSink:
    """Routes the model's records to the box links without ever blocking the simulation."""

    start: Any
    links: dict[str, BoxLink]
    stats: LiveStats
    also: Any = None  # another sink for the same records (a trace file, a test's memory sink)
    _pending: int = field(default=0)

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        if self.also is not None:
            self.also.record(t, box_id, kind, data)
        if box_id is None:
            return
        link = self.links[box_id]
        if kind in PAYLOAD_BY_TYPE:
            link.queue.put(("event", to_ms(self.start, t), kind, data))
            self.stats.events += 1
        elif kind == "box.offline":
            link.queue.put(("offline", 0, kind, data))
        elif kind == "box.online":
            link.queue.put(("online", 0, kind, data))
        backlog = sum(lk.queue.qsize() for lk in self.links.values())
        self.stats.max_backlog = max(self.stats.max_backlog, backlog)


@dataclass
class LiveResult:
    summary: dict[str, Any]
    stats: LiveStats
    delivered: bool  # every box's outbox was acknowledged by the broker at the end
    left_in_outboxes: int = 0  # messages still in the boxes' outboxes when they stopped (sent on the next start)
    not_handed: int = 0  # records the run made that no box had taken into its outbox when the run ended


def run_live(
    scenario: Scenario,
    *,
    host: str,
    port: int,
    passwords: dict[str, str],
    state_dir: Path,
    speed: float,
    network: Network | None = None,
    also: Any = None,
    stop: threading.Event | None = None,
    protocol: Literal["5", "3.1.1"] = "5",
    drain_timeout: float = 60.0,
    stats: LiveStats | None = None,
) -> LiveResult:
    """Run ``scenario`` paced at ``speed`` simulated seconds per wall second, publishing every box
    event through a firmware stub per box. ``stop`` ends the run early (then flushes as usual);
    ``stats``, if given, is updated as the run goes (for progress reports)."""
    network = network or network_for(scenario)
    missing = [b.id for b in network.boxes if b.id not in passwords]
    if missing:
        raise ValueError(f"no credentials for boxes {', '.join(missing[:5])}")
    env = simpy.rt.RealtimeEnvironment(factor=1.0 / speed, strict=False)
    start = scenario.simulation.start
    stats = stats if stats is not None else LiveStats(speed=speed)
    stats.speed = speed

    def clock_ms() -> int:
        return to_ms(start, env.now)

    # Every box's firmware on one loop (a handful of threads for all of them, docs/architecture.md).
    loop = BoxLoop("live", connectors=4).start()
    links = {b.id: BoxLink(b, passwords[b.id], host, port, state_dir, clock_ms, protocol, loop) for b in network.boxes}
    for link in links.values():
        link.start()
    sink = LiveSink(start, links, stats, also)
    world = World(env, scenario, network, sink)
    wall0 = time.monotonic()

    def pace_monitor() -> Any:
        while True:
            lag = (time.monotonic() - wall0) - env.now / speed
            stats.max_lag_s = max(stats.max_lag_s, lag)
            stats.simulated_s = env.now
            yield env.timeout(max(1.0, speed / 10))  # about ten checks per wall second

    env.process(pace_monitor())
    horizon = world.horizon
    step = max(1.0, speed / 5)
    while env.now < horizon and not (stop is not None and stop.is_set()):
        env.run(until=min(horizon, env.now + step))
    world.horizon = min(world.horizon, env.now)  # stopped early: summarise what was simulated
    world.finish()
    stats.simulated_s = env.now
    stats.wall_s = time.monotonic() - wall0
    stats.max_lag_s = max(stats.max_lag_s, stats.wall_s - env.now / speed)  # behind at the very end?
    drain0 = time.monotonic()
    # Every box at once, against one deadline: in turn, a dead broker would cost each box the timeout.
    deadline = drain0 + drain_timeout
    with ThreadPoolExecutor(max_workers=min(64, len(links)) or 1, thread_name_prefix="live-finish") as pool:
        left = sum(pool.map(lambda link: link.finish(deadline), links.values()))  # every box, even after a failure
    loop.stop()
    delivered = left == 0
    stats.drain_s = time.monotonic() - drain0
    errors = sum(link.errors for link in links.values())
    if errors:
        log.error("live: %d model events were refused by the contract", errors)
    not_handed = sum(link.not_handed for link in links.values())
    return LiveResult(
        summary=summarize(world),
        stats=stats,
        delivered=delivered and errors == 0 and not_handed == 0,
        left_in_outboxes=left,
        not_handed=not_handed,
    )
