"""Migration 0007 seals a log written by the previous release: the release before sealing itself
(its code, from this repository's history) serves a database and is written to through its API;
then this release migrates it. Content leaves the log's clear columns, a conversation deleted
before is erased on the way, every read answers as before, idempotency keys still replay, and
`chatlog verify` agrees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.clusters import pages
from tests.conftest import Databases, _libpq
from tests.keys import MASTER_KEY
from tests.support import SECRET, Api, _free_port, assert_problem, auth, new_user, serve
from tests.test_erasure import tables_holding

PREVIOUS_RELEASE = "447f0fb"  # main before sealing (schema 0006_log_clock)
ROOT = Path(__file__).resolve().parent.parent


def previous_release(into: Path) -> Path:
    """The previous release's source tree, from git."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the previous release's code is not in this checkout's git history: {exc}")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def env_for(db_url: str, data: Path, **more: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    return env | {
        "CHATLOG_DATABASE_URL": db_url,
        "CHATLOG_DATA_DIR": str(data),
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_PROJECTION_POLL_INTERVAL": "0.05",
        "CHATLOG_LOG_LEVEL": "WARNING",
        **more,
    }


BRANCH_FIELDS = ("parent_id", "active_leaf_id", "forked_from")  # added by this release (branches)


def as_before(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in BRANCH_FIELDS}


async def reads(api: Api, users: list[str]) -> dict[str, Any]:
    """Every read of each user, as the previous release answered them (the fields this release
    added are checked on their own: every stored conversation is one linear branch)."""
    seen: dict[str, Any] = {}
    for user in users:
        conversations = await pages(api, user, "/v1/conversations", limit=100)
        messages = {c["id"]: await pages(api, user, f"/v1/conversations/{c['id']}/messages") for c in conversations}
        for c in conversations:
            listed = messages[c["id"]]
            if "active_leaf_id" in c:  # this release: the upgraded log reads as one branch per conversation
                assert [m["parent_id"] for m in listed] == [None] + [m["id"] for m in listed[:-1]]
                assert c["active_leaf_id"] == (listed[-1]["id"] if listed else None)
                assert await pages(api, user, f"/v1/conversations/{c['id']}/messages", tree="true") == listed
        seen[user] = {
            "conversations": [as_before(c) for c in conversations],
            "messages": {cid: [as_before(m) for m in ms] for cid, ms in messages.items()},
        }
    return seen


async def test_the_previous_releases_log_is_sealed_and_reads_as_before(databases: Databases, tmp_path: Path) -> None:
    old_code = previous_release(tmp_path / "previous")
    db_url = await databases.create()
    users, kept, gone = [new_user(), new_user()], "mkkept0a1b2c3d", "mkgone4e5f6a7b"
    old = serve(env_for(db_url, tmp_path / "old-data"), port := _free_port(), tmp_path / "old.log", cwd=old_code)
    api = Api(old.base_url, db_url)
    try:
        for n, user in enumerate(users):
            c = await api.create(user, title=f"title {kept}", metadata={"note": f"note {kept}"})
            for i in range(3):
                r = await api.client.post(
                    f"/v1/conversations/{c['id']}/messages",
                    json={"role": "user", "content": f"{kept} {n} {i}"},
                    headers={**auth(user), "Idempotency-Key": f"key-{kept}-{n}-{i}"},
                )
                assert r.status_code == 201, r.text
            doomed = await api.create(user, title=f"title {gone}")
            await api.say(user, doomed["id"], f"said {gone}")
            r = await api.client.delete(f"/v1/conversations/{doomed['id']}", headers=auth(user))
            assert r.status_code == 204
        before = await reads(api, users)
        first_answer = (
            await pages(api, users[0], f"/v1/conversations/{before[users[0]]['conversations'][0]['id']}/messages")
        )[0]
    finally:
        await api.client.aclose()
        old.stop()
    dsn = _libpq(db_url)
    assert "events.data" in await tables_holding(dsn, gone), "the premise: the old release kept deleted content"

    new = serve(env_for(db_url, tmp_path / "new-data", CHATLOG_MASTER_KEY=MASTER_KEY), port, tmp_path / "new.log")
    api = Api(new.base_url, db_url)
    try:
        assert await reads(api, users) == before
        holding = await tables_holding(dsn, kept)
        assert holding and not [t for t in holding if t.startswith(("events.", "idempotency_keys."))], holding
        assert await tables_holding(dsn, gone) == []  # the deleted conversation was erased on the way
        user = users[0]
        cid = before[user]["conversations"][0]["id"]
        r = await api.client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": f"{kept} 0 0"},
            headers={**auth(user), "Idempotency-Key": f"key-{kept}-0-0"},
        )
        assert r.status_code == 201 and r.headers.get("Idempotent-Replayed") == "true"
        assert as_before(r.json()) == first_answer
        r = await api.client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": "another body"},
            headers={**auth(user), "Idempotency-Key": f"key-{kept}-0-0"},
        )
        assert_problem(r, 422, "idempotency_mismatch")
        feed = await pages(api, user, "/v1/events", limit=100)
        assert sum(1 for e in feed if e.get("erased")) == 2  # the deleted conversation's start and message
        said = await api.say(user, cid, "after the upgrade")
        assert (await pages(api, user, f"/v1/conversations/{cid}/messages"))[-1]["id"] == said["id"]
    finally:
        await api.client.aclose()
        out = new.stop()
    assert "Traceback" not in out, out[-3000:]
    verified = subprocess.run(
        [sys.executable, "-m", "service.cli", "verify"],
        env=env_for(db_url, tmp_path / "new-data", CHATLOG_MASTER_KEY=MASTER_KEY),
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
