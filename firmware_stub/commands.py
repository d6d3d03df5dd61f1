"""Commands from the backend: what each action does to the box, and the journal that makes each
``command_id`` run at most once.

Where it sits in a message's journey (see ``shared/DESIGN.md``): the way back. The backend
publishes a :class:`contract.messages.Command` on ``molo/v1/boxes/<id>/commands``; the firmware's
worker thread decodes it, looks its id up in the journal, runs :func:`execute` against the
:class:`~firmware_stub.state.BoxState`, emits the events the action caused (a door opened, a
compartment taken out of service) through the outbox, and publishes a
:class:`contract.messages.CommandAck` on ``.../commands/ack``.

At most once, even across a crash: the id is journalled as ``executing`` *before* the action runs
and as ``done`` with the exact ack bytes after. A repeat of a ``done`` id gets the stored ack again
(same bytes); an id found still ``executing`` -- the box died mid-action -- is answered ``failed``
and not run again, because the box cannot know whether the door opened.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from contract import CompartmentKind
from contract.messages import (
    Command,
    CommandAction,
    CommandResult,
    CompartmentFault,
    CompartmentRestored,
    DoorOpened,
    EventPayload,
    FaultKind,
)
from firmware_stub.db import DB_FILE, Synchronous, open_db
from firmware_stub.errors import OutboxClosedError
from firmware_stub.state import BoxState

__all__ = ["CommandJournal", "JournalEntry", "Outcome", "execute"]

#: The contract caps ``CommandAck.detail`` at 500 characters.
MAX_DETAIL = 500


@dataclass(frozen=True, slots=True)
class Outcome:
    """What executing a command did: the ack's result and detail, and the events to emit."""

    result: CommandResult
    detail: str | None = None
    events: list[EventPayload] = field(default_factory=list)


def clip_detail(text: str) -> str:
    """Make ``text`` fit the contract's ``detail`` field (no NUL, at most 500 characters)."""
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def execute(command: Command, state: BoxState) -> Outcome:
    """Carry out ``command`` on ``state`` and say what happened. No I/O.

    - ``open_compartment``: succeeds if the door exists and is in service (it opens, and a
      ``door.opened`` event follows unless it was already open); otherwise ``rejected``.
    - ``set_compartment_service``: takes a door out of service (``compartment.fault`` with
      ``out_of_service``) or puts it back (``compartment.restored``); no event if nothing changed.
    - ``set_maintenance``: sets the box-wide maintenance flag.
    - ``reserve_compartment``: holds an empty, in-service parcel door for a courier's reservation
      (it is offered for nothing else until released or a parcel goes in); ``rejected`` for a red-box
      door, an occupied door or one out of service; holding a held door again succeeds.
    - ``release_compartment``: ends the hold (succeeds also if there was none).
    - ``ping``: succeeds.
    """
    action = command.action
    if action is CommandAction.PING:
        return Outcome(CommandResult.SUCCEEDED, "pong")
    if action is CommandAction.SET_MAINTENANCE:
        enabled = bool(command.enabled)
        state.maintenance = enabled
        return Outcome(CommandResult.SUCCEEDED, f"maintenance {'on' if enabled else 'off'}")

    cid = command.compartment
    door = state.get(cid) if cid is not None else None
    if cid is None or door is None:
        return Outcome(CommandResult.REJECTED, f"box {command.box_id} has no compartment {cid}")

    if action is CommandAction.OPEN_COMPARTMENT:
        if not door.in_service:
            return Outcome(CommandResult.REJECTED, f"compartment {cid} is out of service")
        if door.door_open:
            return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} was already open")
        state.set_door(cid, True)
        return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} opened", [DoorOpened(compartment=cid)])

    if action is CommandAction.RESERVE_COMPARTMENT:
        if door.kind is not CompartmentKind.PARCEL:
            return Outcome(CommandResult.REJECTED, f"compartment {cid} is not a parcel door")
        if not door.in_service:
            return Outcome(CommandResult.REJECTED, f"compartment {cid} is out of service")
        if door.occupied:
            return Outcome(CommandResult.REJECTED, f"compartment {cid} is occupied")
        if door.reserved:
            return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} was already reserved")
        state.set_reserved(cid, True)
        return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} reserved")

    if action is CommandAction.RELEASE_COMPARTMENT:
        if not door.reserved:
            return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} was not reserved")
        state.set_reserved(cid, False)
        return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} released")

    if action is CommandAction.SET_COMPARTMENT_SERVICE:
        enabled = bool(command.enabled)
        if door.in_service == enabled:
            return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} was already {_service(enabled)}")
        state.set_in_service(cid, enabled)
        event: EventPayload = (
            CompartmentRestored(compartment=cid)
            if enabled
            else CompartmentFault(
                compartment=cid, fault=FaultKind.OUT_OF_SERVICE, detail="taken out of service by command"
            )
        )
        return Outcome(CommandResult.SUCCEEDED, f"compartment {cid} {_service(enabled)}", [event])

    return Outcome(CommandResult.REJECTED, f"action {action.value} is not supported by this firmware")


def _service(enabled: bool) -> str:
    return "in service" if enabled else "out of service"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A journalled command: ``ack`` is None while it is (or was, before a crash) executing."""

    command_id: UUID
    done: bool
    ack: bytes | None


class CommandJournal:
    """Which command ids this box has executed, and the ack each one got (in the box database).

    Only the newest ``max_entries`` ids are kept: the backend repeats a command within minutes,
    not after thousands of others.
    """

    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL", max_entries: int = 10_000) -> None:
        self.path = path / DB_FILE if path.is_dir() else path
        self.max_entries = max_entries
        self._synchronous: Synchronous = synchronous
        self._lock = threading.Lock()
        # Opened at the first command, not with the box: most boxes get few commands, and a fleet of
        # thousands in one process would otherwise hold a second connection (and its files) per box.
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _require(self) -> sqlite3.Connection:
        if self._closed:
            raise OutboxClosedError(f"command journal {self.path} is closed")
        if self._conn is None:
            self._conn = open_db(self.path, synchronous=self._synchronous)
        return self._conn

    def get(self, command_id: UUID) -> JournalEntry | None:
        """The journal entry for ``command_id``, if this box has seen it."""
        with self._lock:
            row = (
                self._require()
                .execute("SELECT state, ack FROM commands WHERE command_id = ?", (str(command_id),))
                .fetchone()
            )
        if row is None:
            return None
        state, ack = row
        return JournalEntry(command_id, state == "done", None if ack is None else bytes(ack))

    def begin(self, command_id: UUID) -> bool:
        """Record that ``command_id`` is about to run. False if it was already journalled."""
        with self._lock:
            conn = self._require()
            cur = conn.execute(
                "INSERT OR IGNORE INTO commands (command_id, state, ack, received) VALUES (?, 'executing', NULL, ?)",
                (str(command_id), time.time_ns() // 1_000_000),
            )
            return cur.rowcount == 1

    def finish(self, command_id: UUID, ack: bytes) -> None:
        """Record the ack ``command_id`` got (inserting the entry if :meth:`begin` was skipped)."""
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO commands (command_id, state, ack, received) VALUES (?, 'done', ?, ?)"
                    " ON CONFLICT (command_id) DO UPDATE SET state = 'done', ack = excluded.ack",
                    (str(command_id), ack, time.time_ns() // 1_000_000),
                )
                conn.execute(
                    "DELETE FROM commands WHERE rowid <= (SELECT max(rowid) FROM commands) - ?",
                    (self.max_entries,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._require().execute("SELECT count(*) FROM commands").fetchone()
        return int(count)
