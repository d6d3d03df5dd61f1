"""The TLS listener of broker_config, with certificates made by the exact commands its README gives.

Boxes in the field connect over TLS on 8883. This starts Mosquitto with the production TLS listener
kept (on a free port), so the listener settings and the documented certificate recipe are both tested,
and the reference firmware's own certificate check: boxes box-089 .. box-091.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contract import MessageKind, SizeClass, topic_for
from contract.messages import ParcelDeposited
from firmware_stub.box import BoxFirmware
from molo.brokers import RunningBroker, start_mosquitto
from molo.provision import Credentials
from tests.fixtures.broker import (
    client_state,
    close,
    new_client,
    next_message,
    publish,
    service_client,
    subscribe,
)

README = Path(__file__).parent.parent / "broker_config" / "README.md"


def readme_recipe() -> str:
    """The shell block of broker_config/README.md that makes the CA and the server certificate."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if "openssl req -x509" in block)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[RunningBroker]:
    """Mosquitto with the TLS listener on, certificates from the README recipe."""
    bash = shutil.which("bash")
    if shutil.which("openssl") is None or bash is None:
        pytest.fail("bash and openssl are needed to make the test certificates", pytrace=False)
    work = tmp_path_factory.mktemp("tls")
    subprocess.run([bash, "-euo", "pipefail", "-c", readme_recipe()], cwd=work, check=True, capture_output=True)
    broker = start_mosquitto(work / "broker", credentials, tls_certs=work / "certs")
    try:
        yield broker
    finally:
        broker.stop()


