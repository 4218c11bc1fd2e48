"""Schema migrations: from an empty database, from the ledger's first schema (no Alembic), by
`alembic upgrade head` on the command line, and by replicas starting together."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import POSTGRES_URL
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from openfusion.errors import ConfigError
from openfusion.store import SpendLedger
from openfusion.store.database import SCRIPT_LOCATION, Database
from openfusion.store.schema import SCHEMA_REVISION, budgets, metadata

REPO = Path(__file__).resolve().parent.parent
TABLES = {"alembic_version", "api_keys", "budgets", "instances", "reservations", "run_spans"}
TABLES |= {"runs", "spend", "ui_sessions"}


def legacy_metadata() -> MetaData:
    """The tables as openfusion 0.1's ledger made them with ``metadata.create_all``."""
    legacy = MetaData()
    Table(
        "budgets",
        legacy,
        Column("key_id", String, primary_key=True),
        Column("limit_nano", BigInteger, nullable=False),
    )
    Table(
        "reservations",
        legacy,
        Column("id", String(32), primary_key=True),
        Column("key_id", String, nullable=False, index=True),
        Column("amount_nano", BigInteger, nullable=False),
        Column("created_at", DateTime, nullable=False),
    )
    Table(
        "spend",
        legacy,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("key_id", String, nullable=True, index=True),
        Column("generation_id", String, nullable=False, index=True),
        Column("stage", String, nullable=False),
        Column("model", String, nullable=True),
        Column("cost_nano", BigInteger, nullable=True),
        Column("unpriced", Boolean, nullable=False),
        Column("created_at", DateTime, nullable=False),
    )
    return legacy


LEGACY_ROWS = [
    "INSERT INTO budgets (key_id, limit_nano) VALUES ('k', 5000000000)",
    "INSERT INTO spend (key_id, generation_id, stage, model, cost_nano, unpriced, created_at) "
    "VALUES ('k', 'gen-old', 'panel', 'm', 1250000000, false, '2026-11-01 10:00:00')",
]


async def make_legacy(url: str, schema: str | None = None) -> None:
    engine = create_async_engine(url)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})
    try:
        async with engine.begin() as conn:
            if schema is not None:
                await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                await conn.execute(text(f'SET LOCAL search_path TO "{schema}"'))
            await conn.run_sync(legacy_metadata().create_all)
            for statement in LEGACY_ROWS:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def schema_state(url: str, schema: str | None = None) -> dict[str, Any]:
    """The tables, the Alembic revision, and what the migrated schema lacks against the code's
    metadata (empty: they match)."""
    engine = create_async_engine(url)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})

    def read(conn: Connection) -> dict[str, Any]:
        context = MigrationContext.configure(
            conn, opts={"version_table_schema": schema, "include_schemas": False}
        )
        diff = compare_metadata(context, metadata) if schema is None else []
        return {
            "tables": set(inspect(conn).get_table_names(schema=schema)),
            "revision": context.get_current_revision(),
            "diff": diff,
        }

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(read)
    finally:
        await engine.dispose()


def alembic_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_code_expects_the_migrations_head() -> None:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION


async def test_init_migrates_an_empty_sqlite_database_to_the_code_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sub' / 'new.db'}"
    database = Database(url)
    await database.init()
    await database.init()  # idempotent
    await database.aclose()
    state = await schema_state(url)
    assert state["tables"] == TABLES
    assert state["revision"] == SCHEMA_REVISION
    assert state["diff"] == []


async def test_init_adopts_the_ledgers_first_schema_and_keeps_its_rows(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await make_legacy(url)
    async with SpendLedger(url) as ledger:
        assert await ledger.spent("k") == 1_250_000_000
        assert (await ledger.budget("k")).limit_nano == 5_000_000_000
    state = await schema_state(url)
    assert state["tables"] == TABLES and state["revision"] == SCHEMA_REVISION
    assert state["diff"] == []


async def test_a_database_of_a_newer_openfusion_is_refused_untouched(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    database = Database(url)
    await database.init()
    async with database.write() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    await database.aclose()
    again = Database(url)
    with pytest.raises(ConfigError, match=r"revision 0099, made by a newer openfusion.*upgrade"):
        await again.init()
    await again.aclose()


@pytest.mark.parametrize("start", ["empty", "legacy"])
def test_alembic_upgrade_head_on_the_command_line(tmp_path: Path, start: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    if start == "legacy":
        asyncio.run(make_legacy(url))
    done = alembic_cli("-x", f"url={url}", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert "Running upgrade" in done.stderr
    state = asyncio.run(schema_state(url))
    assert state["tables"] == TABLES and state["revision"] == SCHEMA_REVISION
    assert state["diff"] == []


def test_alembic_uses_openfusions_database_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("OPENFUSION_DATABASE_URL", url)
    done = alembic_cli("upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert asyncio.run(schema_state(url))["revision"] == SCHEMA_REVISION


async def test_postgres_from_the_legacy_schema_and_from_the_command_line(
    postgres_schema: str,
) -> None:
    await make_legacy(POSTGRES_URL, postgres_schema)
    done = await asyncio.to_thread(
        alembic_cli,
        "-x",
        f"url={POSTGRES_URL}",
        "-x",
        f"schema={postgres_schema}",
        "upgrade",
        "0001",
    )
    assert done.returncode == 0, done.stderr
    assert (await schema_state(POSTGRES_URL, postgres_schema))["revision"] == "0001"
    # Replicas starting together: every one of them waits for the lock, one migrates.
    databases = [Database(POSTGRES_URL, schema=postgres_schema) for _ in range(4)]
    try:
        await asyncio.gather(*(d.init() for d in databases))
        async with databases[0].read() as conn:
            limit = await conn.scalar(select(budgets.c.limit_nano).where(budgets.c.key_id == "k"))
    finally:
        for database in databases:
            await database.aclose()
    assert limit == 5_000_000_000
    state = await schema_state(POSTGRES_URL, postgres_schema)
    assert state["tables"] == TABLES and state["revision"] == SCHEMA_REVISION


async def test_postgres_schema_matches_the_code(postgres_schema: str) -> None:
    database = Database(POSTGRES_URL, schema=postgres_schema)
    try:
        await database.init()
        async with database.engine.connect() as conn:

            def diff(sync: Connection) -> list[Any]:
                sync.execute(text(f'SET search_path TO "{postgres_schema}"'))
                return compare_metadata(MigrationContext.configure(sync), metadata)

            assert await conn.run_sync(diff) == []
    finally:
        await database.aclose()
