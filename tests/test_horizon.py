"""Drill: a transaction held open anywhere on the server holds every projection back (the horizon
is the server's). chatlog says so (`horizon_held_seconds` in /readyz and /metrics, a warning
naming the holder), reads of the user's own newest write answer 503 `not_ready` after the wait
(never 500, never a stale list without saying so), and all catches up once it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import Databases, _libpq
from tests.support import Api, assert_problem, auth, new_user, serve_api


@pytest.fixture(scope="module")
async def watched(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    async for client in serve_api(
        databases, tmp_path_factory, CHATLOG_HORIZON_WARN_SECONDS="1", CHATLOG_READ_WAIT_SECONDS="1"
    ):
        yield client


async def test_a_held_transaction_is_reported_and_reads_say_not_ready_until_it_ends(watched: Api) -> None:
    user = new_user()
    cid = (await watched.create(user))["id"]
    await watched.say(user, cid, "before the hold")
    assert (await watched.client.get("/readyz")).json()["horizon_held_seconds"] < 1

    holder = await asyncpg.connect(_libpq(watched.db_url), server_settings={"application_name": "long-report"})
    transaction = holder.transaction()
    await transaction.start()
    await holder.fetchval("SELECT pg_current_xact_id()")  # it now has an id: the horizon stops at it
    try:
        said = await watched.say(user, cid, "during the hold")
        r = await watched.client.get(f"/v1/conversations/{cid}/messages", headers=auth(user))
        assert_problem(r, 503, "not_ready")
        assert r.headers["Retry-After"]
        await asyncio.sleep(2.5)
        ready = (await watched.client.get("/readyz")).json()
        assert ready["horizon_held_seconds"] >= 2
        assert ready["horizon_holder"]["application_name"] == "long-report"
        assert ready["horizon_holder"]["state"] == "idle in transaction"
        metrics = (await watched.client.get("/metrics")).text
        held = next(line for line in metrics.splitlines() if line.startswith("chatlog_horizon_held_seconds "))
        assert float(held.split()[1]) >= 2
    finally:
        await transaction.commit()
        await holder.close()

    started = time.monotonic()
    r = await watched.client.get(f"/v1/conversations/{cid}/messages", headers=auth(user))
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]][-1] == said["id"]
    assert time.monotonic() - started < 2
    assert (await watched.client.get("/readyz")).json()["horizon_held_seconds"] < 1
    assert watched.log is not None
    log = watched.log.read_text()
    assert "held back by a transaction open for" in log and "'long-report'" in log
