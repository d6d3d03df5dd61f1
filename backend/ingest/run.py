"""Building and running an ingest worker from :class:`~backend.settings.Settings`."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from prometheus_client import start_http_server

from backend.ingest.mqtt import IngestMqtt
from backend.ingest.worker import IngestWorker
from backend.operations.alerts import AlertRules
from backend.settings import Settings

log = logging.getLogger(__name__)


def build_worker(
    settings: Settings,
    *,
    database_url: str | None = None,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    password: str | None = None,
) -> IngestWorker:
    """An ingest worker for ``settings``; keyword arguments override (the main job passes the
    services it started itself)."""
    url = database_url or settings.database_url
    host = mqtt_host or settings.mqtt_host
    if url is None or host is None:
        raise ValueError("ingest needs MOLO_DATABASE_URL and MOLO_MQTT_HOST")
    client = IngestMqtt(
        host=host,
        port=mqtt_port or settings.mqtt_port,
        username=settings.mqtt_username,
        password=password if password is not None else settings.mqtt_secret(),
        # The broker makes every client id its username (use_username_as_clientid): the session is
        # the user's. Saying so here too keeps it the same on a broker without that setting.
        client_id=settings.mqtt_username,
        session_expiry_s=settings.ingest_session_expiry_s,
        receive_maximum=settings.ingest_receive_maximum,
        use_tls=settings.mqtt_tls,
        protocol=settings.mqtt_protocol,
        shared=settings.ingest_shared,
        tls_ca_file=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
    )
    return IngestWorker(
        database_url=url,
        mqtt=client,
        worker_id=settings.worker_id,
        batch_max=settings.ingest_batch_max,
        batch_wait_s=settings.ingest_batch_wait_ms / 1000,
        alert_rules=AlertRules.from_settings(settings),
        monitor_interval_s=settings.monitor_interval_s,
    )


def run_forever(settings: Settings, *, retire: bool = False) -> int:
    """Run one worker until SIGINT/SIGTERM (``molo ingest``); with ``retire``, drain and leave."""
    worker = build_worker(settings)
    if settings.ingest_metrics_port:
        start_http_server(settings.ingest_metrics_port, registry=worker.registry)
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    worker.start()
    log.info("ingest worker %s started", settings.worker_id)
    if retire:
        worker.mqtt.subscribed.wait(30)
        if not worker.retire():
            return 1
        log.info("ingest worker %s retired: session ended", settings.worker_id)
        return 0
    while not stop.is_set():  # poll: waiting on the Event the signal handler sets could deadlock
        time.sleep(0.2)
    log.info("ingest worker %s stopping", settings.worker_id)
    worker.stop()
    return 0
