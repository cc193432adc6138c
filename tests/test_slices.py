"""Projection slices (projections/slices.py): a projection split by a hash of `user_id`, shared
by worker processes, taken over when one dies, and re-sliced safely — against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import asyncpg
import pytest

from projections.replay import replay, verify
from projections.slices import RETIRED, Slice, adopt_layout, layout, slice_sql
from projections.worker import SliceGroup, Worker, apply_batch, lock_key, projection_status
from service import queries
from service.connections import ConnectionPool
from service.errors import NotReady
from service.events import ConversationDeleted, ConversationStarted, ConversationUpdated
from service.eventstore import EventStore
from service.ids import uuid7
from tests.keys import KEYRING
from tests.test_projections import (
    CONVERSATIONS,
    FAST,
    catch_up,
    conversation_with_messages,
    message,
    project_process,
    query,
    wait_for,
)


async def catch_up_slices(raw_dsn: str, n: int) -> None:
    """Fold everything readable into the live tables, slice by slice (layout `n` made current)."""
    conn = await asyncpg.connect(raw_dsn)
    try:
        await adopt_layout(conn, "conversations", n, lock_key("conversations:layout"))
        for part in layout(n):
            while await apply_batch(conn, CONVERSATIONS, KEYRING, 50, part=part):
                pass
    finally:
        await conn.close()


async def tables(raw_dsn: str) -> list[list[object]]:
    return [
        [tuple(r) for r in await query(raw_dsn, f"SELECT * FROM {t} ORDER BY id")]
        for t in ("conversations", "messages")
    ]


# --- the layout ----------------------------------------------------------------------


def test_the_slices_cover_the_hash_space_without_gaps_or_overlaps() -> None:
    for n in (1, 2, 3, 4, 7, 32, 64):
        bounds = [part.bounds for part in layout(n)]
        assert bounds[0][0] == -(2**31) and bounds[-1][1] == 2**31 - 1
        assert all(hi + 1 == lo for (_, hi), (lo, _) in itertools.pairwise(bounds))
    assert Slice(0, 1).row("conversations") == "conversations"
    assert Slice(2, 4).row("conversations") == "conversations#2/4"


async def test_the_sql_slice_of_a_user_is_the_slice_whose_bounds_hold_its_hash(raw_dsn: str) -> None:
    users = [f"user-{uuid.uuid4()}" for _ in range(500)] + ["alice", "bob", ""]
    for n in (2, 3, 4, 5, 64):
        rows = await query(
            raw_dsn, f"SELECT u, hashtext(u), {slice_sql('u', '$2')} FROM unnest($1::text[]) AS u", users, n
        )
        for _, h, k in rows:
            lo, hi = Slice(k, n).bounds
            assert 0 <= k < n and lo <= h <= hi
    # The arithmetic at the edges of every slice (hashtext itself cannot be aimed).
    for n in (3, 7, 64):
        for part in layout(n):
            for h in part.bounds:
                expression = slice_sql("x", str(n)).replace("hashtext(x)", "$1::int")
                assert (await query(raw_dsn, f"SELECT {expression}", h))[0][0] == part.k


# --- folding twice ---------------------------------------------------------------------


async def test_events_folded_a_second_time_change_nothing(store: EventStore, raw_dsn: str, db_url: str) -> None:
    kept = await conversation_with_messages(store, "alice", 3, "kept")
    await store.append("alice", kept, [ConversationUpdated(title="renamed")])
    gone = await conversation_with_messages(store, "bob", 2, "gone")
    await store.append("bob", gone, [ConversationDeleted()])
    await conversation_with_messages(store, "carol", 4, "other")
    await catch_up(raw_dsn)
    before = await tables(raw_dsn)
    for start in (0, 5):  # from the log's start, and from the middle of a stream
        position = (
            await query(raw_dsn, "SELECT tx_id, position FROM events ORDER BY position OFFSET $1 LIMIT 1", start)
        )[0]
        await query(
            raw_dsn,
            "UPDATE projection_checkpoints SET tx_id = $1, position = $2 WHERE name = 'conversations'",
            position[0],
            position[1] - 1,
        )
        assert await catch_up(raw_dsn, batch_size=3) > 0
        assert await tables(raw_dsn) == before
    assert await verify(db_url, CONVERSATIONS, KEYRING) == []


# --- changing N ------------------------------------------------------------------------


def group_of(db_url: str, n: int) -> tuple[list[Worker], list[asyncio.Task[None]]]:
    group = SliceGroup("conversations", n)
    workers = [Worker(db_url, CONVERSATIONS, KEYRING, FAST, part=part, group=group) for part in layout(n)]
    return workers, [asyncio.create_task(w.run()) for w in workers]


async def stop(workers: list[Worker], tasks: list[asyncio.Task[None]]) -> None:
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)


async def caught_up(raw_dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(raw_dsn)
    try:
        status = await projection_status(conn, ["conversations"], n)
    finally:
        await conn.close()
    return all(s.lag == 0 and s.status == "ok" for s in status.values())


async def test_switching_from_1_to_4_to_2_slices_under_appends_skips_and_doubles_nothing(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    expected: Counter[uuid.UUID] = Counter()
    done = asyncio.Event()

    async def writer(user: str) -> None:
        rng = random.Random(user)
        streams: list[uuid.UUID] = []
        while not done.is_set():
            if not streams or rng.random() < 0.2:
                streams.append(uuid7())
                await store.append(user, streams[-1], [ConversationStarted(title=user)])
                expected[streams[-1]] += 0
            else:
                stream = rng.choice(streams)
                await store.append(user, stream, [message(f"{stream} {expected[stream]}")])
                expected[stream] += 1
            await asyncio.sleep(rng.uniform(0, 0.005))

    writers = [asyncio.create_task(writer(f"user{i}")) for i in range(12)]
    one = group_of(db_url, 1)
    await asyncio.sleep(1)
    # A new layout while the old one's workers run: they stop at their next batch.
    four = group_of(db_url, 4)
    await wait_for(lambda: _all(lambda: all(w.retired for w in one[0])))
    await asyncio.sleep(1)
    two = group_of(db_url, 2)
    await wait_for(lambda: _all(lambda: all(w.retired for w in four[0])))
    await asyncio.sleep(1)
    done.set()
    await asyncio.gather(*writers)
    await wait_for(lambda: caught_up(raw_dsn, 2), within=30)
    for group in (one, four, two):
        await stop(*group)
    assert all(w.failure is None for group in (one, four, two) for w in group[0])

    counts = {r[0]: r[1] for r in await query(raw_dsn, "SELECT id, message_count FROM conversations")}
    assert counts == dict(expected) and sum(counts.values()) > 100
    doubled = await query(raw_dsn, "SELECT content FROM messages GROUP BY content HAVING count(*) > 1")
    assert doubled == []
    rows = {r[0]: r[1] for r in await query(raw_dsn, "SELECT name, error FROM projection_checkpoints")}
    assert rows["conversations"] == RETIRED and rows["conversations#0/4"] == RETIRED
    assert rows["conversations#0/2"] is None and rows["conversations#1/2"] is None
    assert await verify(db_url, CONVERSATIONS, KEYRING, slices=2) == []


async def _all(check: object) -> bool:
    return bool(check())  # type: ignore[operator]


# --- replay, verify and reads per slice ------------------------------------------------


async def test_a_slice_is_verified_and_replayed_alone(store: EventStore, raw_dsn: str, db_url: str) -> None:
    for i in range(12):
        await conversation_with_messages(store, f"u{i}", 2, f"c{i}")
    await catch_up_slices(raw_dsn, 4)
    assert await verify(db_url, CONVERSATIONS, KEYRING, slices=4) == []
    (edited,) = await query(
        raw_dsn, f"UPDATE conversations SET title = 'edited' WHERE user_id = 'u3' RETURNING {slice_sql('user_id', '4')}"
    )
    k = edited[0]
    other = Slice((k + 1) % 4, 4)
    assert await verify(db_url, CONVERSATIONS, KEYRING, slices=4, part=other) == []
    assert len(await verify(db_url, CONVERSATIONS, KEYRING, slices=4, part=Slice(k, 4))) == 2  # both sides
    assert len(await verify(db_url, CONVERSATIONS, KEYRING, slices=4)) == 2
    before = await query(raw_dsn, "SELECT count(*) FROM messages")
    await replay(db_url, CONVERSATIONS, KEYRING, slices=4, part=Slice(k, 4))
    assert await query(raw_dsn, "SELECT count(*) FROM messages") == before
    assert await verify(db_url, CONVERSATIONS, KEYRING, slices=4) == []
    await query(raw_dsn, "UPDATE conversations SET title = 'edited again' WHERE user_id = 'u3'")
    await replay(db_url, CONVERSATIONS, KEYRING, slices=4)  # the whole projection: every slice's row moves
    positions = await query(raw_dsn, "SELECT DISTINCT position FROM projection_checkpoints WHERE name LIKE '%/4'")
    assert len(positions) == 1
    assert await verify(db_url, CONVERSATIONS, KEYRING, slices=4) == []
    with pytest.raises(Exception, match="runs as 4 slice"):
        await verify(db_url, CONVERSATIONS, KEYRING, slices=2)


async def test_own_writes_wait_for_the_callers_slice(store: EventStore, raw_dsn: str, pool: ConnectionPool) -> None:
    await catch_up_slices(raw_dsn, 4)
    written = await conversation_with_messages(store, "alice", 1)
    with pytest.raises(NotReady):
        await queries.wait_until_readable(pool, "alice", None, 0.2, slices=4)
    (k,) = (await query(raw_dsn, f"SELECT {slice_sql('$1::text', '4')}", "alice"))[0]
    conn = await asyncpg.connect(raw_dsn)
    try:
        await apply_batch(conn, CONVERSATIONS, KEYRING, 100, part=Slice(k, 4))
    finally:
        await conn.close()
    last = (await query(raw_dsn, "SELECT max(position) FROM events WHERE stream_id = $1", written))[0][0]
    await queries.wait_until_readable(pool, "alice", None, 1, slices=4)
    await queries.wait_until_readable(pool, "alice", last, 1, slices=4)
    # Another user's slice has folded nothing yet: their newest write is not readable for them.
    bob = "bob"
    while await _slice_of(raw_dsn, bob) == k:
        bob += "b"
    await conversation_with_messages(store, bob, 1)
    with pytest.raises(NotReady):
        await queries.wait_until_readable(pool, bob, None, 0.2, slices=4)


async def _slice_of(raw_dsn: str, user: str) -> int:
    return int((await query(raw_dsn, f"SELECT {slice_sql('$1::text', '4')}", user))[0][0])


# --- processes sharing slices ------------------------------------------------------------


async def held_slices(raw_dsn: str) -> dict[int, int]:
    """Client pid -> how many slice locks its projection connections hold, in this database."""
    rows = await query(
        raw_dsn,
        "SELECT a.application_name, count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND a.application_name LIKE 'chatlog-projection-conversations-%' GROUP BY 1",
    )
    return {int(name.rsplit("-", 1)[1]): count for name, count in rows}


async def test_two_processes_share_4_slices_and_one_takes_the_others_when_it_is_killed(
    store: EventStore, raw_dsn: str, chatlog_env: dict[str, str]
) -> None:
    env = chatlog_env | {"CHATLOG_PROJECTION_SLICES": "4", "CHATLOG_PROJECTION_POLL_INTERVAL": "0.05"}
    expected: Counter[uuid.UUID] = Counter()
    done = asyncio.Event()

    async def writer(user: str) -> None:
        stream = uuid7()
        await store.append(user, stream, [ConversationStarted(title=user)])
        expected[stream] += 0
        while not done.is_set():
            await store.append(user, stream, [message(f"{user} {expected[stream]}")])
            expected[stream] += 1
            await asyncio.sleep(0.01)

    procs = [project_process(env) for _ in range(2)]
    writers = [asyncio.create_task(writer(f"user{i}")) for i in range(16)]
    try:
        await wait_for(lambda: _shared(raw_dsn, procs), within=30)
        await asyncio.sleep(1)
        killed, survivor = procs
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=10)
        killed_at = time.monotonic()
        await wait_for(lambda: _holds_all(raw_dsn, survivor.pid), within=15)
        took = time.monotonic() - killed_at
        assert took < 5, f"the survivor took the slices after {took:.1f} s"
        print(f"the survivor held all 4 slices {took:.1f} s after the kill")
        await asyncio.sleep(1)  # appends go on, folded by the survivor alone
        done.set()
        await asyncio.gather(*writers)
        await wait_for(lambda: caught_up(raw_dsn, 4), within=30)
    finally:
        done.set()
        await asyncio.gather(*writers, return_exceptions=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
    counts = {r[0]: r[1] for r in await query(raw_dsn, "SELECT id, message_count FROM conversations")}
    assert counts == dict(expected) and sum(counts.values()) > 100
    messages = Counter(r[0] for r in await query(raw_dsn, "SELECT content FROM messages"))
    assert len(messages) == sum(expected.values()) and set(messages.values()) == {1}
    checked = subprocess.run(
        [sys.executable, "-m", "service.cli", "verify"], env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def _shared(raw_dsn: str, procs: list[subprocess.Popen[str]]) -> bool:
    held = await held_slices(raw_dsn)
    return sorted(held.get(p.pid, 0) for p in procs) == [2, 2]


async def _holds_all(raw_dsn: str, pid: int) -> bool:
    return (await held_slices(raw_dsn)).get(pid) == 4
