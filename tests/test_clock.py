"""The log's clock (service/clock.py): when the log's newest transaction id stands at or above the
server's (a restore, a move), it is shifted so that new events sort after the old and the old
fall below the horizon; safe to run twice and from two processes at once."""

from __future__ import annotations

import asyncio

import asyncpg

from service import clock
from service.events import ConversationStarted, MessageAppended
from service.eventstore import Checkpoint, EventStore, read_all
from service.ids import uuid7
from tests.keys import KEYRING

FAR = 2**40  # a restored id from a server far ahead of this one


async def test_a_log_from_a_server_far_ahead_is_shifted_once_and_new_events_follow_it(
    store: EventStore, raw_dsn: str
) -> None:
    conn = await asyncpg.connect(raw_dsn)
    others = [await asyncpg.connect(raw_dsn) for _ in range(2)]
    try:
        stream = uuid7()
        data = '{"type": "conversation.started", "title": "old", "metadata": {}}'
        await conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata, tx_id) "
            "VALUES ($1, $2, 1, 'alice', 'conversation.started', $3::jsonb, '{\"schema_version\": 1}', $4::text::xid8)",
            uuid7(),
            stream,
            data,
            str(FAR),
        )
        await conn.execute(
            "INSERT INTO data_keys (stream_id, user_id, wrapped, master_id) VALUES ($1, 'alice', $2, $3)",
            stream,
            KEYRING.new_data_key(stream)[1],
            KEYRING.current_id,
        )
        assert await read_all(conn, KEYRING, Checkpoint()) == []  # the restored event hides above the horizon
        shifts = await asyncio.gather(*(clock.settle(c) for c in others))  # two processes at once
        assert sum(s is not None for s in shifts) == 1
        assert await clock.settle(conn) is None  # and once more: nothing to do
        appended = await store.append(
            "alice", stream, [MessageAppended(message_id=uuid7(), role="user", content="new")]
        )
        events = await read_all(conn, KEYRING, Checkpoint())
        assert [e.position for e in events] == [events[0].position, appended.position]
        assert events[0].tx_id == FAR and events[1].tx_id > FAR  # old first, then new
        assert await read_all(conn, KEYRING, events[0].checkpoint) == [
            events[1]
        ]  # a checkpoint from before still works
        fresh = await store.append("bob", uuid7(), [ConversationStarted(title="later")])
        assert (await read_all(conn, KEYRING, events[1].checkpoint))[0].position == fresh.position
    finally:
        for c in (conn, *others):
            await c.close()


async def test_a_transaction_older_than_the_shift_still_writes_after_the_restored_events(
    store: EventStore, raw_dsn: str
) -> None:
    """A transaction that took its id before the clock was settled, and appends after, must not
    sort below the restored events (a checkpoint restored with them could stand past it)."""
    conn, older = await asyncpg.connect(raw_dsn), await asyncpg.connect(raw_dsn)
    try:
        data = '{"type": "conversation.started", "title": "old", "metadata": {}}'
        insert = (
            "INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata{tx}) "
            "VALUES ($1, $2, 1, 'alice', 'conversation.started', $3::jsonb, '{{\"schema_version\": 1}}'{value})"
        )
        await conn.execute(insert.format(tx=", tx_id", value=", $4::text::xid8"), uuid7(), uuid7(), data, str(FAR))
        async with older.transaction():
            await older.fetchval("SELECT pg_current_xact_id()")  # its id, taken before the shift
            assert await clock.settle(conn) is not None
            await older.execute(insert.format(tx="", value=""), uuid7(), uuid7(), data)
        newest = await conn.fetchval("SELECT max(tx_id)::text::numeric FROM events")
        assert newest > FAR  # the older transaction's event sorts after the restored one
    finally:
        for c in (conn, older):
            await c.close()
