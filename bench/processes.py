"""Child processes of the benches (and the tests that run ``molo`` commands as processes)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable

import httpx

__all__ = ["stop_processes", "wait_ready"]


def wait_ready(url: str, proc: subprocess.Popen[bytes], *, timeout: float = 60.0, path: str = "/ready") -> None:
    """Wait until the ``molo api`` at ``url`` answers ``path`` with 200; RuntimeError if ``proc`` exits
    first or ``timeout`` seconds pass (a loaded machine can take a while to import the app)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"molo api exited with {proc.returncode} before {url}{path} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"molo api at {url} did not answer {path} within {timeout:g} s")
        time.sleep(0.1)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM each process still running, then SIGKILL what has not exited within ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
