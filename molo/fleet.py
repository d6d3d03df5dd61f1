"""A fleet of stand-in boxes: one firmware stub per box, driven by a simple random schedule.

Used by ``molo demo`` and ``molo boxes`` until the simulator drives the boxes. Each box is a real
:class:`firmware_stub.box.BoxFirmware` (own MQTT connection and credentials, persistent outbox).
"""

from __future__ import annotations

import logging
import random
import threading
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
    firmware: list[BoxFirmware] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Fleet:
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
        for box in self.firmware:
            box.stop(flush_timeout=flush_timeout / max(len(self.firmware), 1))
