"""Starting an MQTT broker for the main job and the tests.

Where this sits in a message's journey (docs: /work/shared/DESIGN.md): every message goes
box -> broker -> ingest, and this module starts the broker in the middle when nothing else runs
one. :func:`start_mosquitto` runs a real Mosquitto with the project's own ``broker_config``
(authentication, ACL, persistence, limits), changed only where a local run must differ from
docker-compose -- see :func:`local_config`. :func:`start_amqtt` is a development-only fallback
for machines without Mosquitto: an in-process Python broker, anonymous, MQTT 3.1.1 only, no ACL,
no shared subscriptions, no persistence.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from molo.provision import Credentials, write_acl, write_passwd

__all__ = [
    "BROKER_CONFIG_DIR",
    "AmqttBroker",
    "Broker",
    "BrokerStartError",
    "RunningBroker",
    "find_mosquitto",
    "free_port",
    "local_config",
    "mosquitto_available",
    "start_amqtt",
    "start_mosquitto",
]

#: The production broker configuration (mosquitto.conf, acl) in the repository.
BROKER_CONFIG_DIR = Path(__file__).resolve().parent.parent / "broker_config"
_HOST = "127.0.0.1"
_DEFAULT_BINARY = "/usr/sbin/mosquitto"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_INSTALL_HINT = "install it with `apt-get install mosquitto`, or set MOLO_MOSQUITTO_BIN"


class BrokerStartError(RuntimeError):
    """The broker did not start or did not accept connections in time."""


class Broker(Protocol):
    """What callers need from any running broker."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def stop(self) -> None: ...


def find_mosquitto(binary: str | None = None) -> str | None:
    """The Mosquitto binary: ``binary``, else $MOLO_MOSQUITTO_BIN, else PATH, else /usr/sbin."""
    for candidate in (binary, os.environ.get("MOLO_MOSQUITTO_BIN")):
        if candidate:
            return candidate
    found = shutil.which("mosquitto")
    if found:
        return found
    return _DEFAULT_BINARY if os.access(_DEFAULT_BINARY, os.X_OK) else None


def mosquitto_available(binary: str | None = None) -> bool:
    """True when a Mosquitto binary can be found and executed."""
    found = find_mosquitto(binary)
    return found is not None and os.access(found, os.X_OK)


def free_port(host: str = _HOST) -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_config(production: str, workdir: Path, port: int, host: str = _HOST, tls_port: int | None = None) -> str:
    """Turn the production mosquitto.conf into one for a local broker in ``workdir``.

    Only three things change: the /mosquitto/config/ and /mosquitto/data/ paths point into
    ``workdir``; the plain listener binds ``host:port`` instead of 1883 on all interfaces; and
    the TLS listener (from ``listener 8883`` to the end of the file) is dropped, since a local
    run has no certificates. When run as root, a ``user`` line keeps Mosquitto from switching to
    the ``mosquitto`` user, which could not read ``workdir``.

    With ``tls_port``, the TLS listener is kept instead, on ``host:tls_port``, reading its
    certificates from ``workdir/certs/`` (used by the TLS test).
    """
    out: list[str] = []
    for original in production.splitlines():
        words = original.split()
        if words[:2] == ["listener", "8883"] and tls_port is None:
            break
        line = original
        if words[:2] == ["listener", "1883"]:
            line = f"listener {port} {host}"
        elif words[:2] == ["listener", "8883"]:
            line = f"listener {tls_port} {host}"
        out.append(line.replace("/mosquitto/config/", f"{workdir}/").replace("/mosquitto/data/", f"{workdir}/data/"))
    if os.geteuid() == 0:
        out += ["# local run as root: stay root", f"user {pwd.getpwuid(os.geteuid()).pw_name}"]
    return "\n".join(out) + "\n"


