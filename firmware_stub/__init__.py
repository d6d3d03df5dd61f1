"""The reference firmware of one MoLo Hubs box, in Python.

Where it sits in a message's journey (see ``shared/DESIGN.md``): second from the top. The simulator
(or a person at a real box) makes things happen; this package turns them into contract messages,
keeps them in a persistent outbox until the broker has them, and speaks MQTT as a real box would:
per-box credentials, QoS 1, a retained birth and Last Will ordered by a session counter, replay in
order after an outage, commands executed at most once.

Modules, smallest first: :mod:`.errors` (one root exception with a reason code), :mod:`.db` (the
SQLite file), :mod:`.outbox`, :mod:`.state` (doors and red boxes), :mod:`.commands` (what a command
does, and the journal), :mod:`.backoff`, :mod:`.box` (:class:`BoxFirmware`, tying them together),
:mod:`.demo` and :mod:`.cli` (run one box as its own process: ``python -m firmware_stub``).
"""

from firmware_stub.backoff import Backoff
from firmware_stub.box import FIRMWARE_VERSION, BoxFirmware, FirmwareStats, wall_clock_ms
from firmware_stub.errors import (
    BrokerRefusedError,
    FirmwareError,
    FirmwareStateError,
    OutboxClosedError,
    UnknownCompartmentError,
)
from firmware_stub.outbox import Outbox, OutboxRow
from firmware_stub.state import BoxState, CompartmentState

__all__ = [
    "FIRMWARE_VERSION",
    "Backoff",
    "BoxFirmware",
    "BoxState",
    "BrokerRefusedError",
    "CompartmentState",
    "FirmwareError",
    "FirmwareStateError",
    "FirmwareStats",
    "Outbox",
    "OutboxClosedError",
    "OutboxRow",
    "UnknownCompartmentError",
    "wall_clock_ms",
]
