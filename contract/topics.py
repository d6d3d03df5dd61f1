"""The MQTT topic layout, versioned under ``molo/v1``.

One box owns everything under ``molo/v1/boxes/{box_id}/``; its MQTT username is its box id, and the
broker's pattern ACL (``broker_config/acl``) keeps it there. Directions:

===========================================  =========  ======================  ========
topic                                        direction  content                 flags
===========================================  =========  ======================  ========
``molo/v1/boxes/{box_id}/events``            box -> in  :class:`BoxEvent`       QoS 1
``molo/v1/boxes/{box_id}/telemetry``         box -> in  :class:`BoxEvent`       QoS 1
``molo/v1/boxes/{box_id}/status``            box -> in  :class:`Status`         QoS 1, retained, Last Will
``molo/v1/boxes/{box_id}/commands``          in -> box  :class:`Command`        QoS 1
``molo/v1/boxes/{box_id}/commands/ack``      box -> in  :class:`CommandAck`     QoS 1
``molo/v1/boxes/{box_id}/receipts``          in -> box  :class:`Receipt`        QoS 0
===========================================  =========  ======================  ========
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from contract.errors import ContractError, ErrorCode

ROOT = "molo/v1/boxes"
BOX_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,31}$"
_BOX_ID_RE = re.compile(BOX_ID_PATTERN)
INGEST_SHARE_GROUP = "molo-ingest"


class MessageKind(StrEnum):
    """The last part(s) of a box topic."""

    EVENTS = "events"
    TELEMETRY = "telemetry"
    STATUS = "status"
    COMMANDS = "commands"
    COMMAND_ACK = "commands/ack"
    #: The ingest's receipts: which of the box's messages are stored (contract/receipts.py).
    RECEIPTS = "receipts"


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What a topic says: whose it is and what kind of message it carries."""

    box_id: str
    kind: MessageKind


def is_valid_box_id(box_id: str) -> bool:
    """True when ``box_id`` is usable as an MQTT username and a single topic level."""
    return _BOX_ID_RE.match(box_id) is not None


def topic_for(box_id: str, kind: MessageKind) -> str:
    """The topic on which box ``box_id`` sends or receives ``kind``."""
    if not is_valid_box_id(box_id):
        raise ValueError(f"invalid box id {box_id!r}: must match {BOX_ID_PATTERN}")
    return f"{ROOT}/{box_id}/{kind.value}"


def subscription(kind: MessageKind, *, shared_group: str | None = None) -> str:
    """The wildcard subscription for ``kind`` from all boxes, optionally as a shared subscription."""
    topic = f"{ROOT}/+/{kind.value}"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


_KINDS = {kind.value: kind for kind in MessageKind}


def parse_topic(topic: str) -> TopicInfo:
    """Split a box topic into box id and kind; :class:`ContractError` for anything else."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise ContractError(ErrorCode.UNKNOWN_TOPIC, f"topic {topic!r} is not under {ROOT}/")
    box_id, _, rest = topic[len(prefix) :].partition("/")
    kind = _KINDS.get(rest)
    if kind is None or not is_valid_box_id(box_id):
        raise ContractError(ErrorCode.UNKNOWN_TOPIC, f"topic {topic!r} is not a box topic")
    return TopicInfo(box_id=box_id, kind=kind)
