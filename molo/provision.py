"""Provisioning: the credentials every box and service uses to reach the broker.

Where this sits in a message's journey (docs: /work/shared/DESIGN.md): before the first message
is sent, each box gets a username (its box id) and a random password, and each backend process
gets its own user (``ingest``, ``ingest-1``, ``api``, ...: see :data:`ROLES`). The broker makes a
client's id its username (``use_username_as_clientid``), so one identity is one connection and no
client can take over another's session. Three files come out of :func:`provision`:

``credentials.json`` (mode 0600)
    ``{"boxes": {box_id: password}, "services": {user: password}}`` in clear text, read by the
    firmware stubs (:mod:`firmware_stub`) and the ingest (:mod:`backend`). Keep it secret.
``passwd``
    The same users in Mosquitto 2's hashed format, ``user:$7$101$<salt>$<hash>``, for the broker's
    ``password_file`` (``broker_config/mosquitto.conf``).
``acl``
    The broker's ACL, rendered from the template ``broker_config/acl`` (:func:`render_acl`): its box
    patterns keep each box on ``molo/v1/boxes/<its id>/...``, and every service user gets the block
    of its role.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contract.topics import BOX_ID_PATTERN, is_valid_box_id

__all__ = [
    "ACL_FILE",
    "ACL_TEMPLATE",
    "CREDENTIALS_FILE",
    "DEFAULT_SERVICE_USERS",
    "HASH_ITERATIONS",
    "PASSWD_FILE",
    "ROLES",
    "Credentials",
    "box_ids",
    "hash_password",
    "passwd_line",
    "provision",
    "render_acl",
    "role_of",
    "verify_password",
    "write_acl",
    "write_passwd",
]

CREDENTIALS_FILE = "credentials.json"
PASSWD_FILE = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE = "acl"
#: The ACL template: box patterns, then one ``user ROLE`` block per role.
ACL_TEMPLATE = Path(__file__).resolve().parent.parent / "broker_config" / "acl"
#: Service roles; a service user is named ``ROLE`` or ``ROLE-<name>`` and gets that role's rights.
ROLES = ("ingest", "api")
#: Provisioned unless others are named: ``ingest`` (a single worker, the default of ``molo ingest``),
#: ``ingest-1`` and ``ingest-2`` (docker-compose's two workers) and ``api`` (the API's commands).
DEFAULT_SERVICE_USERS = ("ingest", "ingest-1", "ingest-2", "api")

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
    #: The Mosquitto ACL written next to it.
    acl_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.passwd_path = self.path.parent / PASSWD_FILE
        self.acl_path = self.path.parent / ACL_FILE

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


def role_of(user: str) -> str | None:
    """The role of a service user name (``ingest-2`` -> ``ingest``), or None for any other name."""
    for role in ROLES:
        if user == role or user.startswith(f"{role}-"):
            return role
    return None


def _role_blocks(template: str) -> tuple[list[str], dict[str, list[str]]]:
    """Split an ACL template into the lines before its first ``user`` line and, per role, the
    ``topic`` lines of its block."""
    head: list[str] = []
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in template.splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            if len(words) != 2 or words[1] not in ROLES:
                raise ValueError(f"ACL template: 'user' blocks must name a role of {ROLES}: {line!r}")
            current = blocks.setdefault(words[1], [])
        elif current is None:
            head.append(line)
        elif words[:1] == ["topic"]:
            current.append(line)
    missing = [role for role in ROLES if role not in blocks]
    if missing:
        raise ValueError(f"ACL template has no block for the role(s) {missing}")
    return head, blocks


def render_acl(service_users: Iterable[str], template: str | None = None) -> str:
    """The broker's ACL: the template's box patterns, then for every service user its role's block.

    Raises ValueError for a service user whose name has no role (see :func:`role_of`).
    """
    head, blocks = _role_blocks(template if template is not None else ACL_TEMPLATE.read_text(encoding="utf-8"))
    out = [line for line in head if not line.startswith("# --- Services")]
    while out and not out[-1].strip():
        out.pop()
    out += ["", "# --- Service users (rendered by molo.provision.render_acl from broker_config/acl) ---"]
    for user in sorted(set(service_users)):
        role = role_of(user)
        if role is None:
            raise ValueError(f"service user {user!r} has no role: name it one of {ROLES} or ROLE-<name>")
        out += ["", f"# role: {role}", f"user {user}", *blocks[role]]
    return "\n".join(out) + "\n"


def write_acl(path: Path, service_users: Iterable[str]) -> Path:
    """Write the broker's ACL (mode 0600) for ``service_users`` (see :func:`render_acl`)."""
    _write_private(path, render_acl(service_users))
    return path


def provision(
    out_dir: Path,
    box_ids: Sequence[str],
    *,
    service_users: Sequence[str] = DEFAULT_SERVICE_USERS,
    existing: bool = True,
) -> Credentials:
    """Create or extend the credentials in ``out_dir`` and write ``credentials.json`` and ``passwd``.

    With ``existing=True`` (the default) passwords already in ``out_dir/credentials.json`` are kept
    -- including boxes not named in ``box_ids`` -- and only new ids get a new password. With
    ``existing=False`` every password is generated afresh (rotation: every box must be updated).

    Raises ValueError for a box id that does not match ``contract.topics.BOX_ID_PATTERN`` or that
    is a reserved name (a role, ``ROLE-...`` or any service user), and for a service user
    without a role.
    """
    reserved = frozenset(service_users)
    for user in service_users:
        if not is_valid_box_id(user):
            raise ValueError(f"invalid service user {user!r}: must match {BOX_ID_PATTERN}")
        if role_of(user) is None:
            raise ValueError(f"service user {user!r} has no role: name it one of {ROLES} or ROLE-<name>")
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
    # passwd and acl first: a crash in between leaves the old credentials.json, whose users stay valid.
    write_passwd(creds.passwd_path, creds.users())
    write_acl(creds.acl_path, creds.services)
    _write_private(path, json.dumps({"boxes": creds.boxes, "services": creds.services}, indent=2) + "\n")
    return creds


def _check_box_id(box_id: str, *, reserved: frozenset[str]) -> None:
    if not is_valid_box_id(box_id):
        raise ValueError(f"invalid box id {box_id!r}: must match {BOX_ID_PATTERN}")
    if box_id in reserved or role_of(box_id) is not None:
        raise ValueError(f"box id {box_id!r} is reserved for a service user (roles: {ROLES})")


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
    parser.add_argument(
        "--service",
        action="append",
        default=None,
        help=f"service user ROLE or ROLE-<name>, roles {ROLES} (default: {' '.join(DEFAULT_SERVICE_USERS)})",
    )
    parser.add_argument("--rotate", action="store_true", help="new passwords for everyone")
    args = parser.parse_args(argv)
    ids = box_ids(args.boxes, args.prefix) + list(args.box_id)
    services = tuple(args.service) if args.service else DEFAULT_SERVICE_USERS
    try:
        creds = provision(args.out_dir, ids, service_users=services, existing=not args.rotate)
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"{len(creds.boxes)} boxes, {len(creds.services)} services -> "
        f"{creds.path}, {creds.passwd_path}, {creds.acl_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
