"""The schema comes and goes with alembic, and `chatlog migrate` drives it."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from service.database import current_revision, downgrade, head_revision, make_engine, migrate
from tests.keys import KEYRING

TABLE_EXISTS = "SELECT to_regclass('events') IS NOT NULL"


async def test_upgrade_head_downgrade_base_and_upgrade_again(databases: object, raw_dsn: str, db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1)
    try:
        assert await current_revision(engine) == head_revision()
        await downgrade(engine, "base", keyring=KEYRING)
        assert await current_revision(engine) is None
        conn = await asyncpg.connect(raw_dsn)
        try:
            assert await conn.fetchval(TABLE_EXISTS) is False
            assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'events_reject_change'") == 0
        finally:
            await conn.close()
        await migrate(engine, keyring=KEYRING)
        await migrate(engine, keyring=KEYRING)  # idempotent
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_chatlog_migrate_command_upgrades_and_downgrades(chatlog_env: dict[str, str], raw_dsn: str) -> None:
    def chatlog(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=chatlog_env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    down = chatlog("migrate", "--downgrade", "base")
    assert down.returncode == 0, down.stderr
    conn = await asyncpg.connect(raw_dsn)
    try:
        assert await conn.fetchval(TABLE_EXISTS) is False
        up = chatlog("migrate")
        assert up.returncode == 0, up.stderr
        assert await conn.fetchval(TABLE_EXISTS) is True
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == head_revision()
    finally:
        await conn.close()
