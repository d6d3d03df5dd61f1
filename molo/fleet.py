"""A fleet of stand-in boxes: one firmware stub per box, driven by a simple random schedule.

Used by ``molo demo`` and ``molo boxes`` until the simulator drives the boxes. Each box is a real
:class:`firmware_stub.box.BoxFirmware` (own MQTT connection and credentials, persistent outbox).
"""

from __future__ import annotations

import logging
import random
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from firmware_stub.box import BoxFirmware
from firmware_stub.demo import DemoDriver

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
    #: MQTT keepalive of each box: 60 s, as boxes in the field use, so a busy process with a thousand
    #: boxes is not declared lost for a ping that was a few seconds late.
    keepalive: int = 60
    firmware: list[BoxFirmware] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Fleet:
        raise_fd_limit()
        rng = random.Random(self.seed)
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
                # A stand-in fleet shares one disk: an fsync per event per box would make the disk,
                # not the boxes, the limit. NORMAL (WAL) still survives a crash of this process.
                synchronous="NORMAL",
                logger=logging.getLogger(f"box.{box_id}"),
            )
            box.start()
            driver = DemoDriver(
                box,
                random.Random(rng.random()),
                rate=self.rate,
                telemetry_interval=self.telemetry_interval,
                logger=logging.getLogger(f"box.{box_id}.demo"),
            )
            thread = threading.Thread(target=driver.run, args=(self._stop,), name=f"demo-{box_id}", daemon=True)
            thread.start()
            self.firmware.append(box)
            self._threads.append(thread)
        return self

    def connected(self) -> int:
        return sum(1 for box in self.firmware if box.connected)

    def pending(self) -> int:
        return sum(max(box.pending_count, 0) for box in self.firmware)

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop the schedules, let outboxes drain briefly, then shut every box down in order."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        # In parallel: each stop waits for its offline status's PUBACK, so a thousand boxes in turn
        # would take minutes. The flush budget is shared, not per box.
        each = flush_timeout / max(len(self.firmware), 1)
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="fleet-stop") as pool:
            list(pool.map(lambda box: box.stop(flush_timeout=each), self.firmware))


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
