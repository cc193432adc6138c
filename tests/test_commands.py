"""Commands with remembered conversation heads: two processes' memories go stale, the log decides."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service import commands, shapes
from service.connections import ConnectionPool
from service.eventstore import EventStore, NotFound, VersionConflict
from tests.keys import KEYRING

NO_KEY = commands.Idempotency(None, b"")


class Process:
    """What one API process holds: a store on its own pool, and its own memory of heads."""

    def __init__(self, db_url: str) -> None:
        self.store = EventStore(ConnectionPool(db_url, size=10), KEYRING)
        self.heads = commands.ConversationHeads()

    async def say(self, user: str, cid: uuid.UUID, text: str, expected: int | None = None) -> shapes.Message:
        body = shapes.MessageCreate(role="user", content=text, expected_version=expected)
        message, _ = await commands.append_message(self.store, self.heads, user, cid, body, NO_KEY)
        return message

    async def close(self) -> None:
        await self.store.aclose()
        await self.store.pool.close()


@pytest.fixture
async def two(db_url: str) -> AsyncIterator[tuple[Process, Process]]:
    a, b = Process(db_url), Process(db_url)
    yield a, b
    await a.close()
    await b.close()


async def start(p: Process, user: str = "alice") -> uuid.UUID:
    conversation, _ = await commands.create_conversation(p.store, p.heads, user, shapes.ConversationCreate(), NO_KEY)
    return conversation.id


async def seqs(raw_dsn: str, cid: uuid.UUID) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(raw_dsn)
    try:
        rows = await conn.fetch(
            "SELECT stream_version, (data->>'seq')::int FROM events WHERE stream_id = $1 "
            "AND type = 'message.appended' ORDER BY stream_version",
            cid,
        )
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows]


async def test_two_processes_taking_turns_keep_seqs_and_versions_gapless(
    two: tuple[Process, Process], raw_dsn: str
) -> None:
    a, b = two
    cid = await start(a)
    answers = [await (a if i % 3 else b).say("alice", cid, str(i)) for i in range(12)]
    assert [m.seq for m in answers] == list(range(1, 13))
    assert await seqs(raw_dsn, cid) == [(v, v - 1) for v in range(2, 14)]


async def test_concurrent_appends_through_two_processes_never_share_a_seq(
    two: tuple[Process, Process], raw_dsn: str
) -> None:
    a, b = two
    cid = await start(a)
    await b.say("alice", cid, "warm b's memory")
    answers = await asyncio.gather(*((a, b)[i % 2].say("alice", cid, str(i)) for i in range(30)))
    assert sorted(m.seq for m in answers) == list(range(2, 32))
    assert [s for _, s in await seqs(raw_dsn, cid)] == list(range(1, 32))


async def test_a_deletion_elsewhere_turns_a_remembered_head_into_not_found(
    two: tuple[Process, Process], raw_dsn: str
) -> None:
    a, b = two
    cid = await start(a)
    await b.say("alice", cid, "b remembers this head")
    await commands.delete_conversation(a.store, a.heads, "alice", cid, None)
    with pytest.raises(NotFound):
        await b.say("alice", cid, "too late")
    assert [s for _, s in await seqs(raw_dsn, cid)] == [1]


async def test_expected_versions_are_judged_by_the_log_not_a_memory(two: tuple[Process, Process]) -> None:
    a, b = two
    cid = await start(a)
    await b.say("alice", cid, "one")  # b remembers version 2
    await commands.update_conversation(a.store, a.heads, "alice", cid, shapes.ConversationPatch(title="t"))
    with pytest.raises(VersionConflict) as stale:
        await b.say("alice", cid, "stale", expected=2)
    assert stale.value.current == 3
    assert (await b.say("alice", cid, "fresh", expected=3)).seq == 2
    with pytest.raises(NotFound):
        await b.say("mallory", cid, "not yours")
