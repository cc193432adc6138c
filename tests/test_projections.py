"""The conversations projection, its worker, replay and verify — against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import pytest

from projections.base import ProjectionError
from projections.conversations import ConversationsProjection
from projections.replay import ReplayBusy, replay, verify
from projections.worker import (
    ProjectionFailed,
    Worker,
    WorkerSettings,
    apply_batch,
    ensure_checkpoint,
    projection_status,
)
from service import eventstore, queries
from service.database import downgrade, make_engine, migrate
from service.events import ConversationDeleted, ConversationStarted, ConversationUpdated, MessageAppended
from service.eventstore import Checkpoint, EventStore, RecordedEvent
from service.ids import uuid7
from tests.keys import KEYRING

CONVERSATIONS = ConversationsProjection(search_config="simple")
FAST = WorkerSettings(batch_size=100, poll_interval=0.05, standby_interval=0.1, reconnect_interval=0.1)


def message(content: str = "hello", role: str = "user") -> MessageAppended:
    return MessageAppended(message_id=uuid7(), role=role, content=content)  # type: ignore[arg-type]


async def catch_up(raw_dsn: str, batch_size: int = 100) -> int:
    """Fold everything readable into the live tables; how many events that was."""
    conn = await asyncpg.connect(raw_dsn)
    try:
        await ensure_checkpoint(conn, CONVERSATIONS.name)
        total = 0
        while applied := await apply_batch(conn, CONVERSATIONS, KEYRING, batch_size):
            total += applied
        return total
    finally:
        await conn.close()


async def query(raw_dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(raw_dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def checkpoint_position(raw_dsn: str) -> int:
    rows = await query(raw_dsn, "SELECT position FROM projection_checkpoints WHERE name = 'conversations'")
    return rows[0][0] if rows else 0


async def last_position(raw_dsn: str) -> int:
    rows = await query(raw_dsn, "SELECT position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
    return rows[0][0] if rows else 0


async def wait_for(predicate: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {within} s")


async def assert_verified(db_url: str) -> None:
    differences = await verify(db_url, CONVERSATIONS, KEYRING)
    assert differences == [], differences


async def conversation_with_messages(store: EventStore, user: str, n: int, title: str = "t") -> uuid.UUID:
    stream = uuid7()
    await store.append(user, stream, [ConversationStarted(title=title)])
    for i in range(n):
        await store.append(user, stream, [message(f"{title} message {i}")])
    return stream


# --- the fold --------------------------------------------------------------------------


async def test_the_fold_builds_conversations_and_their_messages(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(title="Trip to Oslo", metadata={"topic": "travel"})])
    await store.append("alice", stream, [message("first"), message("second", role="assistant")])
    long = "x" * 250
    await store.append("alice", stream, [message(long, role="tool")])
    last = await store.append("alice", stream, [ConversationUpdated(title="Oslo in May")])
    assert await catch_up(raw_dsn) == 5

    (conv,) = await query(raw_dsn, "SELECT *, metadata::text AS meta FROM conversations")
    events = await query(raw_dsn, "SELECT recorded_at FROM events WHERE stream_id = $1 ORDER BY stream_version", stream)
    assert conv["id"] == stream and conv["user_id"] == "alice"
    assert conv["title"] == "Oslo in May" and conv["meta"] == '{"topic": "travel"}'
    assert conv["message_count"] == 3 and conv["last_message_preview"] == "x" * 200
    assert conv["version"] == 5 and conv["last_position"] == last.position
    assert conv["created_at"] == events[0][0] and conv["updated_at"] == events[-1][0]

    msgs = await query(raw_dsn, "SELECT seq, role, content, user_id, conversation_id FROM messages ORDER BY seq")
    assert [(m["seq"], m["role"], m["content"]) for m in msgs] == [
        (1, "user", "first"),
        (2, "assistant", "second"),
        (3, "tool", long),
    ]
    assert {m["conversation_id"] for m in msgs} == {stream} and {m["user_id"] for m in msgs} == {"alice"}


async def test_deletion_removes_the_conversation_and_its_messages_and_later_events_change_nothing(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    kept = await conversation_with_messages(store, "alice", 2, "kept")
    gone = await conversation_with_messages(store, "alice", 3, "gone")
    await catch_up(raw_dsn)
    await store.append("alice", gone, [ConversationDeleted()])
    await store.append("alice", gone, [message("after the end")])  # the log allows it; the read side ignores it
    await catch_up(raw_dsn)
    assert [r[0] for r in await query(raw_dsn, "SELECT id FROM conversations")] == [kept]
    assert {r[0] for r in await query(raw_dsn, "SELECT conversation_id FROM messages")} == {kept}
    assert len(await query(raw_dsn, "SELECT 1 FROM events WHERE stream_id = $1", gone)) == 6
    await assert_verified(db_url)


async def test_a_conversation_started_and_deleted_in_one_batch_never_appears(store: EventStore, raw_dsn: str) -> None:
    gone = await conversation_with_messages(store, "alice", 2)
    await store.append("alice", gone, [ConversationDeleted()])
    await catch_up(raw_dsn, batch_size=1000)
    assert await query(raw_dsn, "SELECT 1 FROM conversations") == []
    assert await query(raw_dsn, "SELECT 1 FROM messages") == []


# --- search vectors --------------------------------------------------------------------


async def matching(raw_dsn: str, words: str, config: str = "simple") -> list[str]:
    rows = await query(
        raw_dsn,
        "SELECT content FROM messages WHERE search @@ websearch_to_tsquery($1::regconfig, $2) ORDER BY seq",
        config,
        words,
    )
    return [r[0] for r in rows]


async def test_a_projected_message_is_found_by_a_word_in_it(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(title="animals")])
    await store.append("alice", stream, [message("The quick brown Fox"), message("a lazy dog", role="assistant")])
    await catch_up(raw_dsn)
    assert await matching(raw_dsn, "fox") == ["The quick brown Fox"]
    assert await matching(raw_dsn, "lazy dog") == ["a lazy dog"]
    assert await matching(raw_dsn, "cat") == []


CODE = "use Vec<String> or HashMap<Key, Value>, and <b>bold</b>"


async def test_words_between_angle_brackets_are_found(store: EventStore, raw_dsn: str) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    await store.append("alice", stream, [message(CODE), message("x<y")])
    await catch_up(raw_dsn)
    for words in ("String", "Vec<String>", "key value", "bold", "<b>bold</b>"):
        assert await matching(raw_dsn, words) == [CODE], words
    assert await matching(raw_dsn, "y") == ["x<y"]


async def fold_with(projection: ConversationsProjection, raw_dsn: str) -> None:
    conn = await asyncpg.connect(raw_dsn)
    try:
        await ensure_checkpoint(conn, projection.name)
        while await apply_batch(conn, projection, KEYRING, 100):
            pass
    finally:
        await conn.close()


async def test_a_remembered_place_is_not_used_once_another_process_folded_the_conversation(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    """Each process remembers where it put a conversation's last message, so that the next
    message (its child, most often) needs no lookup. Another process (another slice holder, say)
    may fold the conversation in between and give that message children; the remembered place
    must then not be taken for "no child yet"."""
    here, elsewhere = ConversationsProjection(search_config="simple"), ConversationsProjection(search_config="simple")
    stream = uuid7()
    first = message("first")
    await store.append("alice", stream, [ConversationStarted(), first])
    await fold_with(here, raw_dsn)  # remembers `first`, the last message, with no child yet
    answer = msgspec.structs.replace(message("answer"), parent_id=first.message_id)
    await store.append("alice", stream, [answer])
    await fold_with(elsewhere, raw_dsn)  # `first` now has a child, which `here` never saw
    regenerated = msgspec.structs.replace(message("another answer"), parent_id=first.message_id)
    await store.append("alice", stream, [regenerated])
    await fold_with(here, raw_dsn)
    rows = await query(
        raw_dsn, "SELECT content, depth, run = id FROM messages WHERE conversation_id = $1 ORDER BY seq", stream
    )
    assert [tuple(r) for r in rows] == [("first", 1, True), ("answer", 2, False), ("another answer", 2, True)]
    follow = msgspec.structs.replace(message("follow-up"), parent_id=regenerated.message_id)
    await store.append("alice", stream, [follow])  # remembered, and the row agrees: no lookup needed
    await fold_with(here, raw_dsn)
    await assert_verified(db_url)  # the same places as a fresh fold gives


async def test_migration_0005_reindexes_messages_with_angle_brackets_and_back(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    first = message(CODE)  # one linear branch, as every log written before branches is
    await store.append(
        "alice", stream, [first, msgspec.structs.replace(message("plain words"), parent_id=first.message_id)]
    )
    await catch_up(raw_dsn)
    engine = make_engine(db_url, pool_size=1)
    try:
        await downgrade(engine, "0004_search_owner", keyring=KEYRING)
        assert await matching(raw_dsn, "String") == [] and await matching(raw_dsn, "plain") == ["plain words"]
        await migrate(engine, keyring=KEYRING)
    finally:
        await engine.dispose()
    assert await matching(raw_dsn, "String") == [CODE]
    await assert_verified(db_url)  # the same vectors as a fresh fold makes


async def test_replay_rebuilds_the_search_vectors_and_verify_finds_a_hand_edited_one(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(title="animals")])
    await store.append("alice", stream, [message("The quick brown Fox"), message("a lazy dog")])
    await catch_up(raw_dsn)
    await query(raw_dsn, "UPDATE messages SET search = to_tsvector('simple', 'tampered') WHERE seq = 1")
    assert await matching(raw_dsn, "fox") == []
    differences = await verify(db_url, CONVERSATIONS, KEYRING)
    assert {(d.table, d.side) for d in differences} == {
        ("messages", "only in the read table"),
        ("messages", "only in a fresh fold"),
    }
    assert {d.row["search"] for d in differences} == {
        "'tampered':1",
        "' u:616c696365' 'brown':3 'fox':4 'quick':2 'the':1",
    }
    await replay(db_url, CONVERSATIONS, KEYRING)
    assert await matching(raw_dsn, "fox") == ["The quick brown Fox"]
    await assert_verified(db_url)
    conn = await asyncpg.connect(raw_dsn)
    try:  # the swapped-in tables come with planner statistics
        analyzed = await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE relname IN ('conversations', 'messages') "
            "AND last_analyze IS NOT NULL"
        )
    finally:
        await conn.close()
    assert {r[0] for r in analyzed} == {"conversations", "messages"}


async def test_migration_0004_gives_existing_vectors_their_owner_and_takes_it_back(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    await store.append("alice", stream, [message("kept across the upgrade")])
    await catch_up(raw_dsn)
    engine = make_engine(db_url, pool_size=1)
    try:
        await downgrade(engine, "0003_message_search", keyring=KEYRING)
        assert [r[0] for r in await query(raw_dsn, "SELECT search::text FROM messages")] == [
            "'across':2 'kept':1 'the':3 'upgrade':4"
        ]
        await migrate(engine, keyring=KEYRING)
    finally:
        await engine.dispose()
    await assert_verified(db_url)  # the same vectors as a fresh fold makes


async def test_the_configured_search_configuration_builds_the_vectors(
    store: EventStore, raw_dsn: str, chatlog_env: dict[str, str]
) -> None:
    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted()])
    await store.append("alice", stream, [message("the dogs were running")])
    await catch_up(raw_dsn)
    assert await matching(raw_dsn, "run", "english") == []  # 'simple' does not stem
    english = chatlog_env | {"CHATLOG_SEARCH_CONFIG": "english"}
    assert chatlog_cli(english, "verify").returncode == 1, "vectors of another configuration differ"
    result = chatlog_cli(english, "replay")
    assert result.returncode == 0, result.stdout + result.stderr
    assert await matching(raw_dsn, "run", "english") == ["the dogs were running"]
    assert chatlog_cli(english, "verify").returncode == 0
    assert chatlog_cli(chatlog_env, "verify").returncode == 1


# --- gap safety ------------------------------------------------------------------------


async def test_the_projection_never_skips_an_event_held_in_an_open_transaction(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    held = await asyncpg.connect(raw_dsn)
    try:
        tx = held.transaction()
        await tx.start()
        a = uuid7()
        await eventstore.append(held, KEYRING, "alice", a, [ConversationStarted(title="held")])
        b = await conversation_with_messages(store, "bob", 2, "later")
        await catch_up(raw_dsn)
        assert await query(raw_dsn, "SELECT id FROM conversations") == [], "nothing past the held event yet"
        await tx.commit()
    finally:
        await held.close()
    await catch_up(raw_dsn)
    assert {r[0] for r in await query(raw_dsn, "SELECT id FROM conversations")} == {a, b}
    await assert_verified(db_url)


async def test_random_interleavings_with_a_running_worker_lose_and_double_nothing(
    db_url: str, raw_dsn: str, store: EventStore
) -> None:
    rng = random.Random(7)
    started: set[uuid.UUID] = set()
    messages_per: dict[uuid.UUID, int] = {}
    worker = Worker(db_url, CONVERSATIONS, KEYRING, WorkerSettings(batch_size=7, poll_interval=0.01))
    running = asyncio.create_task(worker.run())

    async def writer(n: int) -> None:
        conn = await asyncpg.connect(raw_dsn)
        try:
            for i in range(15):
                stream = uuid7()
                tx = conn.transaction()
                await tx.start()
                count = rng.randint(0, 3)
                await eventstore.append(
                    conn,
                    KEYRING,
                    f"user{n}",
                    stream,
                    [ConversationStarted(title=f"{n}-{i}")] + [message() for _ in range(count)],
                )
                await asyncio.sleep(rng.uniform(0, 0.01))
                if rng.random() < 0.3:
                    await tx.rollback()
                else:
                    await tx.commit()
                    started.add(stream)
                    messages_per[stream] = count
        finally:
            await conn.close()

    await asyncio.gather(*(writer(n) for n in range(5)))
    await wait_for(lambda: _caught_up(raw_dsn))
    worker.stop()
    await running
    rows = await query(raw_dsn, "SELECT id, message_count FROM conversations")
    assert {r[0]: r[1] for r in rows} == messages_per
    assert len(started) > 20
    dup = await query(raw_dsn, "SELECT conversation_id, seq FROM messages GROUP BY 1, 2 HAVING count(*) > 1")
    assert dup == []
    await assert_verified(db_url)


async def _caught_up(raw_dsn: str) -> bool:
    return await checkpoint_position(raw_dsn) == await last_position(raw_dsn)


# --- crashes ---------------------------------------------------------------------------


async def test_a_crash_after_the_writes_but_before_commit_leaves_nothing_half_applied(
    db_url: str, raw_dsn: str, store: EventStore
) -> None:
    for i in range(5):
        await conversation_with_messages(store, "alice", 4, f"c{i}")

    async def crash(events: Sequence[RecordedEvent]) -> None:
        raise RuntimeError("the process dies here")

    doomed = Worker(db_url, CONVERSATIONS, KEYRING, FAST, before_commit=crash)
    with pytest.raises(RuntimeError, match="dies here"):
        await doomed.run()
    assert await query(raw_dsn, "SELECT 1 FROM conversations") == []
    assert await query(raw_dsn, "SELECT 1 FROM messages") == []
    assert await checkpoint_position(raw_dsn) == 0

    restarted = Worker(db_url, CONVERSATIONS, KEYRING, FAST)
    running = asyncio.create_task(restarted.run())
    await wait_for(lambda: _caught_up(raw_dsn))
    restarted.stop()
    await running
    counts = await query(
        raw_dsn,
        "SELECT message_count, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) FROM conversations c",
    )
    assert [tuple(r) for r in counts] == [(4, 4)] * 5
    await assert_verified(db_url)


def project_process(env: dict[str, str], *names: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "project", *names],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def backend_of_active_worker(raw_dsn: str) -> tuple[int, int] | None:
    """(backend pid, client pid) of the connection holding the projection's advisory lock, in this
    test's database (pg_locks spans the server, which may run other chatlogs)."""
    rows = await query(
        raw_dsn,
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND a.application_name LIKE 'chatlog-projection-conversations%'",
    )
    if not rows:
        return None
    return rows[0][0], int(rows[0][1].rsplit("-", 1)[1])


