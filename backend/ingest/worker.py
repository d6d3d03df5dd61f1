"""One ingest worker: take a batch from the MQTT inbox, commit it, then acknowledge it to the broker.

The order is the guarantee: a message is PUBACKed only after the transaction holding its rows (or
its dead letter) has committed. If the process dies anywhere before that, the broker still holds the
message in the worker's persistent session and redelivers it; the writer's idempotent insert makes
the redelivery harmless. If the database is unreachable, the worker keeps the batch, retries with
backoff, and acknowledges nothing meanwhile (the broker queues the rest).

Between batches the worker also runs the monitor sweep (:mod:`backend.operations.monitor`: missed
heartbeats, parcels near expiry, command timeouts) every ``monitor_interval_s``; with several
workers an advisory lock lets one sweep at a time.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from backend.ingest.mqtt import IngestMqtt, Received
from backend.ingest.writer import BatchResult, BatchWriter, merge_results
from backend.operations.alerts import AlertEngine, AlertRules
from backend.operations.monitor import sweep

log = logging.getLogger(__name__)


class IngestMetrics:
    """Prometheus metrics of one worker process, served on ``MOLO_INGEST_METRICS_PORT``. Named
    ``molo_worker_*`` so they never clash with the API's ``molo_ingest_*`` (per-worker totals read from
    the database) when both are scraped."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter("molo_worker_messages", "Messages received and committed", ["kind"], registry=registry)
        self.duplicates = Counter(
            "molo_worker_duplicates", "Redelivered or replayed events stored once", registry=registry
        )
        self.dead_letters = Counter("molo_worker_dead_letters", "Messages dead-lettered", ["code"], registry=registry)
        self.batch_seconds = Histogram(
            "molo_worker_batch_seconds",
            "Time to validate and commit one batch",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.lag = Gauge(
            "molo_worker_lag_seconds",
            "Receive-to-commit time of the oldest message in the last batch",
            registry=registry,
        )
        self.db_errors = Counter(
            "molo_worker_database_errors", "Batches retried after a database error", registry=registry
        )
        self.alert_errors = Counter(
            "molo_worker_alert_errors", "Batches stored whose alert evaluation failed (logged)", registry=registry
        )

    def observe(self, r: BatchResult) -> None:
        for kind, n in (
            ("event", r.events),
            ("telemetry", r.telemetry),
            ("status", r.statuses),
            ("command_ack", r.command_acks),
        ):
            if n:
                self.messages.labels(kind).inc(n)
        if r.duplicates:
            self.duplicates.inc(r.duplicates)
        if r.alert_errors:
            self.alert_errors.inc(r.alert_errors)
        for code, n in r.dead_letter_codes.items():
            self.dead_letters.labels(code).inc(n)
        self.batch_seconds.observe(r.seconds)
        self.lag.set(r.lag_seconds)


class IngestWorker:
    """Runs the receive -> commit -> ack loop until stopped."""

    def __init__(
        self,
        *,
        database_url: str,
        mqtt: IngestMqtt,
        worker_id: str,
        batch_max: int = 2000,
        batch_wait_s: float = 0.05,
        registry: CollectorRegistry | None = None,
        alert_rules: AlertRules | None = None,
        monitor_interval_s: float = 5.0,
    ) -> None:
        self.database_url = database_url
        self.mqtt = mqtt
        self.worker_id = worker_id
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.alert_rules = alert_rules or AlertRules()
        self.monitor_interval_s = monitor_interval_s
        self._next_sweep = 0.0
        self.registry = registry or CollectorRegistry()
        self.metrics = IngestMetrics(self.registry)
        self.totals = BatchResult()
        self._stop = threading.Event()
        self._finished = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._writer: BatchWriter | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect to the broker and run the loop in a background thread."""
        self.mqtt.start()
        self._thread = threading.Thread(target=self.run, name=f"ingest-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then disconnect. The session stays with the broker, which keeps
        queueing this worker's share until it returns (with the same worker id). Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.mqtt.stop()
        if self._conn is not None:
            self._conn.close()

    def retire(self, quiet_s: float = 1.0, timeout: float = 60.0) -> bool:
        """Leave the worker pool for good: unsubscribe, commit and ack everything already assigned,
        then end the broker session so nothing more is queued for this worker id. Use when scaling
        down (`molo ingest --retire`); a plain stop leaves the share queued until the session expires.

        Returns False, and keeps the session (nothing is lost), if messages are still unacknowledged
        when ``timeout`` runs out, for instance because the database is down: retry later.
        """
        if self._finished:
            return True
        self.mqtt.unsubscribe_all()
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if not self.mqtt.inbox.empty() or self.mqtt.outstanding:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
            time.sleep(0.05)
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.mqtt.inbox.qsize() + self.mqtt.outstanding
        if left:
            log.error(
                "ingest: cannot retire %s: %d messages are not committed yet (database down?); "
                "the broker session is kept, nothing is lost; retry later",
                self.worker_id,
                left,
            )
            self.mqtt.stop()
        else:
            self.mqtt.end_session()
        if self._conn is not None:
            self._conn.close()
        return left == 0

    def run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._process(batch)
            if time.monotonic() >= self._next_sweep:
                self._sweep()

    def _sweep(self) -> None:
        """Run the monitor sweep; errors are logged and retried next interval, never fatal."""
        self._next_sweep = time.monotonic() + self.monitor_interval_s
        try:
            writer = self._connect()
            sweep(writer.conn, self.alert_rules)
        except Exception as exc:  # the ingest loop must outlive the sweep
            log.warning(
                "ingest: monitor sweep failed (%s: %s); retrying in %.0fs",
                type(exc).__name__,
                exc,
                self.monitor_interval_s,
            )
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and self._conn is not None:
                self._conn.close()
                self._writer = None

    # ------------------------------------------------------------------ internals

    def _next_batch(self) -> list[Received]:
        inbox = self.mqtt.inbox
        try:
            first = inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            try:
                batch.append(inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _connect(self) -> BatchWriter:
        if self._writer is None or self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.database_url, autocommit=True, application_name=f"molo-ingest-{self.worker_id}"
            )
            self._writer = BatchWriter(self._conn, self.worker_id, AlertEngine(self.alert_rules))
        return self._writer

    def _process(self, batch: list[Received]) -> None:
        attempt = 0
        while True:
            try:
                writer = self._connect()
                result = writer.write(batch)
                break
            except Exception as exc:  # the loop must outlive any error; nothing was acked
                self.metrics.db_errors.inc()
                attempt += 1
                delay = random.uniform(0, min(30.0, 0.5 * 2**attempt))
                if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                    log.error(
                        "ingest: database error (%s); retrying batch of %d in %.1fs, nothing acked",
                        exc,
                        len(batch),
                        delay,
                    )
                else:
                    log.exception(
                        "ingest: unexpected error; retrying batch of %d in %.1fs, nothing acked", len(batch), delay
                    )
                if self._conn is not None:
                    self._conn.close()
                self._writer = None
                if self._stop.wait(delay):
                    return  # shutting down: the broker redelivers the unacked batch later
        not_acked = sum(1 for m in batch if not self.mqtt.ack(m))
        # Only now may the boxes delete these rows from their outboxes: they are committed.
        self.mqtt.send_receipts(result.receipts)
        result.receipts = {}  # the totals keep counts, not every seq
        if not_acked:
            log.warning(
                "ingest: %d committed messages came on an older connection; the broker will "
                "redeliver them and they will be stored once",
                not_acked,
            )
        self.metrics.observe(result)
        merge_results(self.totals, result)
        try:
            writer.record_timing(result.seconds, result.lag_seconds)
        except psycopg.Error as exc:  # timing is best effort; the data is committed
            log.warning("ingest: could not record batch timing: %s", exc)
