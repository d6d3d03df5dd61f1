"""Run one box as its own process: ``python -m firmware_stub --box-id aal-001 ...``.

Where it sits in a message's journey (see ``shared/DESIGN.md``): at the top, standing in for a box
on a street in Aalborg. It starts :class:`~firmware_stub.box.BoxFirmware` against a broker, sends a
telemetry heartbeat, optionally makes up plausible traffic (``--demo-rate``), answers commands, and
on SIGINT/SIGTERM stops gracefully (offline status, DISCONNECT; unsent events stay in the outbox
under ``--state-dir`` for the next start). :func:`main` takes ``argv`` so the project's ``molo``
command can delegate to it.

Exit codes: 0 after a clean stop, 2 for bad arguments or missing credentials, 3 if the broker
refused the box's credentials.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from contract.topics import BOX_ID_PATTERN, is_valid_box_id
from firmware_stub.box import BoxFirmware
from firmware_stub.demo import DemoDriver
from firmware_stub.errors import BrokerRefusedError

__all__ = ["build_parser", "load_password", "main"]

PASSWORD_ENV = "MOLO_BOX_PASSWORD"  # noqa: S105 - the variable's name, not a password
_log = logging.getLogger("firmware_stub.cli")


class _Parser(argparse.ArgumentParser):
    """One-line errors on stderr and exit code 2, like every ``molo`` command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(prog: str = "python -m firmware_stub") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Run the reference firmware of one MoLo Hubs box against an MQTT broker.")
    parser.add_argument("--box-id", required=True, help=f"the box id and MQTT username ({BOX_ID_PATTERN})")
    parser.add_argument(
        "--credentials",
        type=Path,
        help=f"credentials.json from provisioning (else the password is read from ${PASSWORD_ENV})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="directory for the box's outbox and counters (default var/boxes/<box-id>)",
    )
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=30.0,
        help="seconds between telemetry readings; 0 turns telemetry off (default 30)",
    )
    parser.add_argument(
        "--demo-rate",
        type=float,
        default=0.0,
        help="make up parcel and waste events at this many per second (Poisson); 0 = none (default)",
    )
    parser.add_argument("--seed", type=int, help="seed for the demo events and reconnect jitter")
    parser.add_argument("--keepalive", type=int, default=10, help="MQTT keepalive in seconds (default 10)")
    parser.add_argument(
        "--flush-timeout",
        type=float,
        default=5.0,
        help="on shutdown, wait this long for unsent events to be committed by the ingest (default 5)",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="connect over TLS, trusting only this CA file (the broker's certificate must name --host)",
    )
    parser.add_argument(
        "--confirm",
        choices=("receipt", "puback"),
        default="receipt",
        help="delete an event from the outbox on the ingest's receipt (default; nothing is lost if the "
        "broker crashes) or on the broker's PUBACK (a broker with no ingest behind it)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="how long to wait at start for the first connection before running offline (default 10)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def load_password(box_id: str, credentials: Path | None) -> str:
    """The box's password from ``credentials`` (``{"boxes": {id: password}}``) or ``$MOLO_BOX_PASSWORD``.

    Raises ``ValueError`` with a message fit for the user when there is none.
    """
    if credentials is None:
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise ValueError(f"no password: pass --credentials or set {PASSWORD_ENV}")
        return password
    try:
        data = json.loads(credentials.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read credentials {credentials}: {exc}") from exc
    boxes = data.get("boxes") if isinstance(data, dict) else None
    password = boxes.get(box_id) if isinstance(boxes, dict) else None
    if not isinstance(password, str) or not password:
        raise ValueError(f"{credentials} has no password for box {box_id!r} (provision it first)")
    return password


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside; restore the previous handlers after."""

    # The handler runs on the main thread between two bytecodes. It must not log (the main thread may
    # be inside a log call) and the main thread must never wait on ``stop`` itself: Event.wait holds
    # the Event's non-reentrant lock on entry and exit, and a set() from the handler at that moment
    # would deadlock. So the work runs in another thread and the main thread only polls is_set().
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller handles signals
            break
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None, prog: str = "python -m firmware_stub") -> int:
    """Run one box until SIGINT/SIGTERM; returns the process exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_valid_box_id(args.box_id):
        parser.error(f"invalid --box-id {args.box_id!r}: must match {BOX_ID_PATTERN}")
    if args.demo_rate < 0 or args.telemetry_interval < 0:
        parser.error("--demo-rate and --telemetry-interval must be >= 0")
    try:
        password = load_password(args.box_id, args.credentials)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    rng = random.Random(args.seed)
    box = BoxFirmware(
        args.box_id,
        password,
        args.host,
        args.port,
        args.state_dir or Path("var") / "boxes" / args.box_id,
        keepalive=args.keepalive,
        rng=random.Random(rng.random()),
        confirm=args.confirm,
        tls_ca_file=args.tls_ca,
    )
    stop = threading.Event()
    with _stop_on_signals(stop):
        box.start()
        try:
            deadline = time.monotonic() + args.connect_timeout
            while not stop.is_set() and time.monotonic() < deadline:
                if box.wait_connected(0.2):
                    break
            else:
                if not stop.is_set():
                    _log.warning(
                        "not connected after %.0f s; running offline, events wait in the outbox", args.connect_timeout
                    )
            driver = DemoDriver(box, rng, rate=args.demo_rate, telemetry_interval=args.telemetry_interval)
            worker = threading.Thread(target=driver.run, args=(stop,), name="demo-driver", daemon=True)
            worker.start()
            while worker.is_alive() and not stop.is_set():
                time.sleep(0.1)
            stop.set()
            worker.join(5)
            _log.info("stopping")
        except BrokerRefusedError as exc:
            _log.error("%s; check the credentials", exc)
            return 3
        finally:
            box.stop(flush_timeout=args.flush_timeout)
    return 0
