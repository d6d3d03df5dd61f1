"""All SQL about API keys: the synchronous side (``molo keys``, test fixtures) and the lookup the
API runs on every request (async)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

Row = dict[str, Any]

#: Every change to a row of ``api_keys`` is announced here with the key id (migration 0011).
KEY_CHANNEL = "molo_keys"


def insert_key(
    conn: psycopg.Connection[Any], *, key_id: str, name: str, role: str, carrier: str | None, hash_: str
) -> None:
    conn.execute(
        "INSERT INTO api_keys (key_id, name, role, carrier, secret_sha256) VALUES (%s, %s, %s, %s, %s)",
        (key_id, name, role, carrier, hash_),
    )


def list_keys(conn: psycopg.Connection[Any], *, include_revoked: bool) -> list[Row]:
    where = "" if include_revoked else "WHERE revoked_at IS NULL"
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT key_id, name, role, carrier, created_at, revoked_at FROM api_keys {where} ORDER BY created_at"
        )
        return cur.fetchall()


def revoke_key(conn: psycopg.Connection[Any], key_id: str) -> bool:
    cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL", (key_id,))
    return cur.rowcount == 1


async def find_key(conn: AsyncConnection[Any], key_id: str) -> Row | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT key_id, name, role, carrier, secret_sha256, revoked_at FROM api_keys WHERE key_id = %s", (key_id,)
        )
        return await cur.fetchone()