def tls_client(broker: RunningBroker, box: str, password: str, ca: Path | None) -> mqtt.Client:
    client = new_client()
    client.username_pw_set(box, password)
    client.tls_set(ca_certs=str(ca) if ca else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def test_box_connects_and_publishes_over_tls(tls_broker: RunningBroker, credentials: Credentials) -> None:
    """A box trusting the project CA connects to the TLS listener (hostname checked) and publishes QoS 1."""
    assert tls_broker.tls_port is not None
    ca = tls_broker.workdir / "certs" / "ca.crt"
    client = tls_client(tls_broker, "box-001", credentials.boxes["box-001"], ca)
    client.connect(tls_broker.host, tls_broker.tls_port)
    client.loop_start()
    try:
        assert client_state(client).connected.wait(10)
        connack = client_state(client).connack
        assert connack is not None
        assert not connack.is_failure
        assert not publish(client, topic_for("box-001", MessageKind.EVENTS), b"{}").is_failure
        assert isinstance(client.socket(), ssl.SSLSocket)
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()


def test_untrusted_server_certificate_is_refused(tls_broker: RunningBroker) -> None:
    """A client that trusts only the system CAs refuses the broker's certificate; with the project CA the
    same handshake succeeds and the hostname (the certificate's subjectAltName) matches."""
    assert tls_broker.tls_port is not None
    address = (tls_broker.host, tls_broker.tls_port)
    system_only = ssl.create_default_context()
    with socket.create_connection(address, timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
        system_only.wrap_socket(raw, server_hostname=tls_broker.host).close()
    project = ssl.create_default_context(cafile=str(tls_broker.workdir / "certs" / "ca.crt"))
    with (
        socket.create_connection(address, timeout=10) as raw,
        project.wrap_socket(raw, server_hostname=tls_broker.host) as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}


def test_tls_listener_still_requires_credentials(tls_broker: RunningBroker) -> None:
    """TLS does not replace authentication: an anonymous client over TLS is refused (CONNACK 135)."""
    assert tls_broker.tls_port is not None
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    refused: list[object] = []
    client.on_connect = lambda c, u, f, rc, p: refused.append(rc)
    client.tls_set(ca_certs=str(tls_broker.workdir / "certs" / "ca.crt"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.connect(tls_broker.host, tls_broker.tls_port)
    client.loop_start()
    try:
        deadline_ok = client_state_wait(refused)
        assert deadline_ok
        assert getattr(refused[0], "value", None) == 135
    finally:
        client.loop_stop()
        client._reset_sockets()


def client_state_wait(box: list[object], timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not box and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(box)


# --- the box's side: the reference firmware over TLS ------------------------------------------


@pytest.fixture(scope="module")
def wrong_name_broker(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[RunningBroker]:
    """Mosquitto with a certificate from the same recipe whose only name is mqtt.molo.example: a box
    dialling 127.0.0.1 meets a certificate that does not name that host."""
    bash = shutil.which("bash")
    assert bash is not None
    work = tmp_path_factory.mktemp("tls-wrong-name")
    recipe = readme_recipe().replace(",DNS:localhost,IP:127.0.0.1", "")
    assert recipe != readme_recipe()
    subprocess.run([bash, "-euo", "pipefail", "-c", recipe], cwd=work, check=True, capture_output=True)
    broker = start_mosquitto(work / "broker", credentials, tls_certs=work / "certs")
    try:
        yield broker
    finally:
        broker.stop()


def tls_box(broker: RunningBroker, credentials: Credentials, box_id: str, ca: Path, state: Path) -> BoxFirmware:
    assert broker.tls_port is not None
    box = BoxFirmware(
        box_id,
        credentials.boxes[box_id],
        broker.host,
        broker.tls_port,
        state / box_id,
        tls_ca_file=ca,
        confirm="puback",
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.2,
    )
    box.start()
    return box


def connected_as(broker: RunningBroker, box_id: str) -> bool:
    return f"as {box_id} (" in broker.log_path.read_text(encoding="utf-8", errors="replace")


def test_firmware_connects_over_tls_with_the_project_ca(
    tls_broker: RunningBroker, credentials: Credentials, tmp_path: Path
) -> None:
    """The reference firmware, given the project CA, comes online over the TLS listener and its events
    are acknowledged there."""
    listener = service_client(tls_broker, credentials)  # on the plain listener of the same broker
    assert not subscribe(listener, topic_for("box-089", MessageKind.EVENTS)).is_failure
    box = tls_box(tls_broker, credentials, "box-089", tls_broker.workdir / "certs" / "ca.crt", tmp_path)
    try:
        assert box.wait_connected(10)
        box.emit(ParcelDeposited(compartment=5, size_class=SizeClass.A, parcel_id="P-tls-1", carrier="gls"))
        message = next_message(listener)
        assert message is not None
        assert b"P-tls-1" in message.payload
        assert box.flush(10)
        assert box.stats.delivered == 1
    finally:
        box.kill()
        close(listener)


#: paho leaves the SSL socket of a failed handshake to the garbage collector (it is closed, with a
#: ResourceWarning, when the failed reconnect's frame is freed): not a leak, but -W error would fail.
PAHO_FAILED_HANDSHAKE = pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")


@PAHO_FAILED_HANDSHAKE
def test_firmware_refuses_a_broker_its_ca_did_not_sign(
    tls_broker: RunningBroker,
    wrong_name_broker: RunningBroker,
    credentials: Credentials,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A box trusting another CA (here the other broker's) never completes the handshake: no CONNECT
    reaches the broker and the failure is logged as a certificate error."""
    other_ca = wrong_name_broker.workdir / "certs" / "ca.crt"
    box = tls_box(tls_broker, credentials, "box-090", other_ca, tmp_path)
    try:
        assert not box.wait_connected(2)
    finally:
        box.kill()
    assert not connected_as(tls_broker, "box-090")
    assert "certificate verify failed" in caplog.text


@PAHO_FAILED_HANDSHAKE
def test_firmware_refuses_a_certificate_for_another_host_name(
    wrong_name_broker: RunningBroker, credentials: Credentials, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A box dialling 127.0.0.1 refuses a certificate signed by its own CA that names only
    mqtt.molo.example: hostname checking is on."""
    box = tls_box(wrong_name_broker, credentials, "box-091", wrong_name_broker.workdir / "certs" / "ca.crt", tmp_path)
    try:
        assert not box.wait_connected(2)
    finally:
        box.kill()
    assert not connected_as(wrong_name_broker, "box-091")
    assert "certificate verify failed" in caplog.text
    assert "match" in caplog.text  # "Hostname mismatch" / "IP address mismatch"
