"""Deleting is erasing (API.md; DESIGN.md, "Erasure: crypto-shredding"): content is sealed in the
log, and deleting a conversation, or a whole user, leaves none of it anywhere: no table of the
database, no pg_dump, no API or MCP answer, no replay or verify output."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tests.conftest import _libpq
from tests.support import Api, assert_problem, auth, new_user

PG_BIN = Path(__import__("pgserver").__file__).parent / "pginstall" / "bin"


def dsn(api: Api) -> str:
    return _libpq(api.db_url)


async def tables_holding(dsn_: str, marker: str) -> list[str]:
    """`table.column` of every column of every table (cast to text; bytea searched as bytes)
    that holds `marker` anywhere."""
    conn = await asyncpg.connect(dsn_)
    try:
        columns = await conn.fetch(
            "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
            "AND table_name IN (SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE')"
        )
        found = []
        for schema, table, column, data_type in columns:
            if data_type == "bytea":
                test = f"position(convert_to($1, 'UTF8') IN \"{column}\") > 0"
            else:
                test = f"\"{column}\"::text ILIKE '%' || $1 || '%'"
            if await conn.fetchval(f'SELECT EXISTS (SELECT FROM "{schema}"."{table}" WHERE {test})', marker):
                found.append(f"{table}.{column}")
        return found
    finally:
        await conn.close()


def pg_dump(dsn_: str) -> str:
    """The database as pg_dump writes it (plain SQL, data included)."""
    result = subprocess.run(
        [str(PG_BIN / "pg_dump"), "--dbname", dsn_], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout


def chatlog(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    assert api.log is not None
    from tests.keys import MASTER_KEY

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CHATLOG_")} | {
        "CHATLOG_DATABASE_URL": api.db_url,
        "CHATLOG_MASTER_KEY": MASTER_KEY,
        "CHATLOG_DATA_DIR": str(api.log.parent),
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


async def everything_said(api: Api, user: str) -> str:
    """Every answer the API gives the user, as one text: conversations, messages, feed, search."""
    texts = []
    for path in ("/v1/conversations", "/v1/events"):
        r = await api.client.get(path, params={"limit": 100}, headers=auth(user))
        assert r.status_code == 200, r.text
        texts.append(r.text)
        if path == "/v1/conversations":
            for c in r.json()["data"]:
                m = await api.client.get(f"/v1/conversations/{c['id']}/messages", headers=auth(user))
                texts.append(m.text)
    return "\n".join(texts)


async def written(api: Api, user: str, marker: str, n: int = 0) -> dict[str, Any]:
    """A conversation whose title, metadata, messages and idempotency keys all carry `marker`."""
    r = await api.client.post(
        "/v1/conversations",
        json={"title": f"title {marker}", "metadata": {"note": f"meta {marker}"}},
        headers={**auth(user), "Idempotency-Key": f"create-{marker}-{n}"},
    )
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers, r.text
    conversation = r.json()
    for i in range(3):
        r = await api.client.post(
            f"/v1/conversations/{conversation['id']}/messages",
            json={"role": "user", "content": f"words {marker} {i}", "metadata": {"tag": f"tag {marker}"}},
            headers={**auth(user), "Idempotency-Key": f"say-{marker}-{n}-{i}"},
        )
        assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers, r.text
    return dict(conversation)


def marker() -> str:
    return f"mk{uuid.uuid4().hex[:16]}"


async def test_content_is_never_in_the_log_in_clear(api: Api) -> None:
    user, mark = new_user(), marker()
    await written(api, user, mark)
    assert await tables_holding(dsn(api), mark) != [], "the read tables hold it (the test can see a marker)"
    assert [t for t in await tables_holding(dsn(api), mark) if t.split(".")[0] in ("events", "idempotency_keys")] == []
    r = await api.client.get("/v1/search", params={"q": mark}, headers=auth(user))
    assert len(r.json()["data"]) == 3  # and the service reads it all the same


async def test_deleting_a_conversation_leaves_its_content_nowhere(api: Api) -> None:
    user, other, mark, kept = new_user(), new_user(), marker(), marker()
    doomed = await written(api, user, mark)
    mine = await written(api, user, kept)
    theirs = await written(api, other, kept)
    r = await api.client.delete(f"/v1/conversations/{doomed['id']}", headers=auth(user))
    assert r.status_code == 204
    position = r.headers["Chatlog-Position"]

    assert await tables_holding(dsn(api), mark) == []
    assert mark not in pg_dump(dsn(api))
    assert mark not in await everything_said(api, user)
    for path in (f"/v1/conversations/{doomed['id']}", f"/v1/conversations/{doomed['id']}/messages"):
        assert_problem(await api.client.get(path, headers=auth(user)), 404, "not_found")
    r = await api.client.get("/v1/search", params={"q": mark, "min_position": position}, headers=auth(user))
    assert r.json()["data"] == []
    # The feed keeps the erased events in their places, as structure only.
    feed = await api.client.get("/v1/events", params={"limit": 100}, headers=auth(user))
    events = [e for e in feed.json()["data"] if e["conversation_id"] == doomed["id"]]
    assert [e["type"] for e in events] == ["conversation.started"] + ["message.appended"] * 3 + ["conversation.deleted"]
    assert all(e["erased"] is True and e["data"] is None and e["metadata"] is None for e in events[:-1])
    assert "erased" not in events[-1]
    # The rest is untouched: the user's other conversation, and the other user's.
    for who, conversation in ((user, mine), (other, theirs)):
        m = await api.client.get(f"/v1/conversations/{conversation['id']}/messages", headers=auth(who))
        assert [x["content"] for x in m.json()["data"]] == [f"words {kept} {i}" for i in range(3)]
    # Replay and verify fold the erased events to nothing, and say nothing of them.
    for command in ("replay", "verify"):
        result = chatlog(api, command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert mark not in result.stdout + result.stderr
    assert await tables_holding(dsn(api), mark) == []
    # A retry of the deleted conversation's message under its old key appends nothing.
    r = await api.client.post(
        f"/v1/conversations/{doomed['id']}/messages",
        json={"role": "user", "content": f"words {mark} 0", "metadata": {"tag": f"tag {mark}"}},
        headers={**auth(user), "Idempotency-Key": f"say-{mark}-0-0"},
    )
    assert_problem(r, 404, "not_found")


async def test_mcp_never_sees_an_erased_conversation(api: Api) -> None:
    from tests.test_mcp import call, over_http

    user, mark = new_user(), marker()
    doomed = await written(api, user, mark)
    assert (await api.client.delete(f"/v1/conversations/{doomed['id']}", headers=auth(user))).status_code == 204
    async with over_http(api, user) as client:
        listed = await call(client, "list_conversations")
        found = await call(client, "search_messages", query=mark)
    assert mark not in str(listed) and mark not in str(found)


async def test_erasing_a_user_erases_everything_of_theirs_and_they_can_start_afresh(api: Api) -> None:
    user, other, mark, kept = new_user(), new_user(), marker(), marker()
    for n in range(3):
        await written(api, user, mark, n)
    theirs = await written(api, other, kept)
    r = await api.client.delete("/v1/me", headers=auth(user))
    assert r.status_code == 204, r.text
    position = r.headers["Chatlog-Position"]
    r = await api.client.get("/v1/conversations", params={"min_position": position}, headers=auth(user))
    assert r.json()["data"] == []
    assert await tables_holding(dsn(api), mark) == []
    assert mark not in pg_dump(dsn(api))
    for command in ("replay", "verify"):
        result = chatlog(api, command)
        assert result.returncode == 0 and mark not in result.stdout + result.stderr, result.stdout
    conn = await asyncpg.connect(dsn(api))
    try:
        for table, column in (("data_keys", "user_id"), ("idempotency_keys", "user_id"), ("messages", "user_id")):
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", user) == 0
    finally:
        await conn.close()
    assert mark not in await everything_said(api, user)
    m = await api.client.get(f"/v1/conversations/{theirs['id']}/messages", headers=auth(other))
    assert len(m.json()["data"]) == 3
    # Afresh: an old Idempotency-Key is new again (`written` checks that nothing is a replay).
    again = await written(api, user, mark)
    r = await api.client.get("/v1/conversations", headers=auth(user))
    assert [c["id"] for c in r.json()["data"]] == [again["id"]]
    # Erasing a user with nothing left still answers, with a position.
    await api.client.delete("/v1/me", headers=auth(user))
    r = await api.client.delete("/v1/me", headers=auth(user))
    assert r.status_code == 204 and int(r.headers["Chatlog-Position"]) > 0


async def test_appends_racing_a_deletion_never_leave_a_readable_message(api: Api) -> None:
    user = new_user()
    answers: list[int] = []
    for round_ in range(5):
        mark = marker()
        c = await api.create(user, title="race")

        async def say(i: int, cid: str = c["id"], mark: str = mark) -> None:
            r = await api.client.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": "user", "content": f"{mark} {i}"},
                headers=auth(user),
            )
            answers.append(r.status_code)

        async def delete(cid: str = c["id"], pause: float = 0.01 * round_) -> None:
            await asyncio.sleep(pause)
            r = await api.client.delete(f"/v1/conversations/{cid}", headers=auth(user))
            answers.append(r.status_code)

        await asyncio.gather(*(say(i) for i in range(30)), delete())
        assert await tables_holding(dsn(api), mark) == []
        assert mark not in await everything_said(api, user)
    assert set(answers) <= {201, 204, 404}, answers
    assert 204 in answers and 201 in answers


async def test_the_ledger_erases_again_after_restoring_an_older_backup(api: Api, tmp_path: Path) -> None:
    user, mark, kept = new_user(), marker(), marker()
    doomed = await written(api, user, mark)
    await written(api, user, kept)
    backup = tmp_path / "before.dump"
    subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(backup), "--dbname", dsn(api)], check=True)
    assert (await api.client.delete(f"/v1/conversations/{doomed['id']}", headers=auth(user))).status_code == 204
    ledger = tmp_path / "erasures.jsonl"
    exported = chatlog(api, "erasures", "export", str(ledger))
    assert exported.returncode == 0, exported.stderr
    assert doomed["id"] in ledger.read_text() and mark not in ledger.read_text()

    # Restore the older backup into a database of its own: the erased conversation is back...
    restored = f"{make_url(api.db_url).database}_restored"
    admin = await asyncpg.connect(dsn(api))
    try:
        await admin.execute(f'CREATE DATABASE "{restored}"')
    finally:
        await admin.close()
    restored_url = make_url(api.db_url).set(database=restored).render_as_string(hide_password=False)
    subprocess.run([str(PG_BIN / "pg_restore"), "--dbname", _libpq(restored_url), str(backup)], check=True)
    try:
        assert await tables_holding(_libpq(restored_url), mark) != []
        # ...until the ledger is applied.
        target = Api(api.base_url, restored_url)
        target.log = api.log
        applied = chatlog(target, "erasures", "apply", str(ledger))
        assert applied.returncode == 0, applied.stderr
        assert "1 conversation(s) erased again" in applied.stdout
        assert await tables_holding(_libpq(restored_url), mark) == []
        assert await tables_holding(_libpq(restored_url), kept) != []
        again = chatlog(target, "erasures", "apply", str(ledger))
        assert "0 conversation(s) erased again" in again.stdout  # idempotent
        verified = chatlog(target, "verify")
        assert verified.returncode == 0, verified.stdout
        await target.client.aclose()
    finally:
        admin = await asyncpg.connect(dsn(api))
        try:
            await admin.execute(f'DROP DATABASE "{restored}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_an_operator_erases_a_user_or_a_conversation(api: Api) -> None:
    user, mark, kept = new_user(), marker(), marker()
    one = await written(api, user, mark)
    await written(api, user, kept)
    result = chatlog(api, "erase", "--conversation", one["id"])
    assert result.returncode == 0, result.stderr
    assert await tables_holding(dsn(api), mark) == []
    assert chatlog(api, "erase", "--conversation", one["id"]).returncode == 1  # nothing live left to erase
    result = chatlog(api, "erase", user)
    assert result.returncode == 0, result.stderr
    assert await tables_holding(dsn(api), kept) == []
    assert chatlog(api, "erase", "--conversation", "not-a-uuid").returncode == 2