async def test_a_worker_killed_mid_batch_restarts_to_an_exact_fold(
    store: EventStore, raw_dsn: str, db_url: str, chatlog_env: dict[str, str]
) -> None:
    streams = [await conversation_with_messages(store, f"u{i}", 5, f"c{i}") for i in range(40)]
    # Hold a row the batch will write, so that the worker stops mid-batch with writes pending.
    blocker = await asyncpg.connect(raw_dsn)
    env = chatlog_env | {"CHATLOG_PROJECTION_BATCH_SIZE": "1000"}
    proc: subprocess.Popen[str] | None = None
    try:
        await catch_up_some(raw_dsn, streams[0])
        # Appended before the blocker takes its transaction id, so that it is readable.
        await store.append("u0", streams[0], [message("more")])
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", streams[0])
        proc = project_process(env)

        async def blocked() -> bool:
            rows = await query(
                raw_dsn,
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'chatlog-projection-%' "
                "AND wait_event_type = 'Lock' AND datname = current_database()",
            )
            return bool(rows)

        await wait_for(blocked, within=30)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        await tx.rollback()
    finally:
        await blocker.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    proc = project_process(env)
    try:
        await wait_for(lambda: _caught_up(raw_dsn), within=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    counts = await query(raw_dsn, "SELECT id, message_count FROM conversations")
    assert {r[0]: r[1] for r in counts} == {s: (6 if s == streams[0] else 5) for s in streams}
    await assert_verified(db_url)


async def catch_up_some(raw_dsn: str, stream: uuid.UUID) -> None:
    """Project the log so far (so that the stream's row exists to be locked)."""
    await catch_up(raw_dsn)
    assert await query(raw_dsn, "SELECT 1 FROM conversations WHERE id = $1", stream)


# --- one active worker -----------------------------------------------------------------


async def test_only_one_of_two_workers_applies_events(store: EventStore, db_url: str, raw_dsn: str) -> None:
    first, second = Worker(db_url, CONVERSATIONS, KEYRING, FAST), Worker(db_url, CONVERSATIONS, KEYRING, FAST)
    tasks = [asyncio.create_task(w.run()) for w in (first, second)]
    try:
        await wait_for(lambda: _true(first.active or second.active))
        await asyncio.sleep(0.3)
        assert first.active != second.active
        for i in range(10):
            await conversation_with_messages(store, "alice", 3, f"c{i}")
        await wait_for(lambda: _caught_up(raw_dsn))
        assert sorted([first.applied, second.applied]) == [0, 40]
    finally:
        for w in (first, second):
            w.stop()
        await asyncio.gather(*tasks)
    await assert_verified(db_url)


async def _true(value: bool) -> bool:
    return value


async def test_when_the_active_worker_process_dies_the_standby_takes_over(
    store: EventStore, raw_dsn: str, db_url: str, chatlog_env: dict[str, str]
) -> None:
    procs = [project_process(chatlog_env) for _ in range(2)]
    try:
        await wait_for(lambda: _holder_known(raw_dsn), within=30)
        for i in range(5):
            await conversation_with_messages(store, "alice", 2, f"before{i}")
        await wait_for(lambda: _caught_up(raw_dsn), within=30)
        holder = await backend_of_active_worker(raw_dsn)
        assert holder is not None
        active = next(p for p in procs if p.pid == holder[1])
        active.send_signal(signal.SIGKILL)
        active.communicate(timeout=10)
        for i in range(5):
            await conversation_with_messages(store, "alice", 2, f"after{i}")
        killed_at = time.monotonic()
        await wait_for(lambda: _caught_up(raw_dsn), within=30)
        assert time.monotonic() - killed_at < 10
        new_holder = await backend_of_active_worker(raw_dsn)
        assert new_holder is not None and new_holder[1] != holder[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
    rows = await query(raw_dsn, "SELECT message_count FROM conversations")
    assert sorted(r[0] for r in rows) == [2] * 10
    await assert_verified(db_url)


async def _holder_known(raw_dsn: str) -> bool:
    return await backend_of_active_worker(raw_dsn) is not None


# --- a poison event --------------------------------------------------------------------


async def test_an_event_it_cannot_apply_stops_the_projection_naming_its_position(
    store: EventStore, db_url: str, raw_dsn: str
) -> None:
    good = await conversation_with_messages(store, "alice", 2)
    orphan = await store.append("alice", uuid7(), [message("no conversation")])  # the log allows it
    await conversation_with_messages(store, "alice", 1, "after")
    worker = Worker(db_url, CONVERSATIONS, KEYRING, FAST)
    await asyncio.wait_for(worker.run(), 10)  # returns: the projection stopped
    assert worker.failure is not None and worker.failure.position == orphan.position
    assert [r[0] for r in await query(raw_dsn, "SELECT id FROM conversations")] == [good]
    conn = await asyncpg.connect(raw_dsn)
    try:
        status = (await projection_status(conn, ["conversations"]))["conversations"]
    finally:
        await conn.close()
    assert status.status == "failed" and status.failed_position == orphan.position
    assert "never started" in (status.error or "")
    assert status.lag == 3 and status.lag_seconds >= 0
    with pytest.raises(ProjectionFailed):
        await catch_up(raw_dsn)


async def test_a_database_error_in_a_batch_rolls_it_back_then_applies_the_events_before_the_one_at_fault(
    store: EventStore, db_url: str, raw_dsn: str
) -> None:
    # The batch is folded without a savepoint: the read table's unique key refusing the second
    # conversation's message comes after the batch's conversation rows were written, and must take
    # them back with it before the batch is folded again one event at a time.
    first, second, said = uuid7(), uuid7(), message("first")
    await store.append("alice", first, [ConversationStarted(title="first")])
    await store.append("alice", first, [said])
    await store.append("alice", second, [ConversationStarted(title="second")])
    duplicate = await store.append(
        "alice",
        second,
        [MessageAppended(message_id=said.message_id, role="user", content="same id")],  # type: ignore[arg-type]
    )
    worker = Worker(db_url, CONVERSATIONS, KEYRING, FAST)
    await asyncio.wait_for(worker.run(), 10)  # returns: the projection stopped
    assert worker.failure is not None and worker.failure.position == duplicate.position
    assert "UniqueViolation" in worker.failure.error
    # Everything before the duplicate is applied, once: both conversations, the first's message.
    rows = await query(raw_dsn, "SELECT id, message_count FROM conversations ORDER BY created_at")
    assert [(r[0], r[1]) for r in rows] == [(first, 1), (second, 0)]
    assert [r[0] for r in await query(raw_dsn, "SELECT id FROM messages")] == [said.message_id]


async def test_status_reports_position_and_lag(store: EventStore, raw_dsn: str) -> None:
    await conversation_with_messages(store, "alice", 3)
    conn = await asyncpg.connect(raw_dsn)
    try:
        before = (await projection_status(conn, ["conversations"]))["conversations"]
        await catch_up(raw_dsn)
        after = (await projection_status(conn, ["conversations"]))["conversations"]
    finally:
        await conn.close()
    assert (before.position, before.lag, before.status) == (0, 4, "ok")
    assert before.lag_seconds >= 0
    assert (after.position, after.lag, after.lag_seconds) == (await last_position(raw_dsn), 0, 0.0)


# --- replay and verify -----------------------------------------------------------------


async def test_replay_under_load_swaps_in_tables_equal_to_the_incremental_ones(
    store: EventStore, db_url: str, raw_dsn: str
) -> None:
    for i in range(30):
        await conversation_with_messages(store, f"u{i % 3}", 5, f"c{i}")
    await catch_up(raw_dsn)
    worker = Worker(db_url, CONVERSATIONS, KEYRING, FAST)
    running = asyncio.create_task(worker.run())
    stop = asyncio.Event()
    seen: list[tuple[int, int]] = []

    async def keep_appending() -> None:
        i = 0
        while not stop.is_set():
            await conversation_with_messages(store, "u9", 2, f"live{i}")
            i += 1

    async def keep_reading() -> None:
        conn = await asyncpg.connect(raw_dsn)
        try:
            while not stop.is_set():
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages)"
                )
                seen.append((row[0], row[1]))
                await asyncio.sleep(0.001)
        finally:
            await conn.close()

    side = [asyncio.create_task(keep_appending()), asyncio.create_task(keep_reading())]
    await asyncio.sleep(0.2)
    await replay(db_url, CONVERSATIONS, KEYRING, batch_size=50)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*side)
    await wait_for(lambda: _caught_up(raw_dsn))
    worker.stop()
    await running

    assert seen and min(c for c, _ in seen) >= 30 and min(m for _, m in seen) >= 150, "readers saw empty tables"
    assert all(a <= b for a, b in itertools.pairwise(seen)), "readers saw the tables shrink"
    await assert_verified(db_url)
    indexes = {
        r[0]
        for r in await query(
            raw_dsn, "SELECT indexname FROM pg_indexes WHERE tablename IN ('conversations', 'messages')"
        )
    }
    assert indexes == {
        "conversations_pkey",
        "conversations_user_updated",
        "messages_pkey",
        "messages_conversation_seq",
        "messages_search",
        "messages_run_depth",
    }
    assert await query(raw_dsn, "SELECT 1 FROM pg_tables WHERE tablename LIKE '%\\_\\_%'") == []


