"""Read replicas (README, "Read replicas"): a primary and a physical standby of it made here,
`chatlog serve` on the primary with CHATLOG_READ_DATABASE_URL naming the standby. The read
routes read from the standby, a user's reads never miss what they just wrote (they wait on the
standby's copy of the checkpoint), the standby's lag is in /readyz and /metrics, and a standby
that cannot be reached makes the reads answer 503, not 500, while the writes go on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest

from service.settings import Settings, SettingsError
from tests.clusters import Cluster, chatlog_env, require_pg_bin, standby_of
from tests.support import Api, _free_port, assert_problem, auth, new_user, serve


class Replicated(NamedTuple):
    api: Api
    primary: Cluster
    standby: Cluster


@pytest.fixture(scope="module")
async def replicated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicated]:
    primary = Cluster(require_pg_bin()).init()
    primary.start()
    standby = standby_of(primary)
    with (standby.data / "postgresql.conf").open("a") as conf:
        conf.write("hot_standby_feedback = on\n")  # no read cancelled by a vacuum on the primary
    standby.start()
    tmp = tmp_path_factory.mktemp("replica")
    env = chatlog_env(primary.url(), tmp / "data", CHATLOG_READ_DATABASE_URL=standby.url())
    env["CHATLOG_READ_WAIT_SECONDS"] = "2"
    served = serve(env, _free_port(), tmp / "serve.log")
    api = Api(served.base_url, primary.url())
    try:
        yield Replicated(api, primary, standby)
    finally:
        await api.client.aclose()
        out = served.stop()
        primary.destroy()
        standby.destroy()
        assert "Traceback" not in out, out[-5000:]


async def messages(api: Api, user: str, cid: str, **params: Any) -> Any:
    return await api.client.get(f"/v1/conversations/{cid}/messages", params=params, headers=auth(user))


async def metric(api: Api, name: str) -> float:
    text = (await api.client.get("/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert values, f"no {name} in /metrics"
    return values[0]


def test_the_read_database_url_is_checked_like_the_database_url() -> None:
    settings = Settings.from_env({"CHATLOG_READ_DATABASE_URL": "postgresql://u@standby:5432/db?sslmode=require"})
    assert settings.read_database_url == "postgresql+asyncpg://u@standby:5432/db?ssl=require"
    assert Settings.from_env({}).read_database_url is None
    with pytest.raises(SettingsError, match="CHATLOG_READ_DATABASE_URL"):
        Settings.from_env({"CHATLOG_READ_DATABASE_URL": "mysql://u@standby/db"})


@pytest.mark.cluster
async def test_reads_come_from_the_standby_and_wait_for_its_replay(replicated: Replicated) -> None:
    api, primary, standby = replicated
    user, other = new_user(), new_user()
    cid = (await api.create(user))["id"]
    before = await api.say(user, cid, "before the pause")
    other_cid = (await api.create(other))["id"]
    await api.say(other, other_cid, "the other's")
    assert (await messages(api, other, other_cid)).status_code == 200
    connected = standby.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatlog'")
    assert int(connected) > 0, "no connection of chatlog's on the standby"

    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        deadline = time.monotonic() + 10
        while standby.psql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "the standby's replay did not pause"
            await asyncio.sleep(0.05)
        written = await api.say(user, cid, "during the pause")
        # The primary's read tables hold it soon; the standby's cannot: the read waits, then 503.
        checkpoint = "SELECT position FROM projection_checkpoints WHERE name = 'conversations'"
        while int(primary.psql(checkpoint)) < written["position"]:
            assert time.monotonic() < deadline, "the projection did not catch up on the primary"
            await asyncio.sleep(0.05)
        assert_problem(await messages(api, user, cid), 503, "not_ready")
        # Another user, with nothing of theirs left to replay, reads on.
        r = await messages(api, other, other_cid)
        assert r.status_code == 200 and [m["content"] for m in r.json()["data"]] == ["the other's"]

        r = await api.client.get("/readyz")
        assert r.status_code == 200, r.text
        lag = r.json()["replica"]
        assert lag["status"] == "ok" and lag["lag_bytes"] > 0 and lag["lag_seconds"] > 0, lag
        assert await metric(api, "chatlog_replica_lag_bytes") > 0
        assert await metric(api, "chatlog_replica_lag_seconds") > 0
        assert await metric(api, "chatlog_replica_up") == 1
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")

    r = await messages(api, user, cid)
    assert r.status_code == 200, r.text
    assert [m["content"] for m in r.json()["data"]] == ["before the pause", "during the pause"]
    r = await messages(api, user, cid, as_of=before["position"])  # folded from the standby's log
    assert r.status_code == 200 and [m["content"] for m in r.json()["data"]] == ["before the pause"], r.text
    deadline = time.monotonic() + 10
    while (lag := (await api.client.get("/readyz")).json()["replica"])["lag_bytes"] != 0:
        assert time.monotonic() < deadline, f"the standby did not catch up: {lag}"
        await asyncio.sleep(0.1)
    assert lag["lag_seconds"] == 0


@pytest.mark.cluster
async def test_own_writes_are_never_stale_on_the_standby(replicated: Replicated) -> None:
    api = replicated.api
    rounds = 25

    async def writer(k: int) -> int:
        user = new_user()
        cid = (await api.create(user, title=f"writer {k}"))["id"]
        stale = 0
        for i in range(rounds):
            written = await api.say(user, cid, f"word{k}x{i} from writer {k}")
            r = await messages(api, user, cid, order="desc", limit=1)
            assert r.status_code == 200, r.text
            stale += r.json()["data"][0]["id"] != written["id"]
            if i % 5 == 0:
                r = await api.client.get("/v1/conversations", headers=auth(user))
                assert r.status_code == 200, r.text
                stale += r.json()["data"][0]["message_count"] != i + 1
                r = await api.client.get("/v1/search", params={"q": f"word{k}x{i}"}, headers=auth(user))
                assert r.status_code == 200, r.text
                stale += [h["message"]["id"] for h in r.json()["data"]] != [written["id"]]
        return stale

    stale = await asyncio.gather(*(writer(k) for k in range(6)))
    assert sum(stale) == 0, f"stale reads per writer: {stale}"


@pytest.mark.cluster
async def test_an_unreachable_standby_makes_reads_503_and_writes_go_on(replicated: Replicated) -> None:
    api, _, standby = replicated
    user = new_user()
    cid = (await api.create(user))["id"]
    await asyncio.to_thread(standby.stop, "fast")
    try:
        r = await api.client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["replica"]["status"] == "unavailable" and r.json()["database"] == "ok"
        assert await metric(api, "chatlog_replica_up") == 0
        for _ in range(3):  # the pool's idle connections to it, then new ones: all refused
            assert_problem(await messages(api, user, cid), 503, "not_ready")
        await api.say(user, cid, "while the standby is down")
        r = await api.client.get("/v1/events", headers=auth(user))  # the feed reads the primary
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
    finally:
        await asyncio.to_thread(standby.start)
    deadline = time.monotonic() + 30
    while (r := await messages(api, user, cid)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)
    assert [m["content"] for m in r.json()["data"]] == ["while the standby is down"]
    assert (await api.client.get("/readyz")).status_code == 200
