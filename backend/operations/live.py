"""The live feed across processes: PostgreSQL ``NOTIFY`` on one channel, relayed by the API as
server-sent events (``GET /api/v1/stream``).

Where it sits in a message's journey: at the end of a batch. The ingest writer (and the monitor
sweep, and the API when it sends a command or an operator acknowledges an alert) calls
:func:`notify` *inside its transaction*, so a notification is delivered exactly when, and only if,
the change it describes is committed. Every API process ``LISTEN``s on a dedicated connection
(``backend/api/stream.py``) and fans the notifications out to its SSE clients.

A notification is JSON ``{"event": <name>, "data": {...}}`` (under PostgreSQL's 8000-byte limit);
the event names and payloads are documented in docs/operations.md.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg

CHANNEL = "molo_live"


class LiveEvent(StrEnum):
    """The SSE event names."""

    BOX_STATUS = "box.status"
    ALERT_RAISED = "alert.raised"
    ALERT_CLEARED = "alert.cleared"
    ALERT_ACKNOWLEDGED = "alert.acknowledged"
    COMMAND_UPDATED = "command.updated"


def _default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a live notification")


def encode(event: LiveEvent, data: dict[str, Any]) -> str:
    """The notification text for ``event`` with ``data``."""
    return json.dumps({"event": event.value, "data": data}, default=_default, separators=(",", ":"))


def notify(conn: psycopg.Connection[Any], event: LiveEvent, data: dict[str, Any]) -> None:
    """Queue a notification in the current transaction (sent on COMMIT, dropped on ROLLBACK)."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode(event, data)))


def notify_many(conn: psycopg.Connection[Any], notifications: list[tuple[LiveEvent, dict[str, Any]]]) -> None:
    """:func:`notify` each of ``notifications`` in one statement, delivered in the order given."""
    if notifications:
        conn.execute(
            "SELECT pg_notify(%s, n) FROM unnest(%s::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i",
            (CHANNEL, [encode(event, data) for event, data in notifications]),
        )


def status_data(box_id: str, online: bool, reason: str, session: int | None, since: datetime | None) -> dict[str, Any]:
    """The payload of a ``box.status`` event."""
    return {"box_id": box_id, "online": online, "reason": reason, "session": session, "since": since}
