"""The request body limit (backend/api/limits.py) over real HTTP against uvicorn: bodies up to
``MOLO_API_MAX_BODY_BYTES`` are processed, larger ones get 413 ``payload_too_large`` before they are
read (declared length) or as soon as they pass the limit (chunked), and the server's memory does not
grow by the bodies' size. No box ids: nothing here touches box rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from backend.api.app import create_app
from backend.api.limits import DEFAULT_MAX_BODY_BYTES
from backend.api.server import ApiServer
from backend.settings import Settings

LIMIT = DEFAULT_MAX_BODY_BYTES  # what the `api` fixture runs with (the settings' default)
MIB = 1024 * 1024
ROUTE = "/api/v1/courier/capacity/route"
ROUTE_BODY = json.dumps({"size_class": "A", "stops": [{"latitude": 57.048, "longitude": 9.919}]}).encode()
CHUNK = b" " * 65536  # JSON whitespace: padding that keeps a body valid


def padded(size: int) -> bytes:
    """A valid route-capacity request of exactly ``size`` bytes."""
    return ROUTE_BODY + b" " * (size - len(ROUTE_BODY))


def pieces(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """``body`` as an iterator, which httpx sends chunked (no Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def refusal(response: httpx.Response, limit: int = LIMIT) -> dict[str, Any]:
    assert response.status_code == 413, response.text
    assert response.headers["connection"] == "close"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["details"] == {"max_body_bytes": limit}
    return error


def raw_request(host: str, port: int, head: str, body_bytes: int = 0, chunked: bool = False) -> tuple[int, bytes]:
    """Send ``head`` and up to ``body_bytes`` of padding (stopping when the server stops reading),
    then read the whole answer. Returns (bytes of body sent, answer). The padding is one reused
    64 KiB chunk, so the client side holds no body in memory."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(head.encode())
        sent = 0
        try:
            while sent < body_bytes:
                sock.sendall(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) if chunked else CHUNK)
                sent += len(CHUNK)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while the body was still going out
            pass
        sock.settimeout(10)
        answer = b""
        try:
            while part := sock.recv(65536):
                answer += part
        except ConnectionResetError:
            pass
        return sent, answer


def head_for(path: str, *, length: int | None = None, extra: str = "") -> str:
    framing = f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nhost: molo\r\ncontent-type: application/json\r\n{framing}{extra}\r\n"


@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT])
def test_bodies_up_to_the_limit_are_processed(api: httpx.Client, size: int) -> None:
    """A route-capacity request padded to just under and exactly the limit is answered normally."""
    body = padded(size)
    assert len(body) == size
    response = api.post(ROUTE, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["fitting_sizes"] == ["A", "B", "C"]
    chunked = api.post(ROUTE, content=pieces(body), headers={"content-type": "application/json"})
    assert chunked.status_code == 200, chunked.text


@pytest.mark.parametrize("key", [True, False], ids=["with-key", "without-key"])
def test_a_body_one_byte_over_the_limit_gets_413(api: httpx.Client, key: bool) -> None:
    """One byte over the limit is refused with 413 payload_too_large, before authentication (so also
    without a key: not 401)."""
    headers = {"content-type": "application/json", **({} if key else {"X-API-Key": ""})}
    error = refusal(api.post(ROUTE, content=padded(LIMIT + 1), headers=headers))
    assert f"{LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes" in error["message"]


def test_a_declared_oversize_body_is_refused_before_it_is_sent(api: httpx.Client) -> None:
    """Content-Length over the limit with Expect: 100-continue: the 413 comes at once, with no
    100 Continue, while not one byte of the body has been sent (a server waiting to read it would time out)."""
    head = head_for(ROUTE, length=10 * MIB, extra="expect: 100-continue\r\n")
    _, answer = raw_request(api.base_url.host, api.base_url.port or 80, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "payload_too_large"


def test_a_chunked_body_over_the_limit_gets_413(api: httpx.Client) -> None:
    """A body without Content-Length is counted as it arrives and refused once it passes the limit."""
    error = refusal(api.post(ROUTE, content=pieces(padded(10 * MIB)), headers={"content-type": "application/json"}))
    assert f"more than {LIMIT} bytes" in error["message"]


@pytest.fixture
def sink(database_url: str) -> Iterator[tuple[str, list[int]]]:
    """The API with a 64 KiB limit and one extra route, ``POST /test/sink``, that reads its body as
    it streams in and records the running byte count: (base URL, counts seen by the route)."""
    app = create_app(Settings(database_url=database_url, api_max_body_bytes=64 * 1024))
    seen: list[int] = []

    @app.post("/test/sink")
    async def _sink(request: Request) -> dict[str, int]:
        seen.append(0)
        async for chunk in request.stream():
            seen[-1] += len(chunk)
        return {"received": seen[-1]}

    server = ApiServer(app).start()
    yield server.url, seen
    server.stop()


def test_the_app_never_receives_more_than_the_limit(sink: tuple[str, list[int]]) -> None:
    """The route behind the limit gets a body of exactly the limit whole, at most the limit of a larger
    chunked body, and is never called for a declared oversize body."""
    url, seen = sink
    limit = 64 * 1024
    ok = httpx.post(f"{url}/test/sink", content=pieces(b"x" * limit, 1000), timeout=10)
    assert ok.json() == {"received": limit}
    seen.clear()
    refusal(httpx.post(f"{url}/test/sink", content=pieces(b"x" * MIB, 1000), timeout=10), limit)
    assert len(seen) == 1
    # It read up to the limit, never past it (0 when the first piece that arrived was already over it).
    assert 0 <= seen[0] <= limit, seen
    seen.clear()
    refusal(httpx.post(f"{url}/test/sink", content=b"x" * (limit + 1), timeout=10), limit)
    assert seen == []  # declared too large: the app never ran


# --------------------------------------------------------------------------- memory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def api_process(database_url: str, tmp_path: Path) -> Iterator[Any]:
    """``start(limit)``: `molo api` in its own process (so its memory is the API's alone) with
    MOLO_API_MAX_BODY_BYTES=limit; returns (port, pid)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(limit: int) -> tuple[int, int]:
        port = free_port()
        env = {**os.environ, "MOLO_DATABASE_URL": database_url, "MOLO_API_MAX_BODY_BYTES": str(limit)}
        env.pop("MOLO_MQTT_HOST", None)
        log = (tmp_path / f"api-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", "api", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        deadline = time.monotonic() + 90  # a loaded machine starts it slowly
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return port, proc.pid
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"`molo api` did not come up: {(tmp_path / f'api-{port}.log').read_text()}")
            time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def peak_growth_mib(pid: int, port: int, *, chunked: bool) -> float:
    """Reset the process's peak RSS (VmHWM, via /proc/PID/clear_refs), send it four concurrent 10 MiB
    bodies, and return how far its peak rose above where it stood (MiB)."""

    def status_kib(field: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    time.sleep(0.3)  # let the process settle after the previous batch
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    head = head_for(ROUTE, length=None if chunked else 10 * MIB)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: raw_request("127.0.0.1", port, head, 10 * MIB, chunked), range(4)))
    assert all(a.startswith(b"HTTP/1.1 ") for _, a in answers), answers
    return (status_kib("VmHWM") - before) / 1024


def test_concurrent_oversize_bodies_do_not_grow_server_memory(api_process: Any) -> None:
    """Four concurrent 10 MiB bodies, declared and then chunked, raise the API process's peak RSS by
    well under their 40 MiB (the issue measured 74 -> 203 MB without a limit)."""
    port, pid = api_process(LIMIT)
    for chunked in (False, True):
        growth = peak_growth_mib(pid, port, chunked=chunked)
        assert growth < 16, f"peak RSS grew {growth:.1f} MiB (chunked={chunked})"


def test_the_memory_check_sees_bodies_a_higher_limit_lets_in(api_process: Any) -> None:
    """Control for the test above: with the limit raised to 64 MiB the same four declared bodies are
    read, and the peak RSS rises by more than their 40 MiB, so the probe can see the growth it rules out."""
    port, pid = api_process(64 * MIB)
    growth = peak_growth_mib(pid, port, chunked=False)
    assert growth > 40, f"peak RSS grew only {growth:.1f} MiB"
