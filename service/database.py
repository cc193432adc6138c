"""Where the database is: a configured server, or an embedded PostgreSQL under the data directory.

Also runs the alembic migrations, from inside a running event loop (the cookbook's
connection-sharing recipe) so that `chatlog serve` can migrate before it listens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from alembic import command
from service.sealing import Keyring

log = logging.getLogger(__name__)

_embedded: dict[Path, Any] = {}


def embedded_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under `data_dir/postgres` and return its URL.

    The server keeps running while this process lives and is stopped at its exit (pgserver
    counts the processes that use one data directory and stops it with the last of them).
    """
    import pgserver  # imported here: only the embedded mode needs it

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "postgres"
    server = _embedded.get(pgdata)
    if server is None:
        log.info("starting embedded PostgreSQL in %s", pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        _embedded[pgdata] = server
    return asyncpg_url(server.get_uri())


def asyncpg_url(libpq_uri: str) -> str:
    """`postgresql://user:@/db?host=/socket/dir` -> the SQLAlchemy asyncpg form."""
    parts = urlsplit(libpq_uri)
    host = parse_qs(parts.query).get("host", [""])[0]
    user = parts.username or "postgres"
    database = parts.path.lstrip("/") or "postgres"
    return f"postgresql+asyncpg://{user}@/{database}?host={host}"


def make_engine(url: str, *, pool_size: int = 20, **kwargs: Any) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        **kwargs,
    )


def migrations_dir() -> Path:
    """The alembic script directory: packaged in the wheel, or the checkout's `alembic/`."""
    packaged = Path(__file__).parent / "_migrations"
    if (packaged / "env.py").exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "alembic"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def migrate(engine: AsyncEngine, revision: str = "head", *, keyring: Keyring | None = None) -> None:
    """Upgrade the schema to `revision`, serialized by an advisory lock across processes.
    Sealing a log that holds events (0007) needs the master key: `keyring`. At head, a database
    with the `citus` extension is then distributed (service/citus.py), once."""
    await _run_alembic(engine, lambda cfg: command.upgrade(cfg, revision), keyring)
    if revision == "head":
        from service.citus import distribute

        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            await distribute(raw.driver_connection)


async def downgrade(engine: AsyncEngine, revision: str = "base", *, keyring: Keyring | None = None) -> None:
    await _run_alembic(engine, lambda cfg: command.downgrade(cfg, revision), keyring)


_MIGRATION_LOCK = 0x63686C6D  # "chlm": one migration at a time across processes


async def _run_alembic(engine: AsyncEngine, action: Any, keyring: Keyring | None) -> None:
    def run(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        cfg.attributes["keyring"] = keyring
        action(cfg)

    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        await conn.run_sync(run)


async def check_search_config(url: str, config: str) -> None:
    """Refuse to start with a text-search configuration the server does not have: otherwise the
    projection would stop at the first message and every search would fail."""
    import asyncpg

    from service.connections import connect_args
    from service.settings import SettingsError

    conn = await asyncpg.connect(**connect_args(url))
    try:
        await conn.fetchval("SELECT $1::regconfig", config)
    except asyncpg.PostgresError as exc:  # no such configuration, a malformed name, ...
        raise SettingsError(
            f"CHATLOG_SEARCH_CONFIG: {exc}; the server's configurations are listed by SELECT cfgname FROM pg_ts_config"
        ) from None
    finally:
        await conn.close()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
        if not exists:
            return None
        rev: str | None = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        return rev
