"""The wire contract and domain language of MoLo Hubs boxes.

Where it sits in a message's journey (see docs/architecture.md): at the bottom. The firmware stub
builds messages with these models, the broker ACL is written against these topics, and the backend
validates every byte it receives with them. This package imports nothing else of the project.
"""

from contract.domain import (
    PARCEL_MAX_WEIGHT_KG,
    RED_BOX_MAX_KG,
    SIZE_DIMENSIONS_MM,
    BoxLayout,
    Compartment,
    CompartmentKind,
    Dimensions,
    SizeClass,
    WasteFraction,
    default_layout,
)
from contract.errors import ContractError, ErrorCode
from contract.messages import (
    SCHEMA_VERSION,
    BoxEvent,
    Command,
    CommandAck,
    EventPayload,
    Status,
    StatusReason,
    decode_command,
    decode_command_ack,
    decode_event,
    decode_status,
    encode,
    make_event,
)
from contract.topics import MessageKind, TopicInfo, parse_topic, topic_for

__all__ = [
    "PARCEL_MAX_WEIGHT_KG",
    "RED_BOX_MAX_KG",
    "SCHEMA_VERSION",
    "SIZE_DIMENSIONS_MM",
    "BoxEvent",
    "BoxLayout",
    "Command",
    "CommandAck",
    "Compartment",
    "CompartmentKind",
    "ContractError",
    "Dimensions",
    "ErrorCode",
    "EventPayload",
    "MessageKind",
    "SizeClass",
    "Status",
    "StatusReason",
    "TopicInfo",
    "WasteFraction",
    "decode_command",
    "decode_command_ack",
    "decode_event",
    "decode_status",
    "default_layout",
    "encode",
    "make_event",
    "parse_topic",
    "topic_for",
]
