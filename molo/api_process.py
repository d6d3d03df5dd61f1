"""One API process as ``molo api`` starts it: uvicorn imports :func:`app` (``factory=True``), so with
``--workers N`` each of the N processes makes its own app (pool, live-stream listener, key cache,
command sender) from the ``MOLO_*`` variables."""

from __future__ import annotations

import os

from fastapi import FastAPI

from backend.api.app import create_app
from backend.settings import Settings
from molo import logs

#: ``molo api`` passes its ``--log-level`` to the worker processes in this variable.
LOG_LEVEL_ENV = "MOLO_LOG_LEVEL"
#: The import string uvicorn starts the processes with.
FACTORY = "molo.api_process:app"


def app() -> FastAPI:
    logs.setup(os.environ.get(LOG_LEVEL_ENV, "INFO"))
    return create_app(Settings())
