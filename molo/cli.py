"""``molo``: one command line for everything a user runs.

molo demo        the main job: services, migrations, ingest, API and boxes publishing
molo migrate     apply the SQL migrations to MOLO_DATABASE_URL
molo ingest      run one ingest worker (several may run: they share the load)
molo api         serve the HTTP API
molo worker      run experiment jobs submitted over the API (a procrastinate worker)
molo provision   create broker credentials for N boxes
molo box         run one box's firmware stub as its own process
molo boxes       run N stand-in boxes against a broker
molo experiment  what-if experiments: run, status, report, compare (docs/experiments.md)
molo schemas     write the JSON Schemas of the wire contract
molo keys        create, list and revoke API keys (operator, courier of a carrier, researcher)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accounting.assumptions import WASTE_BASELINES
from accounting.method import GROUPS
from molo import experiments_cli, logs
from molo.cli_errors import Parser, at_least_zero, database_url, explain, fail, port, positive

#: Help of --no-progress (simulate, impact): the bar is on a terminal only, after two seconds.
NO_PROGRESS_HELP = "no progress bar (it shows on a terminal, once a simulation has run two seconds)"
DATABASE_URL_HELP = "PostgreSQL URL, postgresql://user@host:port/dbname (default MOLO_DATABASE_URL)"

if TYPE_CHECKING:
    from backend.settings import Settings


def _settings() -> Settings:
    from backend.settings import Settings

    return Settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    from backend.migrate import migrate

    settings = _settings()
    url = database_url(args.database_url, settings.database_url)
    report = migrate(url, settings.timescale)
    print(f"schema at version {report.current} ({report.flavour}); applied now: {report.applied or 'none'}")
    if args.register_boxes:
        from molo.registry import register_boxes
        from network import load_network

        try:
            network = load_network(settings.network_file)
        except (OSError, ValueError) as exc:
            print(f"molo migrate: cannot read the network file: {exc}", file=sys.stderr)
            return 2
        n = register_boxes(url, network.boxes)
        print(f"registered where {n} boxes stand (from {settings.network_file or 'the bundled Aalborg network'})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from backend.ingest.run import run_forever

    return run_forever(_settings(), retire=args.retire)


def cmd_api(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from molo.api_process import FACTORY, LOG_LEVEL_ENV

    settings = _settings()  # checked here, so a bad setting is one line, not a traceback per worker
    if settings.database_url is None:
        return fail("api", "the API needs a database: set MOLO_DATABASE_URL")
    os.environ[LOG_LEVEL_ENV] = args.log_level
    # Every process (one, or each of N) makes its app from the MOLO_* variables; uvicorn picks
    # uvloop and httptools (installed) and supervises the N, restarting one that dies.
    uvicorn.run(
        FACTORY,
        factory=True,
        workers=args.workers or settings.api_workers,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,  # live streams (SSE) never end by themselves
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from backend.experiments.worker import run_worker

    settings = _settings()
    if args.concurrency is not None:
        settings = settings.model_copy(update={"experiment_worker_concurrency": args.concurrency})
    return run_worker(settings)


def cmd_provision(args: argparse.Namespace) -> int:
    from molo.provision import DEFAULT_SERVICE_USERS, box_ids, provision

    ids = box_ids(args.boxes, prefix=args.prefix) + list(args.box_id or [])
    if not ids:
        print("molo provision: give --boxes N and/or --box-id ID", file=sys.stderr)
        return 2
    try:
        creds = provision(
            Path(args.out), ids, service_users=tuple(args.service or DEFAULT_SERVICE_USERS), existing=not args.rotate
        )
    except ValueError as exc:
        print(f"molo provision: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(creds.boxes)} boxes and {len(creds.services)} service users in {args.out}/credentials.json; "
        f"broker password file: {args.out}/passwd, ACL: {args.out}/acl"
    )
    return 0


def cmd_box(args: argparse.Namespace) -> int:
    from firmware_stub.cli import main as box_main

    return box_main(args.rest, prog="molo box")


def cmd_schemas(args: argparse.Namespace) -> int:
    from contract.messages import json_schemas

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in json_schemas().items():
            (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        return _unwritable("schemas", out, exc)
    print(f"wrote {len(json_schemas())} schemas to {out}")
    return 0


#: Boxes per ``molo boxes`` process: each holds about four open files (its socket and SQLite
#: files) and the soft limit here is often 20,000 with no way to raise the hard one.
BOXES_PER_PROCESS = 2000


def cmd_boxes(args: argparse.Namespace) -> int:
    import math
    import signal
    import threading
    import time

    from molo.fleet import Fleet
    from molo.provision import Credentials, box_ids

    settings = _settings()
    creds = Credentials.load(Path(args.credentials))
    ids = box_ids(args.count, prefix=args.prefix)
    missing = [b for b in ids if b not in creds.boxes]
    if missing:
        print(f"molo boxes: {args.credentials} has no password for {', '.join(missing[:5])}", file=sys.stderr)
        return 2
    if not settings.mqtt_host:
        print("molo boxes: set MOLO_MQTT_HOST (and MOLO_MQTT_PORT)", file=sys.stderr)
        return 2
    processes = args.processes or math.ceil(len(ids) / BOXES_PER_PROCESS)
    if args.part is None and processes > 1:
        return _boxes_in_processes(args, min(processes, len(ids)))
    if args.part is not None:
        index, parts = args.part
        ids = ids[index::parts]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fleet = Fleet(
        {b: creds.boxes[b] for b in ids},
        settings.mqtt_host,
        settings.mqtt_port,
        Path(args.state_dir),
        rate=args.rate,
        telemetry_interval=args.telemetry_interval,
    ).start()
    while not stop.is_set():  # poll: waiting on the Event the signal handler sets could deadlock
        time.sleep(0.2)
    fleet.stop()
    return 0


def _boxes_in_processes(args: argparse.Namespace, parts: int) -> int:
    """``molo boxes`` over ``parts`` child processes, each with every ``parts``-th box; SIGTERM and
    SIGINT are passed on, and the exit code is the worst of theirs."""
    import signal
    import subprocess

    base = [
        sys.executable,
        "-m",
        "molo.cli",
        "--log-level",
        args.log_level,
        "boxes",
        "--count",
        str(args.count),
        "--prefix",
        args.prefix,
        "--credentials",
        str(args.credentials),
        "--state-dir",
        str(args.state_dir),
        "--rate",
        str(args.rate),
        "--telemetry-interval",
        str(args.telemetry_interval),
    ]
    children = [subprocess.Popen([*base, "--part", f"{i}/{parts}"]) for i in range(parts)]  # noqa: S603 - ourselves

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def _part(text: str) -> tuple[int, int]:
    index, _, parts = text.partition("/")
    try:
        i, n = int(index), int(parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def cmd_simulate(args: argparse.Namespace) -> int:
    from molo.progress import day_bars
    from simulator.params import dump, resolve
    from simulator.run import run_batch, summary_json
    from simulator.trace import FileSink, ParquetSink

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"simulation.seed={args.seed}")
    if args.days is not None:
        overrides.append(f"simulation.days={args.days}")
    try:
        scenario = resolve(Path(args.scenario) if args.scenario else None, overrides)
    except ValueError as exc:
        print(f"molo simulate: invalid scenario: {exc}", file=sys.stderr)
        return 2
    if args.live:
        return _simulate_live(args, scenario)
    out = Path(args.out) if args.out else None
    sink = None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "params.json").write_text(dump(scenario))
            path = out / f"trace.{args.format}"
            sink = (ParquetSink if args.format == "parquet" else FileSink)(path, scenario.simulation.start)
        except OSError as exc:
            return _unwritable("simulate", out, exc)
    try:
        with day_bars(not args.no_progress) as bars:
            result = run_batch(scenario, sink, progress=bars())
    finally:
        if sink is not None:
            sink.close()
    text = summary_json(result.summary)
    if out is not None:
        (out / "summary.json").write_text(text)
    print(text, end="")
    print(
        f"# {result.records:,} records in {result.wall_seconds:.2f} s "
        f"({result.records / max(result.wall_seconds, 1e-9):,.0f}/s)" + (f"; results in {out}/" if out else ""),
        file=sys.stderr,
    )
    return 0


def cmd_impact(args: argparse.Namespace) -> int:
    """``molo impact``: avoided trips and CO2 of a simulated run, by the method the backend uses."""
    import json

    from pydantic import ValidationError

    from accounting import to_csv
    from molo.progress import day_bars
    from simulator.impact import method_for, report_text, run_impact, sensitivity, sensitivity_markdown
    from simulator.params import dump, first_error, resolve

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"simulation.seed={args.seed}")
    if args.days is not None:
        overrides.append(f"simulation.days={args.days}")
    method_sets = list(args.method_set or [])
    for flag, key in (("allocation", "allocation"), ("waste_baseline", "baseline.waste"),
                      ("parcel_baseline", "baseline.parcels")):  # fmt: skip
        if getattr(args, flag) is not None:
            method_sets.append(f'{key}="{getattr(args, flag)}"')
    if args.van_electric_share is not None:
        method_sets.append(f"van_electric_share={args.van_electric_share}")
    records = None
    if args.run is not None:
        if overrides or args.scenario:
            print("molo impact: --run takes the saved run's scenario: drop --scenario, --set, --seed, --days",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            scenario, records = _saved_run(Path(args.run))
        except ValueError as exc:
            print(f"molo impact: {exc}", file=sys.stderr)
            return 2
        args.no_counterfactual = True  # the counterfactual is a second simulation, not in the saved run
    try:
        if records is None:
            scenario = resolve(Path(args.scenario) if args.scenario else None, overrides)
        method = method_for(scenario, method_sets)
    except ValidationError as exc:  # the method's (the scenario's errors are ScenarioError, one line)
        return fail("impact", f"invalid method parameter: --method-set {first_error(exc)}")
    except ValueError as exc:
        return fail("impact", f"invalid parameters: {exc}")
    if records is not None and args.sensitivity:
        records = list(records)
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "params.json").write_text(dump(scenario))
        except OSError as exc:
            return _unwritable("impact", out, exc)
    if args.sensitivity:
        with day_bars(not args.no_progress) as bars:
            rows = sensitivity(scenario, method, records=records, progress=bars("scenario"))
        table = sensitivity_markdown(rows)
        print(f"Avoided t CO2e (well-to-wheel) of scenario {scenario.name}, seed {scenario.simulation.seed}, "
              f"{scenario.simulation.days:g} days, by baseline, allocation and electric van share:\n")  # fmt: skip
        print(table, end="")
        if out is not None:
            (out / "sensitivity.json").write_text(json.dumps(rows, indent=2) + "\n")
            (out / "sensitivity.md").write_text(table)
        return 0
    with day_bars(not args.no_progress) as bars:
        result = run_impact(scenario, method, group_by=tuple(args.group_by or ["box"]),
                            counterfactual=not args.no_counterfactual, records=records, progress=bars)  # fmt: skip
    print(report_text(result), end="")
    if out is not None:
        (out / "impact.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        (out / "impact.csv").write_text(to_csv(result))
        print(f"# results in {out}/ (impact.json, impact.csv, params.json)", file=sys.stderr)
    return 0


def _unwritable(command: str, out: Path, exc: OSError) -> int:
    """One line for an --out folder that cannot be written (exit code 2)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    print(f"molo {command}: cannot write results to --out {out}: {exc.strerror or exc}{where}", file=sys.stderr)
    return 2