async def test_replay_clears_a_failure_once_the_tables_can_be_rebuilt(
    store: EventStore, raw_dsn: str, db_url: str
) -> None:
    await conversation_with_messages(store, "alice", 2)
    await catch_up(raw_dsn)
    await query(
        raw_dsn,
        "UPDATE projection_checkpoints SET error = 'stopped by hand', failed_position = 1 WHERE name = 'conversations'",
    )
    await replay(db_url, CONVERSATIONS, KEYRING)
    conn = await asyncpg.connect(raw_dsn)
    try:
        assert (await projection_status(conn, ["conversations"]))["conversations"].status == "ok"
    finally:
        await conn.close()


async def test_only_one_replay_runs_at_a_time(store: EventStore, db_url: str, raw_dsn: str) -> None:
    for i in range(20):
        await conversation_with_messages(store, "alice", 5, f"c{i}")
    results = await asyncio.gather(
        replay(db_url, CONVERSATIONS, KEYRING, batch_size=10),
        replay(db_url, CONVERSATIONS, KEYRING, batch_size=10),
        return_exceptions=True,
    )
    assert sorted(type(r) is ReplayBusy for r in results) == [False, True], results
    assert any(isinstance(r, Checkpoint) for r in results), "the other replay must finish, not fail"
    await assert_verified(db_url)
    assert await query(raw_dsn, "SELECT 1 FROM pg_tables WHERE tablename LIKE '%\\_\\_%'") == []


