"""One root exception for everything the contract refuses, carrying a machine-readable code.

The backend stores the code and the human-readable detail with the raw bytes in its dead-letter
table, so an operator can see exactly why a message was refused.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a message was refused. Stable strings: dashboards and alerts key on them."""

    UNKNOWN_TOPIC = "unknown_topic"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    #: An object (at any depth) names the same key twice, e.g. ``"seq":29,"seq":30``: JSON parsers
    #: disagree on which one wins, so the message is refused rather than guessed at.
    DUPLICATE_KEY = "duplicate_key"
    NUL_BYTE = "nul_byte"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    INVALID_VALUE = "invalid_value"
    BOX_ID_MISMATCH = "box_id_mismatch"
    UNKNOWN_COMPARTMENT = "unknown_compartment"
    WRONG_COMPARTMENT_KIND = "wrong_compartment_kind"
    WRONG_TOPIC = "wrong_topic"
    #: The box's (box_id, seq) is already stored with different content: the box reused a sequence
    #: number (e.g. its storage was wiped). Kept, never dropped as a duplicate.
    SEQ_CONFLICT = "seq_conflict"
    #: A command acknowledgement for a command the backend has no record of.
    UNKNOWN_COMMAND = "unknown_command"
    #: Valid by the contract but refused by the database (kept with the database's reason).
    STORAGE_REJECTED = "storage_rejected"
    #: An unexpected failure while storing this one message (a bug); kept with the exception text.
    INGEST_ERROR = "ingest_error"


class ContractError(ValueError):
    """A message that does not satisfy the wire contract.

    ``code`` is machine-readable, ``detail`` says precisely what and where (field path, limit).
    """

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail
