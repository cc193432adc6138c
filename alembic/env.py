"""Async alembic environment (asyncpg).

`chatlog migrate` hands in a live connection through `config.attributes["connection"]`
(the cookbook's connection-sharing recipe); the plain `alembic` command builds its own
engine from CHATLOG_DATABASE_URL.
"""

import asyncio
import os

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context
from service.settings import database_url

config = context.config


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = os.environ.get("CHATLOG_DATABASE_URL")
    if not url:
        raise SystemExit("CHATLOG_DATABASE_URL is not set; use `chatlog migrate` for the embedded database")
    engine = create_async_engine(database_url(url))
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")

shared = config.attributes.get("connection")
if shared is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_async_migrations())
