"""Sinks for the model's records: in memory, CSV, JSON lines, Parquet, or just counted.

A record is ``(t, box_id, kind, data)`` with ``t`` in simulated seconds. Files are written
deterministically (sorted keys, fixed separators, timestamps in integer milliseconds), so the same
scenario and seed give byte-identical files. :func:`read_trace` reads any of the three formats back
(``molo impact --run DIR`` applies the CO2 method to a saved run without simulating it again).

Parquet (:class:`ParquetSink`) has typed columns instead of CSV's JSON ``data`` column: ``ts_ms``
(int64), ``t_s`` (float64), ``box_id`` and ``kind`` (dictionary-encoded strings), then one column per
field of the records' data (``compartment`` int64, ``weight_kg`` float64, ``carrier`` string, a van
round's ``boxes`` a list of strings, ...; null where a record has no such field).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
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


class ParquetSink:
    """Writes records to a Parquet file with typed columns (see the module doc).

    Records are collected in plain lists and turned into an Arrow table every ``chunk`` records
    (pyarrow infers the column types from the values, in C++), so the cost per record is four list
    appends and the Python objects do not pile up for the garbage collector to walk again and again.
    The chunks are unified into one schema (a field a chunk lacks is null there) and written at
    :meth:`close`.
    """

    def __init__(self, path: Path, start: datetime, *, chunk: int = 20_000) -> None:
        self.path = path
        self.start_ms = int(start.timestamp() * 1000)
        self.chunk = chunk
        self._t: list[float] = []
        self._box: list[str | None] = []
        self._kind: list[str] = []
        self._data: list[dict[str, Any]] = []
        self._tables: list[Any] = []

    def record(self, t: float, box_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self._t.append(t)
        self._box.append(box_id)
        self._kind.append(kind)
        self._data.append(data)
        if len(self._t) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        import numpy as np  # noqa: PLC0415 - only Parquet traces need these
        import pyarrow as pa  # noqa: PLC0415

        if not self._t:
            return
        t = np.asarray(self._t, dtype=np.float64)
        columns: dict[str, Any] = {
            "ts_ms": pa.array(self.start_ms + np.rint(t * 1000).astype(np.int64)),
            "t_s": pa.array(np.round(t, 3)),
            "box_id": pa.array(self._box, pa.string()),
            "kind": pa.array(self._kind, pa.string()),
        }
        data = pa.array(self._data)  # a struct array: one typed child per field, null where absent
        if pa.types.is_struct(data.type):
            for field, child in zip(data.type, data.flatten(), strict=True):
                columns[field.name] = child
        self._tables.append(pa.table(columns))
        self._t, self._box, self._kind, self._data = [], [], [], []

    def close(self) -> None:
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.compute as pc  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        self._flush()
        if not self._tables:
            table = pa.table({"ts_ms": pa.array([], pa.int64()), "t_s": pa.array([], pa.float64()),
                              "box_id": pa.array([], pa.string()), "kind": pa.array([], pa.string())})  # fmt: skip
        else:
            table = pa.concat_tables(self._tables, promote_options="permissive")
        fixed = ["ts_ms", "t_s", "box_id", "kind"]
        ordered = fixed + sorted(n for n in table.column_names if n not in fixed)
        table = table.select(ordered)
        for name in ("box_id", "kind"):
            table = table.set_column(table.schema.get_field_index(name), name, pc.dictionary_encode(table[name]))
        pq.write_table(table, self.path, compression="zstd")
        self._tables = []


def read_trace(path: Path) -> Iterator[Record]:
    """The records of a trace file written by :class:`FileSink` (CSV, JSON lines) or :class:`ParquetSink`."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        table = pq.read_table(path)
        fixed = ("ts_ms", "t_s", "box_id", "kind")
        names = [n for n in table.column_names if n not in fixed]
        lists = {name: table.column(name).to_pylist() for name in table.column_names}
        for i in range(table.num_rows):
            data = {name: lists[name][i] for name in names if lists[name][i] is not None}
            yield float(lists["t_s"][i]), lists["box_id"][i], lists["kind"][i], data
        return
    with path.open(encoding="utf-8", newline="") as fh:
        if path.suffix == ".csv":
            for row in csv.DictReader(fh):
                yield float(row["t_s"]), row["box_id"] or None, row["kind"], json.loads(row["data"])
        else:
            for line in fh:
                item = json.loads(line)
                yield float(item["t_s"]), item["box_id"], item["kind"], item["data"]
