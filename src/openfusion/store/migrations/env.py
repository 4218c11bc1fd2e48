"""Alembic's environment for openfusion's store.

Run two ways:

- by ``Database.init`` (every start of a server, the CLI or the library): the connection comes
  in ``config.attributes["connection"]``, inside a transaction that holds the migration lock;
- by ``alembic upgrade head`` (``alembic.ini`` at the root of a checkout) or ``openfusion db
  upgrade``: the database is ``-x url=...``, else ``sqlalchemy.url`` in the ini file, else
  openfusion's own setting (``OPENFUSION_DATABASE_URL``, ``database_url`` in config.toml, else
  the default SQLite file); ``-x schema=...`` puts the tables in a PostgreSQL schema.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from openfusion.store.schema import metadata


def run(connection: Connection, schema: str | None) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_command_line(url: str, schema: str | None) -> None:
    from openfusion.store.database import Database

    database = Database(url, schema=schema)
    try:
        async with database.migrating() as conn:
            await conn.run_sync(run, schema)
    finally:
        await database.aclose()


def main() -> None:
    config = context.config
    given = config.attributes.get("connection")
    if given is not None:
        run(given, config.attributes.get("schema"))
        return
    if config.config_file_name is not None:  # the command line: log what it does
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    arguments = context.get_x_argument(as_dictionary=True)
    url = arguments.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from openfusion.settings import Settings

        url = Settings.load().database
    asyncio.run(run_from_command_line(url, arguments.get("schema")))


if context.is_offline_mode():
    raise SystemExit("openfusion's migrations run against a database: drop --sql")
main()
