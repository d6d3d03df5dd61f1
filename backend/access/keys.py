"""API keys: the token format, hashing, and creating, listing and revoking keys (``molo keys``).

A token looks like ``molo_<key_id>_<secret>``: ``key_id`` is 10 hex characters, public, used to find
the row and shown in listings; ``secret`` is 32 random bytes (256 bits, URL-safe base64). Only the
SHA-256 of the whole token is stored. A slow password hash (bcrypt, argon2) is for low-entropy
human passwords; for a 256-bit random token a single SHA-256 cannot be brute-forced, and it keeps
every request's check cheap. The token is shown once, when it is created.

There is no built-in, default or configurable key: every key comes from :func:`create_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg

from backend.access import repository

TOKEN_PREFIX = "molo_"  # noqa: S105 - the public prefix of every token, not a secret
_TOKEN_RE = re.compile(r"^molo_([0-9a-f]{10})_([A-Za-z0-9_-]{43})$")
CARRIER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,31}$")  # contract.messages.CarrierId


class Role(StrEnum):
    OPERATOR = "operator"
    COURIER = "courier"
    RESEARCHER = "researcher"


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``token`` is the secret, shown once and never stored."""

    key_id: str
    name: str
    role: Role
    carrier: str | None
    token: str


@dataclass(frozen=True)
class KeyInfo:
    """A stored key as listings show it (no secret, no hash)."""

    key_id: str
    name: str
    role: Role
    carrier: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def display(self) -> str:
        return f"{TOKEN_PREFIX}{self.key_id}_…"


def token_hash(token: str) -> str:
    """Hex SHA-256 of the whole token, as stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_token(token: str) -> str | None:
    """The key id of a well-formed token, else None."""
    match = _TOKEN_RE.match(token)
    return match[1] if match else None


def hash_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of the token's hash with the stored one."""
    return hmac.compare_digest(token_hash(token), stored_hash)


def new_token() -> tuple[str, str]:
    """(key_id, token) with fresh randomness."""
    key_id = secrets.token_hex(5)
    return key_id, f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def validate(role: Role, carrier: str | None, name: str) -> None:
    """ValueError unless a courier names exactly one carrier and no other role names one."""
    if not name.strip() or len(name) > 200 or "\x00" in name:
        raise ValueError("a key needs a name of 1..200 characters")
    if role is Role.COURIER:
        if carrier is None:
            raise ValueError("a courier key is bound to one carrier: pass --carrier")
        if not CARRIER_RE.match(carrier):
            raise ValueError(f"{carrier!r} is not a carrier id (lowercase letters, digits, - and _)")
    elif carrier is not None:
        raise ValueError(f"only courier keys have a carrier, not {role.value} keys")


def create_key(conn: psycopg.Connection[Any], *, role: Role, name: str, carrier: str | None = None) -> NewKey:
    """Store a new key and return it with its token (the only time the token exists)."""
    validate(role, carrier, name)
    key_id, token = new_token()
    repository.insert_key(conn, key_id=key_id, name=name, role=role.value, carrier=carrier, hash_=token_hash(token))
    return NewKey(key_id=key_id, name=name, role=role, carrier=carrier, token=token)


def list_keys(conn: psycopg.Connection[Any], *, include_revoked: bool = True) -> list[KeyInfo]:
    return [
        KeyInfo(
            key_id=r["key_id"],
            name=r["name"],
            role=Role(r["role"]),
            carrier=r["carrier"],
            created_at=r["created_at"],
            revoked_at=r["revoked_at"],
        )
        for r in repository.list_keys(conn, include_revoked=include_revoked)
    ]


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> bool:
    """Revoke ``key_id`` (a token or its ``molo_<id>_`` prefix works too). False if no active key has it."""
    key_id = parse_token(key_id) or key_id.removeprefix(TOKEN_PREFIX).split("_")[0]
    return repository.revoke_key(conn, key_id)


def rotate_named_key(conn: psycopg.Connection[Any], *, role: Role, name: str, carrier: str | None = None) -> NewKey:
    """Revoke every active key called ``name`` and create a new one (the demo's operator key: one
    valid key per run, the older runs' printed secrets stop working)."""
    for info in list_keys(conn, include_revoked=False):
        if info.name == name:
            repository.revoke_key(conn, info.key_id)
    return create_key(conn, role=role, name=name, carrier=carrier)
