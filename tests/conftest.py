"""Tests run against a real PostgreSQL: the embedded one (pgserver), or the server named by
CHATLOG_TEST_DATABASE_URL. Each test session makes its own migrated template database; tests that
need a log of their own get a fresh copy of it (`db_url`), which they may also hand to a
subprocess. Every database made here is dropped at the end of the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.connections import ConnectionPool
from service.database import embedded_url, make_engine, migrate
from service.eventstore import EventStore
from service.settings import database_url
from tests.keys import KEYRING, MASTER_KEY


def _libpq(url: str) -> str:
    """The SQLAlchemy URL in the form asyncpg.connect takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL of the server, connected to its maintenance database."""
    configured = os.environ.get("CHATLOG_TEST_DATABASE_URL")
    if configured:
        return database_url(configured)
    return embedded_url(tmp_path_factory.mktemp("embedded"))


class Databases:
    """Makes databases on the test server and drops them all at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.prefix = f"chatlog_test_{uuid.uuid4().hex[:8]}"
        self.made: list[str] = []
        self.template: str | None = None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(_libpq(self.server_url))

    async def create(self, template: str | None = None) -> str:
        name = f"{self.prefix}_{len(self.made)}"
        conn = await self._admin()
        try:
            suffix = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        finally:
            await conn.close()
        self.made.append(name)
        return _with_database(self.server_url, name)

    async def fresh(self) -> str:
        """A new, migrated, empty database."""
        if self.template is None:
            url = await self.create()
            engine = make_engine(url, pool_size=1)
            await migrate(engine)
            await engine.dispose()
            self.template = make_url(url).database
        return await self.create(self.template)

    async def drop_all(self) -> None:
        conn = await self._admin()
        try:
            for name in reversed(self.made):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="session")
async def databases(server_url: str) -> AsyncIterator[Databases]:
    dbs = Databases(server_url)
    yield dbs
    await dbs.drop_all()


@pytest.fixture
async def db_url(databases: Databases) -> str:
    """A fresh migrated database of this test's own."""
    return await databases.fresh()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url, pool_size=60)
    yield eng
    await eng.dispose()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(db_url, size=60)
    yield p
    await p.close()


@pytest.fixture
async def store(pool: ConnectionPool) -> AsyncIterator[EventStore]:
    es = EventStore(pool, KEYRING)
    yield es
    await es.aclose()


@pytest.fixture
def raw_dsn(db_url: str) -> str:
    """The test database as a plain libpq/asyncpg DSN, for connections that bypass the code."""
    return _libpq(db_url)


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def chatlog_env(db_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for running the `chatlog` CLI against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(CHATLOG_DATABASE_URL=db_url, CHATLOG_DATA_DIR=str(tmp_path / "data"), CHATLOG_MASTER_KEY=MASTER_KEY)
    yield env


@pytest.fixture(scope="module")
async def api(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """`chatlog serve` as a subprocess on a database of its own, shared by one test module."""
    from tests.support import serve_api

    async for client in serve_api(databases, tmp_path_factory):
        yield client