async def test_a_replay_that_fails_leaves_the_live_tables_and_no_shadow_tables(
    store: EventStore, db_url: str, raw_dsn: str
) -> None:
    for i in range(20):
        await conversation_with_messages(store, f"u{i}", 3, f"c{i}")  # users on every folding connection
    await catch_up(raw_dsn)
    orphan = await store.append("u3", uuid7(), [message("no conversation")])
    for i in range(20):
        await conversation_with_messages(store, f"u{i}", 3, f"later{i}")
    before = await query(raw_dsn, "SELECT count(*) FROM messages")
    with pytest.raises(ProjectionError) as failed:
        await replay(db_url, CONVERSATIONS, KEYRING, batch_size=7)
    assert failed.value.position == orphan.position
    assert await query(raw_dsn, "SELECT count(*) FROM messages") == before
    assert await query(raw_dsn, "SELECT 1 FROM pg_tables WHERE tablename LIKE '%\\_\\_%'") == []


def chatlog_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_verify_finds_a_hand_edited_row_and_exits_1(
    store: EventStore, raw_dsn: str, chatlog_env: dict[str, str]
) -> None:
    await conversation_with_messages(store, "alice", 3)
    await catch_up(raw_dsn)
    clean = chatlog_cli(chatlog_env, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    await query(raw_dsn, "UPDATE messages SET content = 'tampered' WHERE seq = 2")
    dirty = chatlog_cli(chatlog_env, "verify", "conversations")
    assert dirty.returncode == 1
    assert "tampered" in dirty.stdout and "messages" in dirty.stdout
    await query(raw_dsn, "DELETE FROM conversations")
    assert chatlog_cli(chatlog_env, "verify").returncode == 1


async def test_replay_command_rebuilds_the_tables(store: EventStore, raw_dsn: str, chatlog_env: dict[str, str]) -> None:
    await conversation_with_messages(store, "alice", 3)
    await catch_up(raw_dsn)
    await query(raw_dsn, "UPDATE conversations SET title = 'tampered'")
    result = chatlog_cli(chatlog_env, "replay", "conversations")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replayed conversations: 4 events" in result.stdout
    assert [r[0] for r in await query(raw_dsn, "SELECT title FROM conversations")] == ["t"]
    assert chatlog_cli(chatlog_env, "verify").returncode == 0


def test_unknown_projection_names_are_refused(chatlog_env: dict[str, str]) -> None:
    for command in ("replay", "verify", "project"):
        result = chatlog_cli(chatlog_env, command, "nope")
        assert result.returncode == 2 and "unknown projection" in result.stderr


class _Flaky(ConversationsProjection):
    """The conversations fold with a defect that bites its first `bites` batches."""

    def __init__(self, bites: int) -> None:
        super().__init__(search_config="simple")
        self.bites = bites

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], names: Any) -> None:
        if self.bites > 0:
            self.bites -= 1
            raise RuntimeError("a defect in the fold")
        await super().apply(conn, events, names)