class RunningBroker:
    """A Mosquitto process started by :func:`start_mosquitto`; stop it with :meth:`stop`."""

    tls_port: int | None = None

    def __init__(self, binary: str, workdir: Path, port: int, host: str = _HOST) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = host
        self.port = port
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.data_dir = workdir / "data"
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RunningBroker {self.host}:{self.port} {state} workdir={self.workdir}>"

    @property
    def pid(self) -> int | None:
        """Process id while started, else None."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        """True while the Mosquitto process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Start Mosquitto and wait until it accepts TCP connections."""
        if self.is_running:
            raise BrokerStartError(f"broker on port {self.port} is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our binary, our config, no shell
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own session: a Ctrl-C in the terminal goes to the terminal's process group, and
                # the broker must outlive the boxes flushing their outboxes through it; its owner stops it.
                start_new_session=True,
            )
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._process is not None:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise BrokerStartError(
                    f"mosquitto exited with code {code} before accepting connections on "
                    f"{self.host}:{self.port}; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop cleanly (SIGTERM: Mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): only what it had autosaved survives a restart."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def write_auth(self, credentials: Credentials) -> None:
        """Write ``passwd`` and ``acl`` (rendered from broker_config/acl) for ``credentials``."""
        write_passwd(self.workdir / "passwd", credentials.users())
        write_acl(self.workdir / "acl", credentials.services)

    def reload(self, credentials: Credentials, timeout: float = _START_TIMEOUT_S) -> None:
        """Rewrite ``passwd`` and ``acl`` for ``credentials`` and make the running broker read them
        (SIGHUP, as ``docker compose kill -s HUP mosquitto``), keeping every connection."""
        self.write_auth(credentials)
        process = self._process
        if process is None or process.poll() is not None:
            return
        before = self.log_path.read_bytes().count(b"Reloading config")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_path.read_bytes().count(b"Reloading config") <= before:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"mosquitto did not reload within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def restart(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Stop if running, then start again on the same port with the same persistence dir."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the broker's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_mosquitto(
    workdir: Path,
    credentials: Credentials,
    *,
    port: int | None = None,
    binary: str | None = None,
    tls_certs: Path | None = None,
) -> RunningBroker:
    """Start Mosquitto with the project's broker_config, accepting ``credentials``, on 127.0.0.1.

    ``workdir`` receives mosquitto.conf (rewritten by :func:`local_config`), acl, passwd (hashed
    from ``credentials``), data/ (persistence) and mosquitto.log. ``port`` defaults to a free one.
    Raises :class:`BrokerStartError` if no binary is found or the broker does not come up.
    """
    found = find_mosquitto(binary)
    if found is None or not os.access(found, os.X_OK):
        raise BrokerStartError(f"no Mosquitto binary found ({found or 'not on PATH'}): {_INSTALL_HINT}")
    workdir = workdir.resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    production = (BROKER_CONFIG_DIR / "mosquitto.conf").read_text(encoding="utf-8")
    tls_port = None
    if tls_certs is not None:  # keep the TLS listener, with these ca.crt, server.crt and server.key
        tls_port = free_port()
        shutil.copytree(tls_certs, workdir / "certs", dirs_exist_ok=True)
    config = local_config(production, workdir, port, tls_port=tls_port)
    (workdir / "mosquitto.conf").write_text(config, encoding="utf-8")
    broker = RunningBroker(found, workdir, port)
    broker.write_auth(credentials)
    broker.tls_port = tls_port
    broker.start()
    return broker


class AmqttBroker:
    """An in-process amqtt broker on a background thread. Development only (see module doc)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._broker: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"amqtt-{port}", daemon=True)

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Start the event loop thread and the broker's listener on it."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            future.result(timeout)
        except BaseException as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            raise BrokerStartError(f"amqtt broker did not start on {self.host}:{self.port}: {exc!r}") from exc

    async def _start(self) -> None:
        # Imported here: amqtt is only needed (and only loaded) when the fallback is used.
        from amqtt.broker import Broker as _AmqttBroker  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = _AmqttBroker(config)
        await self._broker.start()

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Shut the broker down and end its thread."""
        if not self._thread.is_alive():
            return
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_amqtt(*, port: int | None = None, host: str = _HOST) -> AmqttBroker:
    """Start the development-only amqtt broker: anonymous, MQTT 3.1.1, no ACL or persistence.

    Clients must connect with MQTT 3.1.1 and subscribe without ``$share/`` (amqtt has no shared
    subscriptions). Never use it where auth, ACL or delivery guarantees matter.
    """
    broker = AmqttBroker(host, port if port is not None else free_port(host))
    broker.start()
    return broker
