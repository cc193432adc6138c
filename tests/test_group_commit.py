"""Group commit: commands that arrive together share a transaction, and each is still answered
exactly as it would be alone; a lost connection mid-batch loses and doubles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.connections import ConnectionPool
from service.events import ConversationStarted, EventValidationError, MessageAppended
from service.eventstore import Appended, EventStore, IdempotencyMismatch, NotFound, VersionConflict
from service.ids import uuid7
from tests.keys import KEYRING, message_contents


def message(content: str) -> MessageAppended:
    return MessageAppended(message_id=uuid7(), role="user", content=content)


async def versions_by_stream(raw_dsn: str) -> dict[Any, list[int]]:
    conn = await asyncpg.connect(raw_dsn)
    try:
        rows = await conn.fetch("SELECT stream_id, stream_version FROM events ORDER BY stream_id, stream_version")
    finally:
        await conn.close()
    streams: dict[Any, list[int]] = {}
    for row in rows:
        streams.setdefault(row[0], []).append(row[1])
    return streams


async def contents(raw_dsn: str) -> Counter[str]:
    return await message_contents(raw_dsn)


async def test_a_crowd_of_mixed_commands_each_gets_the_answer_it_would_get_alone(
    store: EventStore, raw_dsn: str
) -> None:
    assert store.group is not None
    plain = [uuid7() for _ in range(10)]
    fresh = [uuid7() for _ in range(20)]
    stale = [uuid7() for _ in range(20)]
    for stream in plain + fresh + stale:
        await store.append("alice", stream, [ConversationStarted(title="t")])
    for stream in stale:
        await store.append("alice", stream, [message("moved on")])
    used = await store.append("alice", uuid7(), [ConversationStarted(title="keyed")], idempotency_key="used-key")

    expected: list[tuple[Any, str]] = []  # (coroutine, what its answer must be)
    for i in range(60):  # plain appends, six to each stream: they race and are retried, never lost
        expected.append((store.append("alice", plain[i % 10], [message(f"plain {i}")]), "ok"))
    for stream in fresh:
        expected.append((store.append("alice", stream, [message("fresh")], expected_version=1), "ok"))
    for stream in stale:
        expected.append((store.append("alice", stream, [message("stale")], expected_version=1), "conflict"))
    for k in range(10):  # the same key three times at once: one append, three equal answers
        for _ in range(3):
            body = [message(f"keyed {k}")]
            keyed_append = store.append("alice", plain[k], body, idempotency_key=f"key-{k}", fingerprint=b"f%d" % k)
            expected.append((keyed_append, f"key-{k}"))
    expected.append(
        (store.append("alice", uuid7(), [ConversationStarted(title="other")], idempotency_key="used-key"), "mismatch")
    )
    for stream in plain[:5]:
        expected.append((store.append("mallory", stream, [message("intruder")]), "not found"))
    for _ in range(5):
        expected.append((store.append("alice", plain[0], [message("bad \x00 content")]), "invalid"))
    for _ in range(20):
        expected.append((store.append("bob", uuid7(), [ConversationStarted(title="new")], expected_version=0), "ok"))
    several = [uuid7() for _ in range(10)]
    for n, stream in enumerate(several):  # commands of three events: all three or none
        events = [ConversationStarted(title="three"), message(f"several {n}a"), message(f"several {n}b")]
        expected.append((store.append("bob", stream, events, expected_version=0), "ok"))
    expected.append(
        (store.append("bob", fresh[0], [ConversationStarted(title="taken")], expected_version=0), "conflict")
    )
    order = list(range(len(expected)))
    random.shuffle(order)

    async def outcome(coroutine: Any) -> Any:
        try:
            return await coroutine
        except Exception as exc:
            return exc

    answers = dict(zip(order, await asyncio.gather(*(outcome(expected[i][0]) for i in order)), strict=True))
    keyed: dict[str, set[tuple[int, ...]]] = {}
    for i, (_, want) in enumerate(expected):
        got = answers[i]
        if want == "ok" or want.startswith("key-"):
            assert isinstance(got, Appended), (want, got)
            if want.startswith("key-"):
                keyed.setdefault(want, set()).add(got.positions)
        elif want == "conflict":
            assert isinstance(got, VersionConflict), (want, got)
        elif want == "mismatch":
            assert isinstance(got, IdempotencyMismatch), (want, got)
        elif want == "not found":
            assert isinstance(got, NotFound), (want, got)
        else:
            assert isinstance(got, EventValidationError), (want, got)
    assert all(len(positions) == 1 for positions in keyed.values()), keyed  # each key: one append, one answer
    assert len(keyed) == 10
    assert store.group.batches > 0, "nothing was committed together"

    streams = await versions_by_stream(raw_dsn)
    assert all(v == list(range(1, len(v) + 1)) for v in streams.values())  # gapless, no duplicates
    assert len(streams[plain[0]]) == 1 + 6 + 1  # started, six plain, one keyed; no intruder, nothing bad
    assert all(len(streams[s]) == 2 for s in fresh) and all(len(streams[s]) == 2 for s in stale)
    counted = await contents(raw_dsn)
    assert all(counted[f"plain {i}"] == 1 for i in range(60))
    assert all(counted[f"keyed {k}"] == 1 for k in range(10))
    assert counted["intruder"] == 0 and counted["stale"] == 0
    assert all(streams[s] == [1, 2, 3] for s in several)
    assert used.position not in {p for a in answers.values() if isinstance(a, Appended) for p in a.positions}


async def test_a_connection_killed_mid_batch_loses_no_acknowledged_append_and_doubles_none(
    pool: ConnectionPool, raw_dsn: str
) -> None:
    store = EventStore(pool, KEYRING)
    streams = [uuid7() for _ in range(40)]
    for stream in streams:
        await store.append("alice", stream, [ConversationStarted(title="t")])
    done = asyncio.Event()

    async def killer() -> int:
        killed = 0
        conn = await asyncpg.connect(raw_dsn)
        try:
            while not done.is_set():
                await asyncio.sleep(random.uniform(0.001, 0.01))
                killed += len(
                    await conn.fetch(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND state IN ('active', 'idle in transaction') AND query LIKE '%INSERT INTO events%'"
                    )
                )
        finally:
            await conn.close()
        return killed

    answers: list[Appended | BaseException] = [ValueError("not sent")] * 2000
    sent = iter(range(2000))

    async def writer() -> None:  # 32 at once, until 2,000 are answered
        for i in sent:
            try:
                answers[i] = await store.append("alice", streams[i % 40], [message(f"kill {i}")])
            except Exception as exc:
                answers[i] = exc

    killing = asyncio.ensure_future(killer())
    await asyncio.gather(*(writer() for _ in range(32)))
    done.set()
    killed = await killing
    await store.aclose()

    counted = await contents(raw_dsn)
    acknowledged = [i for i, a in enumerate(answers) if isinstance(a, Appended)]
    assert killed > 0, "no connection was killed: the test proved nothing"
    assert all(counted[f"kill {i}"] == 1 for i in acknowledged), "an acknowledged append is missing"
    assert all(n == 1 for n in counted.values()), "an append was stored twice"
    assert len(acknowledged) > 1000
    for stream, versions in (await versions_by_stream(raw_dsn)).items():
        assert versions == list(range(1, len(versions) + 1)), stream


async def test_a_lone_append_is_sent_at_once(store: EventStore) -> None:
    assert store.group is not None
    task = asyncio.ensure_future(store.append("alice", uuid7(), [ConversationStarted(title="alone")]))
    await asyncio.sleep(0)
    assert store.group.in_flight == 1 and not store.group.queue  # no waiting for company
    assert (await task).version == 1


@contextlib.asynccontextmanager
async def uncommitted_stream(raw_dsn: str) -> AsyncIterator[uuid.UUID]:
    """A stream of alice's whose first event (and key) another transaction holds uncommitted
    until the block ends: appends to it wait on its unique index, holding their batch."""
    blocked = uuid7()
    blocker = await asyncpg.connect(raw_dsn)
    transaction = blocker.transaction()
    await transaction.start()
    try:
        await blocker.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata) "
            "VALUES ($1, $2, 1, 'alice', 'conversation.started', '{\"title\": \"\", \"metadata\": {}}', '{}')",
            uuid7(),
            blocked,
        )
        await blocker.execute(
            "INSERT INTO data_keys (stream_id, user_id, wrapped, master_id) VALUES ($1, 'alice', $2, $3)",
            blocked,
            KEYRING.new_data_key(blocked)[1],
            KEYRING.current_id,
        )
        yield blocked
    finally:
        await transaction.commit()
        await blocker.close()


async def test_a_caller_cancelled_while_queued_stores_nothing(store: EventStore, raw_dsn: str) -> None:
    assert store.group is not None
    async with uncommitted_stream(raw_dsn) as blocked:
        # An append to a stream whose first event is not committed yet waits on its unique index:
        # it holds the one running batch, and the next commands queue behind it.
        first = asyncio.ensure_future(store.append("alice", blocked, [message("after the blocker 1")]))
        second = asyncio.ensure_future(store.append("alice", blocked, [message("after the blocker 2")]))
        await asyncio.sleep(0.2)
        assert store.group.in_flight == 1 and len(store.group.queue) == 1
        queued_stream = uuid7()
        queued = asyncio.ensure_future(store.append("carol", queued_stream, [ConversationStarted(title="gone")]))
        await asyncio.sleep(0.05)
        assert len(store.group.queue) == 2
        queued.cancel()
        await asyncio.sleep(0)
        assert [w.prepared.stream_id for w in store.group.queue] == [blocked]  # only the cancelled one left
    assert sorted([(await first).version, (await second).version]) == [2, 3]
    with pytest.raises(asyncio.CancelledError):
        await queued
    conn = await asyncpg.connect(raw_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", queued_stream) == 0
    finally:
        await conn.close()


async def test_a_second_batch_starts_beside_a_running_one_only_when_enough_wait(
    store: EventStore, raw_dsn: str
) -> None:
    """A batch's fixed cost (a round trip, a commit, a flush) is worth a second slot only when
    it is shared: fewer waiting commands wait for the running batch and go with the next one."""
    assert store.group is not None
    async with uncommitted_stream(raw_dsn) as blocked:
        first = asyncio.ensure_future(store.append("alice", blocked, [message("held")]))
        await asyncio.sleep(0.2)
        assert store.group.in_flight == 1
        beside, batches = store.group.beside, store.group.batches

        def start() -> asyncio.Future[Appended]:
            return asyncio.ensure_future(store.append("bob", uuid7(), [ConversationStarted(title="t")]))

        others = [start() for _ in range(beside - 1)]
        await asyncio.sleep(0.2)
        assert store.group.in_flight == 1 and len(store.group.queue) == beside - 1  # they wait
        others.append(start())  # the one that makes `beside`: all of them go, beside the held batch
        assert [(await o).version for o in others] == [1] * beside
        assert store.group.batches == batches + 1 and not first.done()  # as one batch, while it waits
    assert (await first).version == 2


async def test_closing_the_store_answers_every_append_first(pool: ConnectionPool, raw_dsn: str) -> None:
    store = EventStore(pool, KEYRING)
    writes = [asyncio.ensure_future(store.append("alice", uuid7(), [message(f"drain {i}")])) for i in range(100)]
    await asyncio.sleep(0)
    await store.aclose()
    assert all(w.done() for w in writes)
    assert all(isinstance(w.result(), Appended) for w in writes)
    assert sum((await contents(raw_dsn)).values()) == 100