async def test_a_worker_that_dies_of_a_defect_is_logged_shown_and_restarted(
    store: EventStore, db_url: str, raw_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from service.workers import supervise, worker_states

    stream = uuid7()
    await store.append("alice", stream, [ConversationStarted(title="t")])
    worker = Worker(db_url, _Flaky(bites=2), KEYRING, WorkerSettings(poll_interval=0.05))
    task = asyncio.ensure_future(supervise(worker))
    try:
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen.add(worker_states({worker: task})["conversations"])
            conn = await asyncpg.connect(raw_dsn)
            try:
                done = await conn.fetchval("SELECT count(*) FROM conversations WHERE id = $1", stream)
            finally:
                await conn.close()
            if done:
                break
            await asyncio.sleep(0.05)
        assert done == 1, "the restarted worker never applied the event"
        assert "restarting" in seen  # readiness shows it meanwhile
        assert worker_states({worker: task})["conversations"] == "active"
        died = [r for r in caplog.records if "died; restarting" in r.getMessage()]
        assert len(died) == 2 and all(r.exc_info for r in died)  # each death logged, with its traceback
    finally:
        worker.stop()
        await task
    assert worker_states({worker: task})["conversations"] == "stopped"


async def test_the_worker_wakes_this_process_s_waiting_readers_after_each_batch_it_commits(
    store: EventStore, db_url: str
) -> None:
    # A reader waiting for its own write (`wait_until_readable`) pauses between its checks; the
    # worker that runs in its process ends the pause as soon as a batch commits.
    committed = asyncio.Event()
    worker = Worker(
        db_url, CONVERSATIONS, KEYRING, FAST, after_commit=lambda: (queries.projection_moved(), committed.set())
    )
    pausing = asyncio.ensure_future(queries._pause(60))
    await asyncio.sleep(0.05)
    assert not pausing.done()  # nothing committed yet: the reader pauses
    running = asyncio.ensure_future(worker.run())
    try:
        await conversation_with_messages(store, "alice", 1)
        await asyncio.wait_for(committed.wait(), 10)
        await asyncio.wait_for(pausing, 10)  # woken by the commit, long before its 60 s
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
    assert worker.applied >= 1
