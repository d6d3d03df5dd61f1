"""A bound on request bodies: 413 ``payload_too_large`` for any body over ``MOLO_API_MAX_BODY_BYTES``.

A pure ASGI middleware (no ``BaseHTTPMiddleware``, which would buffer), outside everything else of
the app but the server-error handler:

- a request whose ``Content-Length`` exceeds the limit is answered at once, before the app (routing,
  authentication, the database) sees it and without a single ``receive()``: the body is never read.
  uvicorn sends ``100 Continue`` only on the first ``receive()``, so a client that asked
  ``Expect: 100-continue`` (curl does for large bodies) gets the 413 without sending the body at all;
- a body without a length (``Transfer-Encoding: chunked``) is counted as it arrives: the chunk that
  passes the limit is not handed to the app, the app's own answer to the cut-off body is dropped, and
  the client gets the same 413. The app never holds more than the limit of one request's body.

Both answers carry ``Connection: close``: the rest of the body is unread, so the connection cannot
carry another request. FastAPI/Starlette's own ``max_body_size`` is not used: it lets the app run until
the first read, and answers in plain text rather than the API's error shape (backend/api/errors.py).
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.errors import error_body

log = logging.getLogger(__name__)

#: The default limit: 1 MiB. The largest legitimate bodies (a courier's route of at most 100 stops,
#: a reservation, a command) are a few KiB, so this leaves a wide margin and still bounds memory.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class _BodyTooLargeError(Exception):
    """Raised from the app's ``receive()`` when the body passes the limit (caught below)."""


class BodyLimit:
    """Refuse request bodies over ``max_body_bytes`` with 413 and code ``payload_too_large``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:  # the server's HTTP parser refuses these before we run
                    declared = None
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, f"the request body of {declared} bytes")
            return
        if not chunked and not declared:
            await self.app(scope, receive, send)  # no body: nothing to count (e.g. the live stream)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_bytes
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}  # the app asks again after our refusal: it is over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused and not started:
                return  # the app's answer to a body it never got whole (FastAPI makes it a 400): dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused or started:
                raise
            # Whatever the app made of the cut-off body (our _BodyTooLargeError or its own wrapping of it)
            # is moot: the answer is the 413 below.
        if refused:
            if started:  # a response begun before the body ended cannot become a 413
                log.warning("request body over %d bytes after the response started; cut off", limit)
                return
            await self._refuse(send, f"the request body (more than {limit} bytes so far)")

    async def _refuse(self, send: Send, what: str) -> None:
        limit = self.max_body_bytes
        body = json.dumps(
            error_body(
                "payload_too_large",
                f"{what} exceeds the limit of {limit} bytes",
                {"max_body_bytes": limit},
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
