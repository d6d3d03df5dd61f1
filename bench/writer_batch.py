"""The ingest writer alone: validate + stage by COPY + insert only new (box, seq) + state + counters.

Method (printed with the results): a fresh database on the local PostgreSQL (or
MOLO_BENCH_DATABASE_URL as admin URL), migrated on the plain path. ``--batches`` batches of
``--batch`` pre-encoded contract events from 100 boxes, as the MQTT side would hand them over, go
through ``BatchWriter.write`` (one transaction each); no broker is involved. Baseline in the same
process: one COPY of the same number of rows into a table of the same shape and key. The ratio says
how much of the raw write rate the exactly-once ingest keeps.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg

from backend.ingest.mqtt import Received
from backend.ingest.writer import BatchWriter
from backend.migrate import migrate
from backend.settings import TimescaleMode
from bench.ingest_throughput import copy_baseline
from contract import MessageKind, SizeClass, encode, make_event, topic_for
from contract.messages import ParcelDeposited
from molo.postgres import create_database, drop_database

T0_MS = 1_767_225_600_000


def make_batch(start: int, size: int) -> list[Received]:
    out = []
    for i in range(start, start + size):
        box, seq = f"box-{i % 100:03d}", i // 100 + 1
        raw = encode(
            make_event(
                box_id=box,
                seq=seq,
                session=1,
                ts_ms=T0_MS + i,
                payload=ParcelDeposited(compartment=3, size_class=SizeClass.A, parcel_id=f"P{i}", carrier="gls"),
            )
        )
        out.append(Received(1, i, 1, topic_for(box, MessageKind.EVENTS), raw, time.time()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    admin = os.environ.get("MOLO_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = create_database(admin, "molo_bench_writer")
    try:
        migrate(url, TimescaleMode.OFF)
        total = args.batch * args.batches
        batches = [make_batch(k * args.batch, args.batch) for k in range(args.batches + 1)]
        with psycopg.connect(url, autocommit=True) as conn:
            writer = BatchWriter(conn, "bench")
            writer.write(batches[0])  # warm-up: partitions, caches, plans
            t0 = time.perf_counter()
            for batch in batches[1:]:
                result = writer.write(batch)
                assert result.events == len(batch), result
            seconds = time.perf_counter() - t0
            replay_t0 = time.perf_counter()
            dup = writer.write(batches[1])  # a replayed batch: every row already stored
            replay_s = time.perf_counter() - replay_t0
        copy_rate = copy_baseline(url, total)
        rate = total / seconds
        print(
            f"writer: {total:,} events in {args.batches} batches of {args.batch} (100 boxes), one transaction "
            f"each, no broker"
        )
        print(f"BatchWriter.write       : {rate:10,.0f} events/s ({seconds / total * 1e6:.1f} us/event)")
        print(
            f"replayed batch          : {len(batches[1]) / replay_s:10,.0f} events/s, stored {dup.events}, "
            f"duplicates {dup.duplicates}"
        )
        print(f"raw COPY, same process  : {copy_rate:10,.0f} rows/s")
        print(f"ratio writer / COPY     : {rate / copy_rate:10.3f}")
        return 0 if dup.events == 0 and dup.duplicates == len(batches[1]) else 1
    finally:
        drop_database(url, admin)


if __name__ == "__main__":
    raise SystemExit(main())
