"""A user always reads their own writes (API.md), with no parameter: every read waits until the
read models hold the caller's newest event, found in the database, so that a write answered by
another instance of the service counts too."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Databases
from tests.keys import MASTER_KEY
from tests.support import SECRET, Api, Served, _free_port, auth, new_user, serve, serve_api


@pytest.fixture(scope="module")
async def two(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Api, Api]]:
    """Two `chatlog serve` instances on one database: A runs the projection worker, B does not."""
    async for first in serve_api(databases, tmp_path_factory, CHATLOG_READ_WAIT_SECONDS="5"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
        env.update(
            CHATLOG_DATABASE_URL=first.db_url,
            CHATLOG_DATA_DIR=str(tmp_path_factory.mktemp("second-data")),
            CHATLOG_JWT_SECRET=SECRET,
            CHATLOG_MASTER_KEY=MASTER_KEY,
            CHATLOG_RUN_WORKERS="false",
            CHATLOG_READ_WAIT_SECONDS="5",
            CHATLOG_LOG_LEVEL="WARNING",
        )
        port = _free_port()
        served: Served = serve(env, port, tmp_path_factory.mktemp("second-log") / "serve.log")
        second = Api(served.base_url, first.db_url)
        try:
            yield first, second
        finally:
            await second.client.aclose()
            out = served.stop()
            assert "Traceback" not in out, out


@pytest.fixture
async def load(two: tuple[Api, Api]) -> AsyncIterator[Any]:
    """Background writes by other users through both instances, until the test ends."""
    stop = asyncio.Event()

    async def writer(api: Api) -> int:
        user = new_user()
        conversation = await api.create(user)
        count = 0
        while not stop.is_set():
            await api.say(user, conversation["id"], f"noise {count}")
            count += 1
        return count

    tasks = [asyncio.ensure_future(writer(api)) for api in two for _ in range(3)]
    yield tasks
    stop.set()
    await asyncio.gather(*tasks)


async def test_a_reader_sees_each_of_its_writes_at_once_under_load_without_min_position(
    two: tuple[Api, Api], load: Any
) -> None:
    a, b = two
    user = new_user()
    conversation = await a.create(user)
    cid = conversation["id"]
    for i in range(40):
        writer, reader = (a, b) if i % 2 else (b, a)  # written through one instance, read through the other
        said = await writer.say(user, cid, f"mine number {i} quokka{i}")
        messages = await reader.client.get(f"/v1/conversations/{cid}/messages?order=desc&limit=1", headers=auth(user))
        assert messages.status_code == 200, messages.text
        assert messages.json()["data"][0]["id"] == said["id"], f"write {i} missing from the next read"
        got = (await reader.client.get(f"/v1/conversations/{cid}", headers=auth(user))).json()
        assert got["message_count"] == i + 1 and got["version"] == i + 2
        listed = (await reader.client.get("/v1/conversations", headers=auth(user))).json()["data"]
        assert listed[0]["id"] == cid and listed[0]["message_count"] == i + 1
        hits = (await reader.client.get(f"/v1/search?q=quokka{i}", headers=auth(user))).json()["data"]
        assert [h["message"]["id"] for h in hits] == [said["id"]]
        feed = (await reader.client.get(f"/v1/events?after={said['position'] - 1}", headers=auth(user))).json()
        assert said["position"] in [e["position"] for e in feed["data"]]
    assert all(not t.done() for t in load), "a background writer failed"


async def test_a_rename_and_a_delete_are_read_at_once(two: tuple[Api, Api]) -> None:
    a, b = two
    user = new_user()
    conversation = await a.create(user, title="before")
    r = await a.client.patch(f"/v1/conversations/{conversation['id']}", json={"title": "after"}, headers=auth(user))
    assert r.status_code == 200
    assert (await b.client.get(f"/v1/conversations/{conversation['id']}", headers=auth(user))).json()[
        "title"
    ] == "after"
    r = await b.client.delete(f"/v1/conversations/{conversation['id']}", headers=auth(user))
    assert r.status_code == 204
    assert (await a.client.get(f"/v1/conversations/{conversation['id']}", headers=auth(user))).status_code == 404
    assert (await a.client.get("/v1/conversations", headers=auth(user))).json()["data"] == []


async def test_a_user_with_no_writes_reads_at_once(two: tuple[Api, Api]) -> None:
    a, _ = two
    r = await a.client.get("/v1/conversations", headers=auth(new_user()))
    assert r.status_code == 200 and r.json()["data"] == []
