"""Drill: the log outlives its cluster. A source server whose transaction ids are far ahead
(`pg_resetwal -e 2`: epoch 2, ids above 2**33) is written through the API by several users,
dumped with pg_dump and restored into a fresh server whose ids start near zero, then served
again: every earlier read is the same, new appends are answered, projected at once and come
after the history in the feed, `chatlog verify` exits 0, a restart changes nothing; and the same
after a second restore of the restored database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.clusters import Cluster, chatlog_env, pages, require_pg_bin
from tests.support import Api, Served, _free_port, auth, new_user, serve

pytestmark = pytest.mark.cluster


async def everything(api: Api, users: list[str]) -> dict[str, Any]:
    """Every read of each user: conversations, each one's messages, the event feed."""
    seen: dict[str, Any] = {}
    for user in users:
        conversations = await pages(api, user, "/v1/conversations", limit=100)
        seen[user] = {
            "conversations": conversations,
            "messages": {
                c["id"]: await pages(api, user, f"/v1/conversations/{c['id']}/messages") for c in conversations
            },
            "feed": await pages(api, user, "/v1/events", limit=100),
        }
    return seen


def restored(source: Cluster, bin_dir: Path) -> Cluster:
    """A fresh cluster holding a pg_dump of the source's `chatlog` database."""
    dump = source.base / "chatlog.dump"
    source._run(str(bin_dir / "pg_dump"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
                "-Fc", "-f", str(dump), "chatlog")  # fmt: skip
    target = Cluster(bin_dir).init()
    target.start()
    target.psql("CREATE DATABASE chatlog")
    target._run(str(bin_dir / "pg_restore"), "-h", "127.0.0.1", "-p", str(target.port), "-U", "postgres",
                "-d", "chatlog", str(dump))  # fmt: skip
    return target


async def check_served(
    cluster: Cluster, tmp: Path, users: list[str], before: dict[str, Any], cursors: dict[str, str]
) -> dict[str, Any]:
    """Serve the restored database: the same reads, new appends projected and last in the feed,
    verify clean, and the same again after a restart. Returns the reads at the end."""
    newest = int(cluster.psql("SELECT max(tx_id)::text FROM events", "chatlog"))
    server = int(cluster.psql("SELECT pg_current_xact_id()::text", "chatlog"))
    assert newest > server, "the drill's premise: the restored ids are above the new server's"
    env = chatlog_env(cluster.url("chatlog"), tmp / "data")
    served: Served = serve(env, _free_port(), tmp / f"serve-{cluster.port}.log")
    api = Api(served.base_url, cluster.url("chatlog"))
    try:
        assert await everything(api, users) == before
        user = users[0]  # a feed cursor handed out before the restore still walks on after it
        r = await api.client.get("/v1/events", params={"cursor": cursors[user]}, headers=auth(user))
        assert r.status_code == 200, r.text
        assert r.json()["data"] == before[user]["feed"][2:]
        for user in users:
            cid = before[user]["conversations"][0]["id"]
            said = await api.say(user, cid, f"after the restore, {user}")
            messages = await pages(api, user, f"/v1/conversations/{cid}/messages")
            assert messages[-1]["id"] == said["id"]
            feed = await pages(api, user, "/v1/events", limit=100)
            assert feed[: len(before[user]["feed"])] == before[user]["feed"]  # history first
            assert feed[-1]["position"] == said["position"]  # then the new event
        after = await everything(api, users)
    finally:
        await api.client.aclose()
        out = served.stop()
    assert "Traceback" not in out, out[-3000:]
    for command in ("replay", "verify"):  # a rebuild from the log in its order equals the live tables
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", command], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
    again = serve(env, _free_port(), tmp / f"serve-{cluster.port}-again.log")
    api = Api(again.base_url, cluster.url("chatlog"))
    try:
        assert await everything(api, users) == after  # a restart changes nothing
    finally:
        await api.client.aclose()
        again.stop()
    return after


async def test_a_dump_restored_into_a_fresh_server_keeps_its_history_and_orders_new_events_after_it(
    tmp_path: Path,
) -> None:
    bin_dir = require_pg_bin()
    source = Cluster(bin_dir).init()
    source._run(str(bin_dir / "pg_resetwal"), "-e", "2", str(source.data))  # ids above 2**33
    source.start()
    source.psql("CREATE DATABASE chatlog")
    clusters = [source]
    try:
        served = serve(
            chatlog_env(source.url("chatlog"), tmp_path / "data"), _free_port(), tmp_path / "serve-source.log"
        )
        api = Api(served.base_url, source.url("chatlog"))
        users = [new_user() for _ in range(3)]
        try:
            for user in users:
                kept = await api.create(user, title="kept")
                for n in range(3):
                    await api.say(user, kept["id"], f"message {n} of {user}")
                renamed = await api.create(user, title="before")
                await api.say(user, renamed["id"], "in the renamed one")
                r = await api.client.patch(
                    f"/v1/conversations/{renamed['id']}", json={"title": "after"}, headers=auth(user)
                )
                assert r.status_code == 200
                gone = await api.create(user, title="deleted")
                r = await api.client.delete(f"/v1/conversations/{gone['id']}", headers=auth(user))
                assert r.status_code == 204
            before = await everything(api, users)
            cursors = {}
            for user in users:
                r = await api.client.get("/v1/events", params={"limit": 2}, headers=auth(user))
                cursors[user] = r.json()["next_cursor"]
        finally:
            await api.client.aclose()
            served.stop()
        assert {c["title"] for c in before[users[0]]["conversations"]} == {"kept", "after"}

        first = restored(source, bin_dir)
        clusters.append(first)
        after_first = await check_served(first, tmp_path, users, before, cursors)
        second = restored(first, bin_dir)  # the restored database, restored once more
        clusters.append(second)
        await check_served(second, tmp_path, users, after_first, cursors)
    finally:
        for cluster in clusters:
            cluster.destroy()
