"""The event store's promises, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from service import eventstore
from service.connections import ConnectionPool
from service.events import (
    ConversationDeleted,
    ConversationStarted,
    ConversationUpdated,
    EventValidationError,
    MessageAppended,
)
from service.eventstore import (
    Checkpoint,
    EventStore,
    IdempotencyMismatch,
    NotFound,
    VersionConflict,
)
from service.ids import uuid7
from tests.keys import KEYRING, message_contents, opened_events


def message(content: str = "hello", role: str = "user") -> MessageAppended:
    return MessageAppended(message_id=uuid7(), role=role, content=content)  # type: ignore[arg-type]


async def count_events(raw_dsn: str, where: str = "true", *args: object) -> int:
    conn = await asyncpg.connect(raw_dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM events WHERE {where}", *args))
    finally:
        await conn.close()


# --- the log is append-only in the database itself ---------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET type = 'x'",
        "UPDATE events SET type = 'x' WHERE position = -1",
        "DELETE FROM events",
        "DELETE FROM events WHERE position = -1",
        "TRUNCATE events",
        "TRUNCATE events CASCADE",
    ],
)
async def test_events_cannot_be_changed_from_a_raw_connection(store: EventStore, raw_dsn: str, statement: str) -> None:
    await store.append("alice", uuid7(), [ConversationStarted(title="kept")])
    conn = await asyncpg.connect(raw_dsn)
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        assert await conn.fetchval("SELECT type FROM events") == "conversation.started"
    finally:
        await conn.close()


# --- versions and concurrency ----------------------------------------------------------


async def test_appends_number_a_stream_from_one(store: EventStore) -> None:
    stream = uuid7()
    first = await store.append("alice", stream, [ConversationStarted(title="t")])
    second = await store.append("alice", stream, [message("a"), message("b")])
    assert first.versions == (1,)
    assert second.versions == (2, 3)
    assert first.position < second.positions[0] < second.positions[1]
    async with store.pool.acquire() as conn:
        events = await eventstore.read_stream(conn, KEYRING, "alice", stream)
    assert [e.stream_version for e in events] == [1, 2, 3]
    assert [e.type for e in events] == ["conversation.started", "message.appended", "message.appended"]
    assert events[1].event == second_message(events)
    assert [e.schema_version for e in events] == [1, 2, 2]  # each type's current version


def second_message(events: list[eventstore.RecordedEvent]) -> MessageAppended:
    event = events[1].event
    assert isinstance(event, MessageAppended)
    assert event.content == "a"
    return event


async def test_concurrent_appends_from_separate_connections_get_versions_1_to_50(
    raw_dsn: str,
) -> None:
    stream = uuid7()
    conns = [await asyncpg.connect(raw_dsn) for _ in range(50)]
    try:
        results = await asyncio.gather(
            *(eventstore.append(conn, KEYRING, "alice", stream, [message(f"m{i}")]) for i, conn in enumerate(conns))
        )
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))
    assert sorted(r.version for r in results) == list(range(1, 51))
    assert len({r.position for r in results}) == 50
    rows = [e for e in await opened_events(raw_dsn) if e.stream_id == stream]
    assert sorted(r.stream_version for r in rows) == list(range(1, 51))
    assert sorted(r.event.content for r in rows if isinstance(r.event, MessageAppended)) == sorted(
        f"m{i}" for i in range(50)
    )


async def test_stale_expected_version_conflicts_and_writes_nothing(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()], expected_version=0)
    await store.append("alice", stream, [message()], expected_version=1)
    with pytest.raises(VersionConflict) as info:
        await store.append("alice", stream, [message("late")], expected_version=1)
    assert (info.value.expected, info.value.current) == (1, 2)
    assert await count_events(raw_dsn, "stream_id = $1", stream) == 2
    assert (await message_contents(raw_dsn))["late"] == 0


async def test_concurrent_expected_version_appends_let_exactly_one_win(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    outcomes = await asyncio.gather(
        *(store.append("alice", stream, [message(str(i))], expected_version=1) for i in range(10)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, eventstore.Appended)]
    assert len(winners) == 1 and winners[0].version == 2
    assert all(isinstance(o, VersionConflict) for o in outcomes if o not in winners)
    assert await count_events(raw_dsn, "stream_id = $1", stream) == 2


async def test_starting_an_existing_stream_conflicts_even_for_another_user(store: EventStore) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()], expected_version=0)
    for user in ("alice", "bob"):
        with pytest.raises(VersionConflict):
            await store.append(user, stream, [ConversationStarted()], expected_version=0)


async def test_another_users_stream_is_not_found_and_unreadable(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(title="private")])
    with pytest.raises(NotFound):
        await store.append("bob", stream, [message("intrusion")])
    with pytest.raises(NotFound):
        await store.append("bob", stream, [message("intrusion")], expected_version=1)
    async with store.pool.acquire() as conn:
        assert await eventstore.read_stream(conn, KEYRING, "bob", stream) == []
    assert await count_events(raw_dsn, "stream_id = $1", stream) == 1


# --- idempotency -----------------------------------------------------------------------


async def test_a_retried_idempotency_key_appends_once_and_returns_the_same_positions(
    store: EventStore, raw_dsn: str
) -> None:
    stream = uuid7()
    events = [ConversationStarted(title="once"), ConversationUpdated(title="twice")]
    first = await store.append("alice", stream, events, idempotency_key="key-1")
    again = await store.append("alice", stream, events, idempotency_key="key-1")
    assert not first.replayed and again.replayed
    assert again.positions == first.positions and again.versions == first.versions == (1, 2)
    assert await count_events(raw_dsn, "stream_id = $1", stream) == 2


async def test_ten_concurrent_retries_with_one_key_store_one_event(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    event = message("exactly once")
    results = await asyncio.gather(*(store.append("alice", stream, [event], idempotency_key="same") for _ in range(10)))
    assert len({r.positions for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert (await message_contents(raw_dsn))["exactly once"] == 1


async def test_a_reused_key_with_different_content_is_a_mismatch_and_stores_nothing(
    store: EventStore, raw_dsn: str
) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    await store.append("alice", stream, [message("first")], idempotency_key="k")
    with pytest.raises(IdempotencyMismatch):
        await store.append("alice", stream, [message("second")], idempotency_key="k")
    with pytest.raises(IdempotencyMismatch):
        await store.append("alice", uuid7(), [ConversationStarted()], idempotency_key="k")
    assert (await message_contents(raw_dsn))["second"] == 0
    assert await count_events(raw_dsn, "user_id = 'alice'") == 2


async def test_idempotency_keys_are_per_user(store: EventStore) -> None:
    a = await store.append("alice", uuid7(), [ConversationStarted()], idempotency_key="shared")
    b = await store.append("bob", uuid7(), [ConversationStarted()], idempotency_key="shared")
    assert not a.replayed and not b.replayed and a.position != b.position


async def test_a_caller_fingerprint_identifies_the_request_across_generated_ids(store: EventStore) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    fp = b"digest of the request body"
    first = await store.append("alice", stream, [message("hi")], idempotency_key="r", fingerprint=fp)
    again = await store.append("alice", stream, [message("hi")], idempotency_key="r", fingerprint=fp)
    assert again.replayed and again.positions == first.positions


async def test_idempotency_keys_survive_a_new_process_pool(store: EventStore, db_url: str) -> None:
    stream = uuid7()
    first = await store.append("alice", stream, [ConversationStarted()], idempotency_key="durable")
    other = ConnectionPool(db_url, size=1)
    try:
        again = await EventStore(other, KEYRING).append(
            "alice", stream, [ConversationStarted()], idempotency_key="durable"
        )
    finally:
        await other.close()
    assert again.replayed and again.positions == first.positions


# --- bad input never reaches SQL -------------------------------------------------------


BAD_APPENDS = {
    "nul in content": lambda: [message("a\x00b")],
    "lone surrogate in content": lambda: [message("a\ud800b")],
    "over-long content": lambda: [message("x" * 32_769)],
    "empty content": lambda: [message("")],
    "nul in title": lambda: [ConversationStarted(title="\x00")],
    "lone surrogate in title": lambda: [ConversationStarted(title="\udfff")],
    "over-long title": lambda: [ConversationStarted(title="t" * 201)],
    "nul in metadata key": lambda: [ConversationStarted(metadata={"a\x00": "v"})],
    "surrogate in metadata value": lambda: [ConversationStarted(metadata={"k": "\ud83d"})],
    "17 metadata keys": lambda: [ConversationStarted(metadata={str(i): "v" for i in range(17)})],
    "unknown role": lambda: [MessageAppended(message_id=uuid7(), role="wizard", content="x")],  # type: ignore[arg-type]
    "unknown event type": lambda: [object()],
    "plain dict event": lambda: [{"type": "message.appended", "content": "x"}],
    "no events": lambda: [],
}


async def append_logging_sql(raw_dsn: str, events: list[object]) -> list[str]:
    """Append on a connection that records every statement it sends; return them."""
    conn = await asyncpg.connect(raw_dsn)
    statements: list[str] = []
    conn.add_query_logger(lambda record: statements.append(record.query))
    try:
        await eventstore.append(conn, KEYRING, "alice", uuid7(), events)  # type: ignore[arg-type]
    finally:
        await conn.close()
    return statements


async def test_the_sql_recorder_sees_a_valid_append(raw_dsn: str) -> None:
    statements = await append_logging_sql(raw_dsn, [ConversationStarted()])
    assert any("INSERT INTO events" in q for q in statements)


@pytest.mark.parametrize("case", BAD_APPENDS)
async def test_bad_input_is_a_validation_error_before_any_sql(raw_dsn: str, case: str) -> None:
    statements: list[str] = []
    conn = await asyncpg.connect(raw_dsn)
    conn.add_query_logger(lambda record: statements.append(record.query))
    try:
        with pytest.raises(EventValidationError):
            await eventstore.append(conn, KEYRING, "alice", uuid7(), BAD_APPENDS[case]())  # type: ignore[no-untyped-call]
    finally:
        await conn.close()
    assert statements == []
    assert await count_events(raw_dsn) == 0


@pytest.mark.parametrize(
    ("user", "options"),
    [
        ("", {}),
        ("u" * 256, {}),
        ("al\x00ice", {}),
        ("al\ud800ice", {}),
        ("alice", {"idempotency_key": "non-ascii-é"}),
        ("alice", {"idempotency_key": ""}),
        ("alice", {"idempotency_key": "k" * 256}),
        ("alice", {"idempotency_key": "tab\tkey"}),
        ("alice", {"expected_version": -1}),
        ("alice", {"metadata": {"request_id": "\x00"}}),
    ],
)
async def test_bad_append_arguments_are_validation_errors(
    store: EventStore, raw_dsn: str, user: str, options: dict[str, object]
) -> None:
    with pytest.raises(EventValidationError):
        await store.append(user, uuid7(), [ConversationStarted()], **options)
    assert await count_events(raw_dsn) == 0


# --- reading the log gap-safely --------------------------------------------------------


async def read_all_now(pool: ConnectionPool, after: Checkpoint) -> list[eventstore.RecordedEvent]:
    async with pool.acquire() as conn:
        return await eventstore.read_all(conn, KEYRING, after)


async def test_a_held_transaction_hides_later_commits_until_it_commits(pool: ConnectionPool, raw_dsn: str) -> None:
    store = EventStore(pool, KEYRING)
    before = await store.append("alice", uuid7(), [ConversationStarted(title="before")])
    seen = await read_all_now(pool, Checkpoint())
    assert [e.position for e in seen] == [before.position]
    checkpoint = seen[-1].checkpoint

    held = await asyncpg.connect(raw_dsn)
    try:
        tx = held.transaction()
        await tx.start()
        a = await eventstore.append(held, KEYRING, "alice", uuid7(), [ConversationStarted(title="A")])
        b = await store.append("bob", uuid7(), [ConversationStarted(title="B")])
        assert b.position > a.position
        assert await read_all_now(pool, checkpoint) == []
        await tx.commit()
    finally:
        await held.close()
    assert [e.position for e in await read_all_now(pool, checkpoint)] == [a.position, b.position]


async def test_a_transaction_that_began_first_but_appends_last_is_still_read_first(
    pool: ConnectionPool, raw_dsn: str
) -> None:
    """The event with the larger position comes first: its transaction is older."""
    store = EventStore(pool, KEYRING)
    held = await asyncpg.connect(raw_dsn)
    try:
        tx = held.transaction()
        await tx.start()
        await held.execute("SELECT pg_current_xact_id()")  # take a transaction id now
        b = await store.append("bob", uuid7(), [ConversationStarted(title="B")])
        a = await eventstore.append(held, KEYRING, "alice", uuid7(), [ConversationStarted(title="A")])
        assert a.position > b.position
        assert await read_all_now(pool, Checkpoint()) == []
        await tx.commit()
    finally:
        await held.close()
    assert [e.position for e in await read_all_now(pool, Checkpoint())] == [a.position, b.position]


async def test_an_append_inside_a_rolled_back_transaction_leaves_nothing(pool: ConnectionPool, raw_dsn: str) -> None:
    held = await asyncpg.connect(raw_dsn)
    try:
        tx = held.transaction()
        await tx.start()
        await eventstore.append(held, KEYRING, "alice", uuid7(), [ConversationStarted()])
        await tx.rollback()
    finally:
        await held.close()
    assert await read_all_now(pool, Checkpoint()) == []
    assert await count_events(raw_dsn) == 0


async def test_read_all_pages_by_limit_without_repeats(store: EventStore) -> None:
    appended = [await store.append("alice", uuid7(), [ConversationStarted(title=str(i))]) for i in range(7)]
    checkpoint, seen = Checkpoint(), []
    async with store.pool.acquire() as conn:
        while page := await eventstore.read_all(conn, KEYRING, checkpoint, limit=3):
            seen += [e.position for e in page]
            checkpoint = page[-1].checkpoint
    assert seen == [a.position for a in appended]


async def test_interleaved_commits_and_rollbacks_are_read_once_each_none_skipped(
    pool: ConnectionPool, raw_dsn: str
) -> None:
    """Writers on several connections commit and roll back in random order while a reader
    follows the log; the reader sees every committed event exactly once and no rolled-back one."""
    import random

    rng = random.Random(20261124)
    committed: set[int] = set()
    rolled_back: set[int] = set()
    seen: list[int] = []
    done = asyncio.Event()

    async def writer(n: int) -> None:
        conn = await asyncpg.connect(raw_dsn)
        try:
            for i in range(25):
                tx = conn.transaction()
                await tx.start()
                result = await eventstore.append(
                    conn, KEYRING, f"user{n}", uuid7(), [ConversationStarted(title=f"{n}-{i}")] * rng.randint(1, 3)
                )
                await asyncio.sleep(rng.uniform(0, 0.01))
                if rng.random() < 0.25:
                    await tx.rollback()
                    rolled_back.update(result.positions)
                else:
                    await tx.commit()
                    committed.update(result.positions)
        finally:
            await conn.close()

    async def reader() -> None:
        checkpoint = Checkpoint()
        async with pool.acquire() as conn:
            while True:
                finished = done.is_set()
                page = await eventstore.read_all(conn, KEYRING, checkpoint, limit=rng.randint(1, 10))
                seen.extend(e.position for e in page)
                if page:
                    assert page[0].checkpoint > checkpoint
                    checkpoint = page[-1].checkpoint
                elif finished:
                    return
                else:
                    await asyncio.sleep(0.002)

    read = asyncio.create_task(reader())
    await asyncio.gather(*(writer(n) for n in range(6)))
    done.set()
    await read
    assert len(seen) == len(set(seen)), "an event was read twice"
    assert set(seen) == committed
    assert not set(seen) & rolled_back
    assert len(committed) > 50 and rolled_back


async def test_a_users_feed_holds_only_their_events_in_log_order(store: EventStore) -> None:
    mine = [await store.append("alice", uuid7(), [ConversationStarted(), message()]) for _ in range(3)]
    await store.append("bob", uuid7(), [ConversationStarted()])
    async with store.pool.acquire() as conn:
        page1 = await eventstore.read_user(conn, KEYRING, "alice", Checkpoint(), limit=4)
        page2 = await eventstore.read_user(conn, KEYRING, "alice", page1[-1].checkpoint, limit=4)
    positions = [e.position for e in page1 + page2]
    assert positions == [p for m in mine for p in m.positions]
    assert {e.user_id for e in page1 + page2} == {"alice"}


async def test_deleted_conversation_events_stay_in_the_log(store: EventStore) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(), message()])
    await store.append("alice", stream, [ConversationDeleted()])
    async with store.pool.acquire() as conn:
        events = await eventstore.read_stream(conn, KEYRING, "alice", stream)
    assert [e.type for e in events] == ["conversation.started", "message.appended", "conversation.deleted"]


async def test_listeners_are_notified_after_an_append_commits(store: EventStore, raw_dsn: str) -> None:
    received: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(raw_dsn)
    try:
        await conn.add_listener(
            eventstore.NOTIFY_CHANNEL, lambda _conn, _pid, channel, _payload: received.put_nowait(channel)
        )
        await store.append("alice", uuid.uuid4(), [ConversationStarted()])
        assert await asyncio.wait_for(received.get(), 5) == eventstore.NOTIFY_CHANNEL
    finally:
        await conn.close()


# --- remembered stream heads (two processes, stale memories) ---------------------------


async def test_two_stores_taking_turns_on_one_stream_keep_versions_gapless(db_url: str, raw_dsn: str) -> None:
    """Each store remembers the head it last wrote; the other moves it on. Every stale guess is
    refused by the unique index and retried, so versions stay 1..N with no gap and no repeat."""
    pools = [ConnectionPool(db_url, size=4) for _ in range(2)]
    stores = [EventStore(p, KEYRING) for p in pools]
    stream = uuid7()
    try:
        versions = [(await stores[i % 2].append("alice", stream, [message(str(i))])).version for i in range(20)]
        versions += [
            r.version
            for r in await asyncio.gather(*(stores[i % 2].append("alice", stream, [message("c")]) for i in range(20)))
        ]
    finally:
        for s, p in zip(stores, pools, strict=True):
            await s.aclose()
            await p.close()
    assert versions[:20] == list(range(1, 21))
    assert sorted(versions) == list(range(1, 41))
    conn = await asyncpg.connect(raw_dsn)
    try:
        stored = await conn.fetch("SELECT stream_version FROM events WHERE stream_id = $1 ORDER BY 1", stream)
    finally:
        await conn.close()
    assert [r[0] for r in stored] == list(range(1, 41))


async def test_expected_versions_are_judged_against_the_true_head_not_a_stale_memory(db_url: str) -> None:
    pools = [ConnectionPool(db_url, size=2) for _ in range(2)]
    a, b = (EventStore(p, KEYRING) for p in pools)
    stream = uuid7()
    try:
        await a.append("alice", stream, [ConversationStarted()], expected_version=0)  # a remembers 1
        await b.append("alice", stream, [message("b")], expected_version=1)  # the head is now 2
        with pytest.raises(VersionConflict) as stale:
            await a.append("alice", stream, [message("a")], expected_version=1)
        assert stale.value.current == 2
        assert (await a.append("alice", stream, [message("a")], expected_version=2)).version == 3
        with pytest.raises(VersionConflict):
            await b.append("alice", stream, [message("b")], expected_version=0)
        with pytest.raises(NotFound):
            await b.append("mallory", stream, [message("b")])
        with pytest.raises(VersionConflict) as ahead:
            await a.append("alice", stream, [message("a")], expected_version=9)
        assert ahead.value.current == 3
    finally:
        for p in pools:
            await p.close()


async def test_an_append_rolled_back_elsewhere_does_not_move_a_remembered_head(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    conn = await asyncpg.connect(raw_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        assert (await eventstore.append(conn, KEYRING, "alice", stream, [message("gone")])).version == 2
        await tx.rollback()
    finally:
        await conn.close()
    assert (await store.append("alice", stream, [message("kept")])).version == 2


async def test_an_older_transaction_cannot_append_behind_a_newer_ones_event_on_the_same_stream(
    store: EventStore, raw_dsn: str
) -> None:
    """Otherwise the stream's version 2 would come before its version 1 in the log's order."""
    stream = uuid7()
    conn = await asyncpg.connect(raw_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT pg_current_xact_id()")  # this transaction is now the older one
        await store.append("alice", stream, [ConversationStarted()])
        with pytest.raises(eventstore.StaleTransaction):
            await eventstore.append(conn, KEYRING, "alice", stream, [message("late")])
        await tx.rollback()
    finally:
        await conn.close()
    assert (await store.append("alice", stream, [message("in order")])).version == 2
    async with store.pool.acquire() as c:
        events = await eventstore.read_all(c, KEYRING, Checkpoint())
    assert [(e.stream_id, e.stream_version) for e in events] == [(stream, 1), (stream, 2)]
