"""A fleet of stand-in boxes: thousands of firmware stubs in one process, driven by a random schedule.

Used by ``molo demo`` and ``molo boxes`` until the simulator drives the boxes. Each box is a real
:class:`firmware_stub.box.BoxFirmware` -- its own MQTT connection and credentials, its own persistent
outbox, the same delivery code as a single box -- but the boxes share one
:class:`firmware_stub.loop.BoxLoop` (a dozen threads for the whole fleet, not three per box) and one
scheduler thread runs every box's :class:`~firmware_stub.demo.DemoDriver`. A box then costs its
socket, its SQLite file and a few hundred kB of Python objects.
"""

from __future__ import annotations

import heapq
import logging
import random
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from firmware_stub.box import BoxFirmware
from firmware_stub.demo import DemoDriver
from firmware_stub.errors import FirmwareError
from firmware_stub.loop import BoxLoop

log = logging.getLogger(__name__)


@dataclass
class Fleet:
    boxes: dict[str, str]  # box id -> password
    host: str
    port: int
    state_dir: Path
    rate: float = 0.5
    telemetry_interval: float = 15.0
    seed: int = 2026
    protocol: Literal["5", "3.1.1"] = "5"
    #: MQTT keepalive of each box: 60 s, as boxes in the field use, so a busy process with thousands
    #: of boxes is not declared lost for a ping that was a few seconds late.
    keepalive: int = 60
    #: Each box's reconnect backoff: the ceiling of the first retry and the largest ceiling, in
    #: seconds (full jitter below it). Five thousand boxes that lost the broker together then come
    #: back spread over the first retries instead of all in the same second.
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    #: Connection attempts under way at once (each blocks its thread until the broker answers).
    connectors: int = 8
    firmware: list[BoxFirmware] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _loop: BoxLoop | None = None
    _drivers: list[DemoDriver] = field(default_factory=list)
    _scheduler: threading.Thread | None = None

    def start(self) -> Fleet:
        raise_fd_limit()
        rng = random.Random(self.seed)
        self._loop = BoxLoop("fleet", connectors=self.connectors, logger=log).start()
        for box_id, password in sorted(self.boxes.items()):
            box = BoxFirmware(
                box_id,
                password,
                self.host,
                self.port,
                self.state_dir / box_id,
                rng=random.Random(rng.random()),
                protocol=self.protocol,
                keepalive=self.keepalive,
                reconnect_min_delay=self.reconnect_min_delay,
                reconnect_max_delay=self.reconnect_max_delay,
                # A stand-in fleet shares one disk: an fsync per event per box would make the disk,
                # not the boxes, the limit. NORMAL (WAL) still survives a crash of this process.
                synchronous="NORMAL",
                logger=logging.getLogger(f"box.{box_id}"),
                loop=self._loop,
            )
            box.start()
            self.firmware.append(box)
            self._drivers.append(
                DemoDriver(
                    box,
                    random.Random(rng.random()),
                    rate=self.rate,
                    telemetry_interval=self.telemetry_interval,
                    logger=logging.getLogger(f"box.{box_id}.demo"),
                )
            )
        # The first heartbeats spread over one interval (at most 5 s), not all in the same instant.
        spread = min(self.telemetry_interval, 5.0)
        first = [(time.monotonic() + rng.uniform(0.0, spread), i) for i in range(len(self._drivers))]
        self._scheduler = threading.Thread(target=self._schedule, args=(first,), name="fleet-demo", daemon=True)
        self._scheduler.start()
        return self

    def _schedule(self, due: list[tuple[float, int]]) -> None:
        """Every box's demo driver from one thread: the next due first."""
        heapq.heapify(due)
        while due and not self._stop.is_set():
            when, i = due[0]
            now = time.monotonic()
            if when > now:
                self._stop.wait(when - now)
                continue
            heapq.heappop(due)
            try:
                heapq.heappush(due, (self._drivers[i].tick(now), i))
            except FirmwareError as exc:  # the box was stopped: it leaves the schedule
                log.debug("fleet: %s leaves the schedule: %s", self.firmware[i].box_id, exc)
            except Exception:
                log.exception("fleet: %s: demo step failed; next try in 1 s", self.firmware[i].box_id)
                heapq.heappush(due, (now + 1.0, i))

    def connected(self) -> int:
        return sum(1 for box in self.firmware if box.connected)

    def pending(self) -> int:
        return sum(max(box.pending_count, 0) for box in self.firmware)

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop the schedule, let outboxes drain briefly, then shut every box down, and the loop."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(5)
        # In parallel: each stop waits for its offline status's PUBACK, so thousands of boxes in turn
        # would take minutes. The flush budget is shared, not per box.
        each = flush_timeout / max(len(self.firmware), 1)
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="fleet-stop") as pool:
            list(pool.map(lambda box: box.stop(flush_timeout=each), self.firmware))
        if self._loop is not None:
            self._loop.stop()


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (each box holds about eight:
    its socket, two wake-up socket pairs and its SQLite files); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
            return soft
        return target
    return soft
