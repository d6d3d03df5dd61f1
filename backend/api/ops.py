"""Operational endpoints: liveness, readiness, and Prometheus metrics.

``/metrics`` reports ingest counters from the ``ingest_workers`` table, which workers update in the
same transaction as the rows they count: exact, and the same wherever the workers run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend.api import repository
from backend.api.auth import KeyCache
from backend.api.deps import ConnDep, SettingsDep
from backend.api.errors import error_body
from backend.api.schemas import Health, Readiness
from backend.migrate import discover

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: database reachable and schema current",
    responses={503: {"description": "`database_unavailable` or `schema_outdated`"}},
)
async def ready(conn: ConnDep) -> Readiness | JSONResponse:
    state = await repository.schema_state(conn)
    expected = len(discover())
    if state is None or state[0] < expected:
        have = 0 if state is None else state[0]
        return JSONResponse(
            error_body("schema_outdated", f"schema at version {have}, code needs {expected}; run `molo migrate`"),
            status_code=503,
        )
    return Readiness(status="ready", schema_version=state[0], flavour=state[1])


class _Snapshot(Collector):
    def __init__(self, snap: dict[str, list[dict[str, Any]]], heartbeat_timeout_s: float) -> None:
        self.snap = snap
        self.timeout = heartbeat_timeout_s

    def collect(self) -> list[Metric]:
        counters = {
            "messages": "Messages committed (any kind)",
            "events": "Events stored",
            "telemetry": "Telemetry readings stored",
            "statuses": "Status messages applied",
            "command_acks": "Command acknowledgements applied",
            "duplicates": "Redelivered or replayed events recognised and stored once",
            "dead_letters": "Messages dead-lettered",
            "batches": "Batches committed",
        }
        out: list[Metric] = []
        for key, doc in counters.items():
            fam = CounterMetricFamily(f"molo_ingest_{key}", doc, labels=["worker"])
            for w in self.snap["workers"]:
                fam.add_metric([w["worker_id"]], float(w[key]))
            out.append(fam)
        batch = GaugeMetricFamily("molo_ingest_batch_seconds_avg", "Mean batch commit time", labels=["worker"])
        last = GaugeMetricFamily("molo_ingest_last_batch_seconds", "Last batch commit time", labels=["worker"])
        lag = GaugeMetricFamily(
            "molo_ingest_lag_seconds", "Receive-to-commit time of the last batch", labels=["worker"]
        )
        age = GaugeMetricFamily(
            "molo_ingest_last_batch_age_seconds", "Seconds since the worker last committed", labels=["worker"]
        )
        now = datetime.now(UTC)
        for w in self.snap["workers"]:
            if w["batches"]:
                batch.add_metric([w["worker_id"]], w["batch_seconds_sum"] / w["batches"])
            if w["last_batch_seconds"] is not None:
                last.add_metric([w["worker_id"]], w["last_batch_seconds"])
            if w["last_lag_seconds"] is not None:
                lag.add_metric([w["worker_id"]], w["last_lag_seconds"])
            age.add_metric([w["worker_id"]], (now - w["updated_at"]).total_seconds())
        dead = GaugeMetricFamily("molo_dead_letters_stored", "Dead letters in storage by code", labels=["code"])
        for d in self.snap["dead_letters"]:
            dead.add_metric([d["error_code"]], float(d["n"]))
        boxes = GaugeMetricFamily("molo_boxes", "Boxes by live status", labels=["status"])
        online = sum(
            1
            for b in self.snap["boxes"]
            if b["status_online"]
            and b["last_received_at"] is not None
            and (now - b["last_received_at"]).total_seconds() <= self.timeout
        )
        boxes.add_metric(["online"], float(online))
        boxes.add_metric(["offline"], float(len(self.snap["boxes"]) - online))
        return [*out, batch, last, lag, age, dead, boxes]


class _KeyCacheStats(Collector):
    """This API process's key cache: lookups answered from it and those that went to the database."""

    def __init__(self, cache: KeyCache | None) -> None:
        self.cache = cache

    def collect(self) -> list[Metric]:
        lookups = CounterMetricFamily(
            "molo_api_key_lookups",
            "API key lookups of this API process, by where the answer came from",
            labels=["source"],
        )
        if self.cache is not None:
            lookups.add_metric(["cache"], float(self.cache.hits))
            lookups.add_metric(["database"], float(self.cache.misses))
        return [lookups]


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, conn: ConnDep, settings: SettingsDep) -> Response:
    registry = CollectorRegistry()
    registry.register(_Snapshot(await repository.metrics_snapshot(conn), settings.heartbeat_timeout_s))
    registry.register(_KeyCacheStats(getattr(request.app.state, "key_cache", None)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
