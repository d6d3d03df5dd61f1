"""Serving the API from a background thread (the main job and the end-to-end tests use this)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


class ApiServer:
    """uvicorn in a daemon thread, bound before start so the port is known (``port=0`` picks one)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._app = app
        # Live streams never end by themselves: stop() ends them first (see there); this is the net.
        config = uvicorn.Config(app, log_config=None, lifespan="on", access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="api", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        # uvicorn waits for open responses before shutting down, and an SSE stream stays open: end
        # them first (the app's lifespan installs ``end_streams``, thread-safe).
        end_streams = getattr(self._app.state, "end_streams", None)
        if callable(end_streams):
            end_streams()
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
