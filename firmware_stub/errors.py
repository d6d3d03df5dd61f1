"""One root exception for everything the firmware stub refuses or fails at, carrying a reason code.

Where it sits in a message's journey (see ``shared/DESIGN.md``): at the box, before the broker. The
wire contract's own refusals (a payload that does not validate) stay
:class:`contract.ContractError`; this module covers the box's side: its outbox, its lifecycle and
what the broker answered. Modelled on aiomqtt's ``MqttError`` / ``MqttCodeError``: catch
:class:`FirmwareError` for everything, read :attr:`FirmwareError.rc` for the MQTT reason code
when the broker gave one.
"""

from __future__ import annotations

from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "BrokerRefusedError",
    "FirmwareError",
    "FirmwareStateError",
    "OutboxClosedError",
    "UnknownCompartmentError",
]


class FirmwareError(Exception):
    """Root of every error raised by :mod:`firmware_stub`.

    ``rc`` is the MQTT v5 reason code (an ``int``, e.g. 135 "Not authorized") when the broker
    caused the error, else ``None``.
    """

    def __init__(self, message: str, rc: int | ReasonCode | None = None) -> None:
        self.rc: int | None = None if rc is None else (rc.value if isinstance(rc, ReasonCode) else int(rc))
        self.reason: str | None = str(rc) if isinstance(rc, ReasonCode) else None
        super().__init__(message)

    def __str__(self) -> str:
        text = super().__str__()
        if self.rc is None:
            return text
        name = f" {self.reason}" if self.reason else ""
        return f"{text} [reason code {self.rc}{name}]"


class BrokerRefusedError(FirmwareError):
    """The broker refused the connection (CONNACK with a failure reason code: bad credentials,
    not authorised, banned ...). Retrying will not help until someone fixes the credentials."""


class FirmwareStateError(FirmwareError):
    """A method was called in the wrong lifecycle state (e.g. ``emit`` before ``start``, or
    ``start`` twice; a stopped :class:`~firmware_stub.box.BoxFirmware` cannot be restarted --
    build a new one on the same ``state_dir``, as a rebooted box would)."""


class OutboxClosedError(FirmwareStateError):
    """The outbox's database was closed (the box was stopped or killed)."""


class UnknownCompartmentError(FirmwareError, KeyError):
    """The box has no compartment (door) with this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return FirmwareError.__str__(self)
