"""The trace viewer's login sessions in the store, on SQLite and on PostgreSQL: a session is its
key while it lives; it dies when it expires, is ended, or its key is revoked; only the token's
hash is kept, and expired rows go away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import POSTGRES_URL, new_postgres_schema
from sqlalchemy import select, update

from openfusion.settings import Settings
from openfusion.store import Database, Store
from openfusion.store.keys import hash_key
from openfusion.store.schema import ui_sessions


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        settings = Settings(config_dir=tmp_path / "config", cache_dir=tmp_path / "cache")
        async with Store.for_settings(settings) as opened:
            yield opened
        return
    async with (
        new_postgres_schema() as schema,
        Store(Database(POSTGRES_URL, schema=schema)) as opened,
    ):
        yield opened


async def expire(store: Store, token: str) -> None:
    """Move a session's expiry into the past (as if its hours had gone by)."""
    async with store.db.write() as conn:
        await conn.execute(
            update(ui_sessions)
            .where(ui_sessions.c.hash == hash_key(token))
            .values(expires_at=ui_sessions.c.created_at - timedelta(seconds=1))
        )


async def rows(store: Store) -> list[tuple[str, str]]:
    async with store.db.read() as conn:
        result = await conn.execute(select(ui_sessions.c.hash, ui_sessions.c.key_id))
        return sorted((row.hash, row.key_id) for row in result)


async def test_a_session_is_its_key_until_it_ends(store: Store) -> None:
    alice, _ = await store.keys.create("alice")
    ops, _ = await store.keys.create("ops", admin=True)
    first = await store.sessions.start(alice)
    second = await store.sessions.start(alice)
    admin = await store.sessions.start(ops)
    assert len({first, second, admin}) == 3 and len(first) >= 43  # 32 random bytes
    assert await store.sessions.verify(first) == alice
    verified = await store.sessions.verify(admin)
    assert verified is not None and verified.admin
    assert await rows(store) == sorted(
        [(hash_key(first), alice.id), (hash_key(second), alice.id), (hash_key(admin), ops.id)]
    )

    await store.sessions.end(first)
    await store.sessions.end(first)  # twice is harmless
    assert await store.sessions.verify(first) is None
    assert await store.sessions.verify(second) == alice

    await store.keys.revoke("alice")
    assert await store.sessions.verify(second) is None  # revoking the key ends its sessions
    assert await store.sessions.verify(admin) is not None
    assert await store.sessions.verify("") is None
    assert await store.sessions.verify("not-a-session") is None


async def test_an_expired_session_is_refused_then_deleted(store: Store) -> None:
    alice, _ = await store.keys.create("alice")
    old = await store.sessions.start(alice)
    await expire(store, old)
    assert await store.sessions.verify(old) is None
    fresh = await store.sessions.start(alice)  # starting one clears the expired ones
    assert await rows(store) == [(hash_key(fresh), alice.id)]
    async with store.db.read() as conn:
        row = (await conn.execute(select(ui_sessions.c.created_at, ui_sessions.c.expires_at))).one()
    assert row.expires_at - row.created_at == timedelta(hours=12)


def test_the_session_lifetime_is_a_setting(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()  # conftest points OPENFUSION_CONFIG_DIR here
    (tmp_path / "config" / "config.toml").write_text("[server]\nui_session_hours = 0.5\n")
    settings = Settings.load()
    assert Store.for_settings(settings).sessions.lifetime == timedelta(minutes=30)
