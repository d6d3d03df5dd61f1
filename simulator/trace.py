"""Sinks for the model's records: in memory, CSV, JSON lines, or just counted.

A record is ``(t, box_id, kind, data)`` with ``t`` in simulated seconds. Files are written
deterministically (sorted keys, fixed separators, timestamps in integer milliseconds), so the same
scenario and seed give byte-identical files.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

Record = tuple[float, str | None, str, dict[str, Any]]


def to_ms(start: datetime, t: float) -> int:
    """Device time in epoch milliseconds of simulated second ``t``."""
    return int(start.timestamp() * 1000) + round(t * 1000)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclass
class MemorySink:
    """Keeps every record in a list (tests, small runs)."""

    records: list[Record] = field(default_factory=list)

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self.records.append((t, box_id, kind, data))


@dataclass
class CountingSink:
    """Counts records by kind and keeps nothing else (benchmarks, long studies)."""

    counts: Counter[str] = field(default_factory=Counter)

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self.counts[kind] += 1


class FileSink:
    """Writes records as CSV (``ts_ms,t_s,box_id,kind,data``) or JSON lines, by the file's suffix."""

    def __init__(self, path: Path, start: datetime) -> None:
        self.path = path
        self.start = start
        self._fh: IO[str] = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._fh, lineterminator="\n") if path.suffix == ".csv" else None
        if self._csv is not None:
            self._csv.writerow(["ts_ms", "t_s", "box_id", "kind", "data"])

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        ts = to_ms(self.start, t)
        if self._csv is not None:
            self._csv.writerow([ts, f"{t:.3f}", box_id or "", kind, _json(data)])
        else:
            self._fh.write(_json({"ts_ms": ts, "t_s": round(t, 3), "box_id": box_id, "kind": kind, "data": data}))
            self._fh.write("\n")

    def close(self) -> None:
        self._fh.close()


@dataclass
class TeeSink:
    """Passes every record to several sinks."""

    sinks: list[Any]

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.record(t, box_id, kind, data)
