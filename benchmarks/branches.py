"""Branches, time travel and forks, each beside its target, in one run.

    python benchmarks/branches.py [--messages 10000] [--branches 100] [--reads 2000]

Uses CHATLOG_DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory; works
in a fresh database `chatlog_bench_branches`. Writes through the event store (sealed, as the
service writes) and projects with the worker's own fold, then measures the read paths the API
runs, on one connection, at concurrency 1:

1. a page of 50 on the active branch of a 10,000-message tree with 100 branches (random places
   along it, by cursor), beside a page of 50 of a linear 10,000-message conversation read the
   cheapest way (by `seq`): target p99 at most 2 x;
2. `as_of` of a 1,000-message conversation (the conversation and its first page of messages,
   folded from the log): target at most 50 ms;
3. a fork of a 1,000-message branch: target at most 200 ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would shadow the standard library's `http` (benchmarks/http.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import gc
import os
import random
import statistics
import time
import uuid

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import libpq, server_url
from projections.conversations import ConversationsProjection
from projections.worker import apply_batch, ensure_checkpoint
from service import history, queries, shapes
from service.commands import ConversationHeads, Idempotency
from service.connections import ConnectionPool
from service.database import make_engine, migrate
from service.events import ConversationStarted, MessageAppended
from service.eventstore import EventStore
from service.ids import uuid7
from service.sealing import Keyring

DB = "chatlog_bench_branches"
USER = "bench-branches"


async def tree(store: EventStore, messages: int, branches: int) -> uuid.UUID:
    """One conversation of `messages` messages: a main line, and every messages/branches-th
    message starts a side branch off an earlier message of the main line (so the active branch,
    which ends at the last message, passes `branches` forks)."""
    cid = uuid7()
    await store.append(USER, cid, [ConversationStarted(title="tree")], expected_version=0)
    main: list[uuid.UUID] = []
    parent: uuid.UUID | None = None
    every = max(1, messages // max(1, branches))
    batch: list[MessageAppended] = []
    for seq in range(1, messages + 1):
        message_id = uuid7()
        if seq % every == 0 and len(main) > 2:  # a side branch: a sibling off the main line
            batch.append(MessageAppended(message_id=message_id, role="user", content=f"side {seq}", seq=seq,
                                         parent_id=main[-2]))  # fmt: skip
        else:
            batch.append(MessageAppended(message_id=message_id, role="user", content=f"main {seq}", seq=seq,
                                         parent_id=parent))  # fmt: skip
            main.append(message_id)
            parent = message_id
        if len(batch) == 500:
            await store.append(USER, cid, batch)
            batch = []
    if batch:
        await store.append(USER, cid, batch)
    return cid


async def linear(store: EventStore, messages: int) -> uuid.UUID:
    cid = uuid7()
    await store.append(USER, cid, [ConversationStarted(title="linear")], expected_version=0)
    parent = None
    for first in range(1, messages + 1, 500):
        batch = []
        for seq in range(first, min(first + 500, messages + 1)):
            m = MessageAppended(message_id=uuid7(), role="user", content=f"line {seq}", seq=seq, parent_id=parent)
            batch.append(m)
            parent = m.message_id
        await store.append(USER, cid, batch)
    return cid


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--branches", type=int, default=100)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()

    server = server_url()
    admin = await asyncpg.connect(libpq(server))
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {DB}")
    url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    keyring = Keyring([os.urandom(32)], source="the benchmark's master key")
    engine = make_engine(url, pool_size=1)
    await migrate(engine, keyring=keyring)
    await engine.dispose()
    store = EventStore(ConnectionPool.for_appends(url, size=8), keyring)
    try:
        started = time.monotonic()
        branched = await tree(store, args.messages, args.branches)
        line = await linear(store, args.messages)
        small = await linear(store, 1000)
        conn = await asyncpg.connect(libpq(url))
        projection = ConversationsProjection(search_config="simple")
        await ensure_checkpoint(conn, projection.name)
        while await apply_batch(conn, projection, keyring, 5000):
            pass
        await conn.execute("ANALYZE")
        print(f"wrote and projected {2 * args.messages + 1000:,} messages in {time.monotonic() - started:.0f} s")

        # 1. A page of 50: the branch of the tree, and the linear conversation by seq.
        depth = await conn.fetchval(
            "SELECT depth FROM messages WHERE id = (SELECT active_leaf_id FROM conversations WHERE id = $1)", branched
        )
        leaf = await conn.fetchval("SELECT active_leaf_id FROM conversations WHERE id = $1", branched)
        rng = random.Random(7)
        timings: dict[str, list[float]] = {"branch": [], "linear": []}
        for i in range(args.reads):
            for kind in ("branch", "linear") if i % 2 == 0 else ("linear", "branch"):
                at = rng.randrange(0, depth - 50)
                began = time.perf_counter()
                if kind == "branch":
                    page, _ = await queries.list_branch(conn, USER, branched, 50, False, None, [str(leaf), at])
                else:
                    page, _ = await queries.list_messages(conn, USER, line, 50, False, [at])
                timings[kind].append((time.perf_counter() - began) * 1000)
                assert len(page) == 50
        b99, l99 = p(timings["branch"], 99), p(timings["linear"], 99)
        print(f"page of 50, the active branch of a {args.messages:,}-message tree with {args.branches} branches "
              f"(depth {depth:,}): p50 {statistics.median(timings['branch']):.2f} ms, p99 {b99:.2f} ms; "
              f"a linear conversation by seq: p50 {statistics.median(timings['linear']):.2f} ms, p99 {l99:.2f} ms; "
              f"{b99 / l99:.2f} x (target <= 2 x)")  # fmt: skip

        # 2. as_of of a 1,000-message conversation: the conversation and its first page.
        head = await conn.fetchval("SELECT max(position) FROM events WHERE stream_id = $1", small)
        reads: dict[str, list[float]] = {"conversation": [], "messages": []}
        # As `chatlog serve` does once started (cli._freeze_startup_heap): what exists now is never
        # scanned by the collector again, so a full collection costs what the request made.
        gc.collect()
        gc.freeze()
        for _ in range(100):
            began = time.perf_counter()
            await history.conversation_as_of(store, USER, small, head - 10)
            reads["conversation"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            await history.messages_as_of(store, USER, small, head - 10, limit=50, descending=False,
                                         leaf_id=None, tree=False, after=None)  # fmt: skip
            reads["messages"].append((time.perf_counter() - began) * 1000)
        for name, samples in reads.items():
            print(f"as_of of a 1,000-message conversation ({name}, folded from the log): "
                  f"p50 {statistics.median(samples):.1f} ms, p99 {p(samples, 99):.1f} ms, max {max(samples):.1f} ms "
                  f"(target <= 50 ms)")  # fmt: skip

        # 3. A fork of a 1,000-message branch.
        samples = []
        for _ in range(10):
            began = time.perf_counter()
            forked, _ = await history.fork(store, ConversationHeads(), USER, small, shapes.ForkCreate(),
                                           Idempotency(None, b""))  # fmt: skip
            samples.append((time.perf_counter() - began) * 1000)
            assert forked.message_count == 1000, forked
        print(f"fork of a 1,000-message branch: median {statistics.median(samples):.0f} ms, "
              f"max {max(samples):.0f} ms (target <= 200 ms)")  # fmt: skip
        await conn.close()
    finally:
        await store.aclose()
        await store.pool.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