def _saved_run(run: Path) -> tuple[Any, Any]:
    """The scenario and the trace records of a ``molo simulate --out RUN`` folder."""
    from simulator.params import Scenario
    from simulator.trace import read_trace

    params = run / "params.json"
    if not params.is_file():
        raise ValueError(f"{run} is not a saved run: no params.json (write one with `molo simulate --out {run}`)")
    traces = [run / f"trace.{fmt}" for fmt in ("parquet", "csv", "jsonl") if (run / f"trace.{fmt}").is_file()]
    if not traces:
        raise ValueError(f"{run} has no trace.parquet, trace.csv or trace.jsonl")
    try:
        scenario = Scenario.model_validate_json(params.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{params}: not the parameters of a run ({exc})") from None
    return scenario, read_trace(traces[0])


def _simulate_live(args: argparse.Namespace, scenario: Any) -> int:
    """``molo simulate --live``: the scenario's boxes publish to MOLO_MQTT_HOST until done or stopped."""
    import signal
    import threading
    import time

    from molo.provision import Credentials
    from simulator.live import LiveStats, run_live
    from simulator.run import network_for, summary_json

    settings = _settings()
    if not settings.mqtt_host or not args.credentials:
        print(
            "molo simulate --live: set MOLO_MQTT_HOST and pass --credentials (from `molo provision`)", file=sys.stderr
        )
        return 2
    network = network_for(scenario)
    passwords = Credentials.load(Path(args.credentials)).boxes
    missing = [b.id for b in network.boxes if b.id not in passwords]
    if missing:
        print(f"molo simulate --live: no credentials for {', '.join(missing[:5])}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stats = LiveStats(speed=args.speed)
    results: list[Any] = []
    runner = threading.Thread(
        target=lambda: results.append(
            run_live(
                scenario,
                host=settings.mqtt_host or "",
                port=settings.mqtt_port,
                passwords=passwords,
                state_dir=Path(args.state_dir),
                speed=args.speed,
                network=network,
                stop=stop,
                stats=stats,
            )
        ),
        daemon=True,
    )
    runner.start()
    while runner.is_alive():  # poll: the signal handlers set ``stop`` on this thread
        time.sleep(0.2)
    if not results:
        return 1
    print(summary_json(results[0].summary), end="")
    print(
        f"# live: {stats.events:,} box events, max lag {stats.max_lag_s:.2f} s, delivered: {results[0].delivered}",
        file=sys.stderr,
    )
    return 0 if results[0].delivered else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from molo.demo import run_demo

    return run_demo(
        boxes=args.boxes,
        duration_s=args.duration,
        api_port=args.port,
        speed=args.speed,
        var_dir=Path(args.var),
        broker_kind=args.broker,
        scenario_path=Path(args.scenario) if args.scenario else None,
        overrides=args.set,
        verbose=args.verbose,
    )


def cmd_keys(args: argparse.Namespace) -> int:
    import psycopg

    from backend.access.keys import Role, create_key, list_keys, revoke_key

    url = database_url(args.database_url, _settings().database_url)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        if args.keys_command == "create":
            try:
                key = create_key(conn, role=Role(args.role), name=args.name, carrier=args.carrier)
            except ValueError as exc:
                print(f"molo keys create: {exc}", file=sys.stderr)
                return 2
            bound = f" for carrier {key.carrier}" if key.carrier else ""
            print(f"created {key.role.value} key {key.key_id} ({key.name}){bound}", file=sys.stderr)
            print("the secret is shown only now; send it as the X-API-Key header:", file=sys.stderr)
            print(key.token)
            return 0
        if args.keys_command == "list":
            for info in list_keys(conn, include_revoked=args.all):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                print(
                    f"{info.key_id}  {info.role.value:<10}  {info.carrier or '-':<10}  {state:<24}  "
                    f"created {info.created_at:%Y-%m-%d %H:%M}  {info.name}"
                )
            return 0
        if revoke_key(conn, args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"molo keys revoke: no active key {args.key_id!r} (`molo keys list` shows the keys)", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="molo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much the services log (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on embedded defaults")
    p.add_argument(
        "--boxes", type=at_least_zero, default=0, help="only the first N boxes of the network (default 0: all 50)"
    )
    p.add_argument(
        "--speed",
        type=positive(float),
        default=3600.0,
        help="simulated seconds per wall second (default 3600: an hour a second)",
    )
    p.add_argument("--scenario", default=None, help="scenario TOML (default: the bundled Aalborg one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario parameter")
    p.add_argument(
        "--duration", type=positive(float), default=None, help="stop after this many seconds (default: Ctrl-C)"
    )
    p.add_argument("--port", type=port, default=8000, help="API port (default 8000; 0 picks a free one)")
    p.add_argument("--var", default="var", help="where embedded services keep their data (default ./var)")
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="broker to start when MOLO_MQTT_HOST is unset (auto: Mosquitto if installed)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also log the services' start-up, every box's connection and the simulated outages",
    )
    p.set_defaults(func=cmd_demo)

    experiments_cli.add_parser(sub)

    p = sub.add_parser("simulate", help="run a what-if simulation in batch (simulated time)")
    p.add_argument("--scenario", default=None, help="scenario TOML (default: the bundled Aalborg one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="master random seed (default: the scenario's, 1)")
    p.add_argument("--days", type=float, default=None, help="simulated days (default: the scenario's, 365)")
    p.add_argument("--out", default=None, help="directory for params.json, summary.json and the trace")
    p.add_argument(
        "--format", choices=["csv", "jsonl", "parquet"], default="csv", help="trace file format (default csv)"
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="run paced against the wall clock, every box a firmware stub publishing to MOLO_MQTT_HOST",
    )
    p.add_argument(
        "--speed", type=positive(float), default=3600.0, help="with --live: simulated seconds per wall second"
    )
    p.add_argument("--credentials", default=None, help="with --live: credentials.json from `molo provision`")
    p.add_argument("--state-dir", default="var/boxes", help="with --live: where the boxes keep their outboxes")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("impact", help="avoided trips and CO2 of a simulated run (docs/methodology.md)")
    p.add_argument("--scenario", default=None, help="scenario TOML (default: the bundled Aalborg one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario parameter")
    p.add_argument("--seed", type=int, default=None, help="master random seed (default: the scenario's, 1)")
    p.add_argument("--days", type=float, default=None, help="simulated days (default: the scenario's, 365)")
    p.add_argument("--method-set", action="append", metavar="KEY=VALUE", help="override a method parameter")
    p.add_argument(
        "--allocation",
        choices=["load_distance", "marginal"],
        default=None,
        help="how a shared van trip's km are split (default load_distance)",
    )
    p.add_argument(
        "--waste-baseline",
        choices=WASTE_BASELINES,
        default=None,
        help="hazardous waste without the boxes (default resident_trips)",
    )
    p.add_argument(
        "--parcel-baseline",
        choices=["home_delivery", "parcel_shop"],
        default=None,
        help="parcels without the boxes (default home_delivery)",
    )
    p.add_argument("--van-electric-share", type=float, default=None, help="electric share of van-km, 0..1")
    p.add_argument("--group-by", action="append", choices=GROUPS,
                   help="rows of impact.csv (repeatable; default box; mode adds walking and cycling rows)")  # fmt: skip
    p.add_argument("--no-counterfactual", action="store_true", help="skip the common-random-numbers run")
    p.add_argument("--sensitivity", action="store_true", help="avoided CO2 across baselines and e-van shares")
    p.add_argument(
        "--run",
        default=None,
        metavar="DIR",
        help="apply the method to a saved `molo simulate --out DIR` run (no simulation)",
    )
    p.add_argument("--out", default=None, help="directory for impact.json, impact.csv and params.json")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_impact)

    p = sub.add_parser("boxes", help="run N stand-in boxes against MOLO_MQTT_HOST")
    p.add_argument("--count", type=positive(int), default=50, help="boxes PREFIX-001 .. PREFIX-N (default 50)")
    p.add_argument("--prefix", default="aal", help="box id prefix (default aal)")
    p.add_argument("--credentials", required=True, help="credentials.json from `molo provision`")
    p.add_argument("--state-dir", default="var/boxes", help="where the boxes keep their outboxes (default var/boxes)")
    p.add_argument("--rate", type=positive(float), default=0.1, help="events per second per box (default 0.1)")
    p.add_argument(
        "--telemetry-interval",
        type=positive(float),
        default=15.0,
        help="seconds between each box's telemetry heartbeats (default 15)",
    )
    p.add_argument(
        "--processes",
        type=at_least_zero,
        default=0,
        help=f"processes to spread the boxes over (default 0: one per {BOXES_PER_PROCESS} boxes)",
    )
    p.add_argument("--part", type=_part, default=None, help=argparse.SUPPRESS)  # I/N: one child's share
    p.set_defaults(func=cmd_boxes)

    p = sub.add_parser("migrate", help="apply SQL migrations")
    p.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    p.add_argument(
        "--register-boxes",
        action="store_true",
        help="then register the boxes' names and positions from MOLO_NETWORK_FILE (default: the bundled network)",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("ingest", help="run one ingest worker (settings from MOLO_* variables)")
    p.add_argument(
        "--retire", action="store_true", help="drain this worker's share and end its broker session (when scaling down)"
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("api", help="serve the HTTP API")
    p.add_argument("--host", default=None, help="address to listen on (default MOLO_API_HOST, 127.0.0.1)")
    p.add_argument("--port", type=port, default=None, help="port to listen on (default MOLO_API_PORT, 8000)")
    p.add_argument(
        "--workers", type=positive(int), default=None, help="API processes on the port (default MOLO_API_WORKERS, 1)"
    )
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs CPU under load)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run experiment jobs submitted over the API (docs/experiments.md)")
    p.add_argument(
        "--concurrency",
        type=positive(int),
        default=None,
        help="jobs at once (default MOLO_EXPERIMENT_WORKER_CONCURRENCY)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("provision", help="create credentials for N boxes and the broker's password file")
    p.add_argument("--boxes", type=at_least_zero, default=0, help="provision PREFIX-001 .. PREFIX-N")
    p.add_argument("--prefix", default="aal", help="box id prefix (default aal)")
    p.add_argument("--box-id", action="append", help="an extra box id (repeatable), e.g. to add one box later")
    p.add_argument(
        "--service",
        action="append",
        help="service user ROLE or ROLE-<name> (roles ingest, api; repeatable; default: ingest ingest-1 ingest-2 api)",
    )
    p.add_argument("--rotate", action="store_true", help="new passwords for everyone (default: keep existing)")
    p.add_argument("--out", default="secrets", help="folder for credentials.json, passwd and acl (default secrets)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("box", help="run one box's firmware stub (see `molo box -- --help`)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_box)

    p = sub.add_parser("keys", help="create, list and revoke API keys")
    p.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    keys = p.add_subparsers(dest="keys_command", metavar="{create,list,revoke}", required=True)
    k = keys.add_parser("create", help="create a key and print its secret (once)")
    k.add_argument("--role", required=True, choices=["operator", "courier", "researcher"], help="what the key may do")
    k.add_argument("--carrier", default=None, help="courier keys: the one carrier the key acts for, e.g. gls")
    k.add_argument("--name", required=True, help='who or what uses it, e.g. "GLS van app"')
    k = keys.add_parser("list", help="list keys (never their secrets)")
    k.add_argument("--all", action="store_true", help="include revoked keys")
    k = keys.add_parser("revoke", help="revoke a key by its id")
    k.add_argument("key_id", help="the key's id, as `molo keys list` shows it")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("schemas", help="write JSON Schemas of the wire contract")
    p.add_argument("--out", default="docs/schemas", help="folder for the schema files (default docs/schemas)")
    p.set_defaults(func=cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "box":  # everything after `molo box` is the firmware stub's own
        rest = argv[argv.index("box") + 1 :]
        args.rest = rest[1:] if rest[:1] == ["--"] else rest
    elif extra:
        return fail(args.command, f"unrecognized arguments: {' '.join(extra)} (see `molo {args.command} --help`)")
    logs.setup(args.log_level)
    try:
        code: int = args.func(args)
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        return fail(args.command, message)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
