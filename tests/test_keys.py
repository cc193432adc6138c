"""The master key: `chatlog keys rotate` re-wraps every data key under a new one while the service
is under load, and a wrong, missing or malformed master key stops `serve` at once, with words."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from service.sealing import master_key_id, new_master_key, parse_master_keys
from tests.clusters import Appends, pages
from tests.conftest import Databases, _libpq
from tests.keys import MASTER_KEY
from tests.support import Api, _free_port, auth, chatlog, new_user, serve
from tests.test_sealing_migration import env_for

OLD = MASTER_KEY


async def master_ids(db_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(_libpq(db_url))
    try:
        return {r[0]: r[1] for r in await conn.fetch("SELECT master_id, count(*) FROM data_keys GROUP BY master_id")}
    finally:
        await conn.close()


async def test_keys_rotate_under_load_loses_nothing_and_leaves_everything_readable(
    databases: Databases, tmp_path: Path
) -> None:
    new = new_master_key()
    new_id, old_id = master_key_id(parse_master_keys(new)[0]), master_key_id(parse_master_keys(OLD)[0])
    db_url, user, port = await databases.create(), new_user(), _free_port()
    served = serve(env_for(db_url, tmp_path / "d1", CHATLOG_MASTER_KEY=OLD), port, tmp_path / "one.log")
    api = Api(served.base_url, db_url)
    try:
        conversations = [(await api.create(user, title=f"before {i}"))["id"] for i in range(300)]
    finally:
        await api.client.aclose()
        served.stop()
    assert await master_ids(db_url) == {old_id: 300}

    # The new key first, the old one after it: the service wraps with the new, opens with both.
    both = env_for(db_url, tmp_path / "d2", CHATLOG_MASTER_KEY=f"{new},{OLD}")
    served = serve(both, port, tmp_path / "two.log")
    api = Api(served.base_url, db_url)
    created: list[str] = []
    try:
        load = Appends(api, user, conversations[:8], "rotating")
        stop = asyncio.Event()

        async def create() -> None:
            while not stop.is_set():
                created.append((await api.create(user, title="during"))["id"])

        creating = asyncio.ensure_future(create())
        await asyncio.sleep(0.3)
        rotated = await asyncio.to_thread(chatlog, both, "keys", "rotate")
        await asyncio.sleep(0.3)
        stop.set()
        await creating
        await load.stop()
    finally:
        await api.client.aclose()
        out = served.stop()
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 300 data key(s)" in rotated.stdout, rotated.stdout
    assert "Traceback" not in out, out[-3000:]
    assert load.acknowledged() and not load.failures()
    assert await master_ids(db_url) == {new_id: 300 + len(created)}

    # The old key gone: everything opens with the new one alone.
    only_new = env_for(db_url, tmp_path / "d3", CHATLOG_MASTER_KEY=new)
    served = serve(only_new, port, tmp_path / "three.log")
    api = Api(served.base_url, db_url)
    try:
        listed = await pages(api, user, "/v1/conversations", limit=100)
        assert {c["id"] for c in listed} == set(conversations) | set(created)
        for cid in conversations[:8]:
            messages = await pages(api, user, f"/v1/conversations/{cid}/messages")
            acknowledged = [m["id"] for m in load.acknowledged() if m["conversation_id"] == cid]
            assert [m["id"] for m in messages] == acknowledged  # each once, in order
        r = await api.client.get(f"/v1/conversations/{conversations[-1]}", headers=auth(user))
        assert r.json()["title"] == "before 299"
    finally:
        await api.client.aclose()
        served.stop()
    verified = chatlog(only_new, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_wrong_missing_or_malformed_master_key_stops_serve_with_words(
    databases: Databases, tmp_path: Path
) -> None:
    db_url = await databases.create()
    served = serve(env_for(db_url, tmp_path / "d", CHATLOG_MASTER_KEY=OLD), _free_port(), tmp_path / "ok.log")
    api = Api(served.base_url, db_url)
    try:
        await api.create(new_user(), title="sealed")
    finally:
        await api.client.aclose()
        served.stop()
    for name, env in (
        ("wrong", env_for(db_url, tmp_path / "d", CHATLOG_MASTER_KEY=new_master_key())),
        ("missing", env_for(db_url, tmp_path / "fresh")),  # no key set: one is generated, and it is not this one
        ("malformed", env_for(db_url, tmp_path / "d", CHATLOG_MASTER_KEY="not-a-key")),
    ):
        result = chatlog(env, "serve", "--port", str(_free_port()))
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert "CHATLOG_MASTER_KEY" in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
    for command in ("verify", "replay", "migrate"):
        result = chatlog(env_for(db_url, tmp_path / "d", CHATLOG_MASTER_KEY=new_master_key()), command)
        assert result.returncode == 2 and "CHATLOG_MASTER_KEY" in result.stderr, (command, result.stderr)
