"""Logins of the trace viewer: a random session token in the browser's cookie, its hash here.

Why rows in the database rather than a stateless signed cookie: a session must end when its
user logs out and when its API key is revoked, on every replica at once. A signed cookie can
only be refused by a list of revoked sessions that every replica shares, which is a table
again; a table of live sessions is the simpler of the two, and needs no signing secret to
share and rotate. The token has 32 random bytes (``secrets.token_urlsafe``), so a fast sha256
of it is as safe to store as the API keys' hashes (``keys.py``); someone who reads the table
cannot log in with what they read.

A session is valid while it has not expired, not been ended (``end``), and its key is active:
revoking a key ends its sessions on the next request. Expired rows are deleted whenever a new
session starts, so the table stays the size of the live sessions.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, select

from openfusion.store.database import Database
from openfusion.store.keys import KeyRecord, hash_key, key_record
from openfusion.store.schema import api_keys, ui_sessions

__all__ = ["SESSION_HOURS", "SessionStore"]

SESSION_HOURS = 12.0
"""How long a login lasts (a working day), unless its user logs out first."""


class SessionStore:
    """The ``ui_sessions`` table: start, look up and end logins."""

    def __init__(self, database: Database, *, hours: float = SESSION_HOURS) -> None:
        self.db = database
        self.lifetime = timedelta(hours=hours)

    async def start(self, key: KeyRecord) -> str:
        """A new session for ``key``; returns its token (for the cookie; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        now = _now()
        async with self.db.write() as conn:
            await conn.execute(delete(ui_sessions).where(ui_sessions.c.expires_at <= now))
            await conn.execute(
                insert(ui_sessions).values(
                    hash=hash_key(token),
                    key_id=key.id,
                    created_at=now,
                    expires_at=now + self.lifetime,
                )
            )
        return token

    async def verify(self, token: str) -> KeyRecord | None:
        """The active key of the live session ``token``, or None (unknown, expired, ended, or
        its key revoked)."""
        if not token:
            return None
        query = (
            select(api_keys)
            .join(ui_sessions, ui_sessions.c.key_id == api_keys.c.id)
            .where(
                ui_sessions.c.hash == hash_key(token),
                ui_sessions.c.expires_at > _now(),
                ~api_keys.c.revoked,
            )
        )
        async with self.db.read() as conn:
            row = (await conn.execute(query)).mappings().one_or_none()
        return None if row is None else key_record(row)

    async def end(self, token: str) -> None:
        """End the session ``token`` (logging out twice is harmless)."""
        async with self.db.write() as conn:
            await conn.execute(delete(ui_sessions).where(ui_sessions.c.hash == hash_key(token)))


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
