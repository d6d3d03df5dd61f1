"""Receipts: the ingest telling a box which of its messages are stored.

Where it sits in a message's journey: last hop back. A broker's PUBACK only says the broker took a
message; a broker that crashes before handing it on (Mosquitto saves its queues every
``autosave_interval``), or that had no subscriber for it, loses it. So a box keeps each event and
telemetry reading in its outbox until the ingest that committed it says so, on
``molo/v1/boxes/{box_id}/receipts`` (QoS 0, written only by ingest users, read only by that box)::

    {"v": 1, "box_id": "aal-001", "seqs": [[17, 42], [44, 44]]}

``seqs`` are inclusive ranges of sequence numbers, ascending, that are now in the database (as
events or telemetry, or kept as dead letters with their reason): stored once, whichever copy came
first. A lost receipt costs a re-send, which the ingest stores once and receipts again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

from pydantic import Field, field_validator

from contract.messages import MAX_EVENT_BYTES, SCHEMA_VERSION, BoxId, WireModel, _decode_model

__all__ = ["MAX_RANGES", "Receipt", "decode_receipt", "receipts_for", "seq_ranges"]

#: Ranges in one receipt (at most ~45 bytes each, so a receipt stays under MAX_EVENT_BYTES); more
#: ranges go out as several receipts.
MAX_RANGES = 150

Seq = Annotated[int, Field(ge=1, le=2**63 - 1)]


class Receipt(WireModel):
    """Sequence numbers of one box that the ingest has committed."""

    v: Literal[1] = SCHEMA_VERSION
    box_id: BoxId
    seqs: Annotated[list[tuple[Seq, Seq]], Field(min_length=1, max_length=MAX_RANGES)]

    @field_validator("seqs")
    @classmethod
    def _ascending(cls, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        last = 0
        for lo, hi in ranges:
            if lo > hi or lo <= last:
                raise ValueError("seqs must be ascending, non-overlapping [first, last] ranges")
            last = hi
        return ranges

    def each_seq(self) -> Iterator[int]:
        """Every sequence number the receipt covers."""
        for lo, hi in self.seqs:
            yield from range(lo, hi + 1)


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges of ``seqs`` (duplicates allowed)."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def receipts_for(box_id: str, seqs: Iterable[int]) -> list[Receipt]:
    """The receipts for ``seqs`` of ``box_id``: one, or several of at most :data:`MAX_RANGES` ranges."""
    ranges = seq_ranges(seqs)
    return [Receipt(box_id=box_id, seqs=ranges[i : i + MAX_RANGES]) for i in range(0, len(ranges), MAX_RANGES)]


def decode_receipt(raw: bytes, *, topic_box_id: str | None = None) -> Receipt:
    """Validate a receipt; :class:`contract.ContractError` with a precise code otherwise."""
    return _decode_model(Receipt, raw, MAX_EVENT_BYTES, topic_box_id)
