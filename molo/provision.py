"""Provisioning: the credentials every box and service uses to reach the broker.

Where this sits in a message's journey (docs: /work/shared/DESIGN.md): before the first message
is sent, each box gets a username (its box id) and a random password, and each backend service
(``ingest``) gets its own. Two files come out of :func:`provision`:

``credentials.json`` (mode 0600)
    ``{"boxes": {box_id: password}, "services": {user: password}}`` in clear text, read by the
    firmware stubs (:mod:`firmware_stub`) and the ingest (:mod:`backend`). Keep it secret.
``passwd``
    The same users in Mosquitto 2's hashed format, ``user:$7$101$<salt>$<hash>``, for the broker's
    ``password_file`` (``broker_config/mosquitto.conf``); the ACL (``broker_config/acl``) then keeps
    each box on ``molo/v1/boxes/<its id>/...``.

Re-provisioning is idempotent: passwords already in ``credentials.json`` are kept and new ids are
added, so running boxes keep working. Run it as ``python -m molo.provision OUT_DIR --boxes 50``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contract.topics import BOX_ID_PATTERN, is_valid_box_id

__all__ = [
    "CREDENTIALS_FILE",
    "HASH_ITERATIONS",
    "PASSWD_FILE",
    "Credentials",
    "box_ids",
    "hash_password",
    "passwd_line",
    "provision",
    "verify_password",
    "write_passwd",
]

CREDENTIALS_FILE = "credentials.json"
PASSWD_FILE = "passwd"  # noqa: S105 - a file name, not a password

#: Mosquitto 2's password hash: PBKDF2-HMAC-SHA512, marked "$7$" in the password file.
_HASH_ID = "7"
#: mosquitto_passwd's default iteration count. The broker recomputes the hash on every CONNECT,
#: on its single thread, so a reconnect storm of every box pays it once per box; our passwords
#: are 256-bit random tokens, which no iteration count is needed to protect.
HASH_ITERATIONS = 101
#: mosquitto_passwd uses 12 random salt bytes and a 64-byte (SHA-512 sized) derived key.
_SALT_BYTES = 12
_PASSWORD_BYTES = 32


@dataclass
class Credentials:
    """Clear-text credentials: box id -> password and service user -> password."""

    boxes: dict[str, str]
    services: dict[str, str]
    #: The ``credentials.json`` these were read from or written to.
    path: Path
    #: The Mosquitto password file written next to it.
    passwd_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.passwd_path = self.path.parent / PASSWD_FILE

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a ``credentials.json`` written by :func:`provision`."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object with 'boxes' and 'services'")
        return cls(
            boxes=_str_map(raw.get("boxes", {}), path, "boxes"),
            services=_str_map(raw.get("services", {}), path, "services"),
            path=path,
        )

    def users(self) -> dict[str, str]:
        """Every MQTT username with its password, boxes and services together."""
        return {**self.boxes, **self.services}

    def password(self, username: str) -> str:
        """The password of a box or service user; KeyError if it was never provisioned."""
        users = self.users()
        if username not in users:
            raise KeyError(f"no credentials for {username!r} in {self.path}")
        return users[username]


def _str_map(value: object, path: Path, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{path}: {key!r} must map names to password strings")
    return dict(value)


def box_ids(n: int, prefix: str = "aal") -> list[str]:
    """``n`` box ids ``{prefix}-001`` ... (``aal-001`` .. ``aal-050`` for the Aalborg pilot)."""
    if n < 0:
        raise ValueError(f"number of boxes must be >= 0, got {n}")
    ids = [f"{prefix}-{i:03d}" for i in range(1, n + 1)]
    for box_id in ids:
        _check_box_id(box_id, reserved=frozenset())
    return ids


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS) -> str:
    """The Mosquitto 2 hash of ``password``: ``$7$<iterations>$<b64 salt>$<b64 hash>``.

    Same as ``mosquitto_passwd``: PBKDF2-HMAC-SHA512 over the UTF-8 password with the raw salt
    bytes, both salt and 64-byte key in standard base64 with padding.
    """
    if salt is None:
        salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"${_HASH_ID}${iterations}${b64(salt).decode('ascii')}${b64(key).decode('ascii')}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``hashed`` (a ``$7$`` password-file entry, without the user) matches."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != _HASH_ID:
        raise ValueError(f"not a Mosquitto $7$ hash: {hashed!r}")
    salt = base64.b64decode(parts[3], validate=True)
    expected = hash_password(password, salt=salt, iterations=int(parts[2]))
    return secrets.compare_digest(expected, hashed)


def passwd_line(username: str, password: str) -> str:
    """One line of a Mosquitto password file, without the newline."""
    if not username or any(c in username for c in ":\r\n"):
        raise ValueError(f"username {username!r} cannot be written to a password file")
    return f"{username}:{hash_password(password)}"


def write_passwd(path: Path, users: Mapping[str, str]) -> Path:
    """Write a Mosquitto password file (mode 0600) for ``users`` (username -> clear password)."""
    text = "".join(passwd_line(user, pw) + "\n" for user, pw in sorted(users.items()))
    _write_private(path, text)
    return path


def provision(
    out_dir: Path,
    box_ids: Sequence[str],
    *,
    service_users: Sequence[str] = ("ingest",),
    existing: bool = True,
) -> Credentials:
    """Create or extend the credentials in ``out_dir`` and write ``credentials.json`` and ``passwd``.

    With ``existing=True`` (the default) passwords already in ``out_dir/credentials.json`` are kept
    -- including boxes not named in ``box_ids`` -- and only new ids get a new password. With
    ``existing=False`` every password is generated afresh (rotation: every box must be updated).

    Raises ValueError for a box id that does not match ``contract.topics.BOX_ID_PATTERN`` or that
    is a reserved name (``ingest`` or any service user).
    """
    reserved = frozenset({"ingest", *service_users})
    for user in service_users:
        if not is_valid_box_id(user):
            raise ValueError(f"invalid service user {user!r}: must match {BOX_ID_PATTERN}")
    for box_id in box_ids:
        _check_box_id(box_id, reserved=reserved)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CREDENTIALS_FILE
    boxes: dict[str, str] = {}
    services: dict[str, str] = {}
    if existing and path.exists():
        old = Credentials.load(path)
        for box_id in old.boxes:
            _check_box_id(box_id, reserved=reserved)
        boxes, services = dict(old.boxes), dict(old.services)

    for box_id in box_ids:
        boxes.setdefault(box_id, secrets.token_urlsafe(_PASSWORD_BYTES))
    for user in service_users:
        services.setdefault(user, secrets.token_urlsafe(_PASSWORD_BYTES))

    creds = Credentials(boxes=dict(sorted(boxes.items())), services=dict(sorted(services.items())), path=path)
    # passwd first: a crash in between leaves the old credentials.json, whose users stay valid.
    write_passwd(creds.passwd_path, creds.users())
    _write_private(path, json.dumps({"boxes": creds.boxes, "services": creds.services}, indent=2) + "\n")
    return creds


def _check_box_id(box_id: str, *, reserved: frozenset[str]) -> None:
    if not is_valid_box_id(box_id):
        raise ValueError(f"invalid box id {box_id!r}: must match {BOX_ID_PATTERN}")
    if box_id in reserved:
        raise ValueError(f"box id {box_id!r} is reserved for a service user")


def _write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m molo.provision OUT_DIR [--boxes N] [--prefix aal] [--box-id ID ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m molo.provision",
        description="Create or extend broker credentials (credentials.json + Mosquitto passwd).",
    )
    parser.add_argument("out_dir", type=Path, help="directory for credentials.json and passwd")
    parser.add_argument("--boxes", type=int, default=0, help="provision PREFIX-001 .. PREFIX-N")
    parser.add_argument("--prefix", default="aal", help="box id prefix for --boxes (default: aal)")
    parser.add_argument("--box-id", action="append", default=[], help="an extra box id (repeatable)")
    parser.add_argument("--service", action="append", default=None, help="service user (default: ingest)")
    parser.add_argument("--rotate", action="store_true", help="new passwords for everyone")
    args = parser.parse_args(argv)
    ids = box_ids(args.boxes, args.prefix) + list(args.box_id)
    services = tuple(args.service) if args.service else ("ingest",)
    try:
        creds = provision(args.out_dir, ids, service_users=services, existing=not args.rotate)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{len(creds.boxes)} boxes, {len(creds.services)} services -> {creds.path}, {creds.passwd_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
