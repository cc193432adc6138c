"""Event-store append throughput next to a raw asyncpg insert loop, on the same server, same run.

    python benchmarks/append.py [--seconds 5] [--rounds 3] [--concurrency 1 32]

Runs on uvloop (the event loop `chatlog serve` uses), both contenders alike.
Uses CHATLOG_DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory. A
fresh database `chatlog_bench_append` is created (and dropped at the end). Each round runs, for
each concurrency, the raw loop and then the store for a fixed time; rounds alternate so drift
hits both alike, and the median round is reported.

- store: `EventStore.append` of one `message.appended` event, as `chatlog serve` runs it: with
  group commit (appends that arrive together share one statement, transaction and commit),
  validation and a coalesced NOTIFY after commit; each task appends to its own conversation;
- store-solo: the same store with group commit off (each append its own one-statement
  transaction on a pooled connection): the store as it was before group commit, for the
  latency comparison at concurrency 1;
- raw: one `INSERT INTO events ... VALUES (...)` per transaction, each task on a connection of
  its own, the version computed client-side, the INSERT sent alone (its own implicit
  transaction: one round trip) — the least any append to this table can cost. The target
  ratio is judged against this one.
- raw-tx: the same INSERT written as it usually is, `async with conn.transaction()` around it
  (BEGIN, INSERT, COMMIT: three round trips), for reference.
- store-sql: the store's own statement (`_APPEND_PLAIN`, what it sends once it knows a stream's
  head), sent like the raw loop's: each task on its connection, no validation, no pool. Between
  raw and store-sql lies what the statement costs; between store-sql and store, the store's Python.

Each contender's CPU is accounted too (where /proc exists), per event: this process's (the
client: asyncpg, the event loop and, for the store, its Python) and the rest of the machine's,
which is PostgreSQL's when nothing else runs. On a 2-core machine the two share the cores, so
client CPU the store adds is throughput lost.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import asyncpg
import msgspec
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import libpq, machine_cpu_seconds, server_url
from service.connections import ConnectionPool
from service.database import make_engine, migrate
from service.events import MessageAppended
from service.eventstore import _APPEND_PLAIN, EventStore, _encode_rows, _Row, seal_event
from service.ids import uuid7
from service.sealing import Keyring

DB = "chatlog_bench_append"


class Measured(NamedTuple):
    rate: float  # operations per second
    client_us: float  # this process's CPU per operation, microseconds
    other_us: float  # the rest of the machine's CPU per operation (nan without /proc)
    p99_ms: float  # the 99th percentile of one operation's latency


async def run_for(seconds: float, concurrency: int, op: Callable[[int, int], Awaitable[None]]) -> Measured:
    """Run `op(task, i)` in `concurrency` tasks for `seconds`; its rate and CPU per operation."""
    machine, cpu = machine_cpu_seconds(), time.process_time()
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency
    latencies: list[float] = []

    async def worker(task: int) -> None:
        i = 0
        clock = time.perf_counter
        while (began := clock()) < deadline:
            await op(task, i)
            latencies.append(clock() - began)
            i += 1
        counts[task] = i

    start = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(concurrency)))
    elapsed, done = time.perf_counter() - start, sum(counts)
    client = time.process_time() - cpu
    busy = machine_cpu_seconds()
    other = busy - machine - client if busy is not None and machine is not None else math.nan
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else math.nan
    return Measured(done / elapsed, client / done * 1e6, other / done * 1e6, p99)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    server = server_url()
    admin = await asyncpg.connect(libpq(server))
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {DB}")
    url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    top = max(args.concurrency)
    engine = make_engine(url, pool_size=top)
    await migrate(engine)
    await engine.dispose()
    in_flight = int(os.environ.get("CHATLOG_GROUP_COMMIT_BATCHES", "2"))
    keyring = Keyring([os.urandom(32)], source="the benchmark's master key")
    store = EventStore(ConnectionPool.for_appends(url, size=top), keyring, batches_in_flight=in_flight)
    solo = EventStore(ConnectionPool.for_appends(url, size=top), keyring, group_commit=False)
    # The raw loop's best case: each task keeps a connection of its own (no pool in between).
    # Generic plans, as the store's connections use (ConnectionPool.for_appends), for its statement
    # sent the raw way (store-sql); the raw INSERT plans in no time either way.
    generic = {"plan_cache_mode": "force_generic_plan"}
    raw_conns = [await asyncpg.connect(libpq(url), server_settings=generic) for _ in range(top)]
    version = await raw_conns[0].fetchval("SHOW server_version")
    sync_commit = await raw_conns[0].fetchval("SHOW synchronous_commit")
    print(
        f"PostgreSQL {version} (synchronous_commit={sync_commit}), {os.cpu_count()} cores, "
        f"{args.seconds:g} s per measurement, {args.rounds} rounds"
    )

    content = "benchmark message " * 8
    data = MessageAppended(message_id=uuid7(), role="user", content=content)
    from service.events import encode_validated

    data_json = encode_validated(data).decode()
    # What sealing costs per event, alone: the store seals each event's JSON (AES-256-GCM).
    aead, _ = keyring.new_data_key(uuid7())
    plain, runs = encode_validated(data), 20_000
    started = time.perf_counter()
    for _ in range(runs):
        seal_event(aead, data.message_id, "message.appended", plain, {"message_id": data.message_id})
    print(f"sealing: {(time.perf_counter() - started) / runs * 1e6:.1f} µs per event ({len(plain)} bytes of JSON)")
    streams: dict[tuple[int, int], uuid.UUID] = {}
    phase = 0  # every measurement writes to conversations of its own

    def stream(task: int) -> uuid.UUID:
        return streams.setdefault((phase, task), uuid.uuid4())

    async def store_op(task: int, i: int) -> None:
        await store.append(
            f"user{task}", stream(task), [MessageAppended(message_id=uuid7(), role="user", content=content)]
        )

    async def solo_op(task: int, i: int) -> None:
        await solo.append(
            f"user{task}", stream(task), [MessageAppended(message_id=uuid7(), role="user", content=content)]
        )

    raw_sql = (
        "INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata) "
        "VALUES ($1, $2, $3, $4, 'message.appended', $5::jsonb, '{\"schema_version\": 1}'::jsonb)"
    )

    async def raw_op(task: int, i: int) -> None:
        await raw_conns[task].execute(raw_sql, uuid7(), stream(task), i + 1, f"user{task}", data_json)

    async def raw_tx_op(task: int, i: int) -> None:
        conn = raw_conns[task]
        async with conn.transaction():
            await conn.execute(raw_sql, uuid7(), stream(task), i + 1, f"user{task}", data_json)

    clear, sealed = seal_event(aead, data.message_id, "message.appended", plain)

    async def store_sql_op(task: int, i: int) -> None:
        row = _Row(uuid7(), stream(task), f"user{task}", "message.appended", msgspec.Raw(clear), sealed,
                   msgspec.Raw(metadata), 1, i, None, False)  # fmt: skip
        await raw_conns[task].fetch(_APPEND_PLAIN, _encode_rows([row]).decode())

    metadata = '{"schema_version": 1}'
    kinds = {"raw": raw_op, "raw-tx": raw_tx_op, "store-sql": store_sql_op, "store-solo": solo_op, "store": store_op}
    results: dict[tuple[str, int], list[Measured]] = {}
    for _ in range(args.rounds):
        for c in args.concurrency:
            for kind, op in kinds.items():
                phase += 1
                results.setdefault((kind, c), []).append(await run_for(args.seconds, c, op))

    def median(kind: str, c: int, field: str) -> float:
        return float(statistics.median(getattr(m, field) for m in results[(kind, c)]))

    print(f"{'concurrency':>11} {'store ev/s':>11} {'raw ev/s':>10} {'ratio':>6} {'raw-tx ev/s':>12} {'ratio':>6}")
    for c in args.concurrency:
        s, r, t = (median(k, c, "rate") for k in ("store", "raw", "raw-tx"))
        print(f"{c:>11} {s:>11.0f} {r:>10.0f} {s / r:>6.2f} {t:>12.0f} {s / t:>6.2f}")
    print("target: store >= 1.5 x raw at concurrency 32")
    if 1 in args.concurrency:
        grouped, alone = median("store", 1, "p99_ms"), median("store-solo", 1, "p99_ms")
        print(
            f"concurrency 1, p99 latency: store {grouped:.3f} ms, store-solo {alone:.3f} ms: "
            f"{grouped / alone:.2f} x (target <= 1.1 x)"
        )
    print("\nper contender: medians of the rounds; CPU in microseconds per event, this process's (client)")
    print("and the rest of the machine's (server: PostgreSQL, when nothing else runs)")
    header = (
        f"{'concurrency':>11} {'contender':>10} {'ev/s':>8} {'x raw':>6} {'client CPU':>10} {'server CPU':>10}"
        f" {'p99 ms':>7}"
    )
    print(f"{header}   rounds ev/s")
    for c in args.concurrency:
        for kind in kinds:
            rate = median(kind, c, "rate")
            rounds = ", ".join(f"{m.rate:.0f}" for m in results[(kind, c)])
            print(
                f"{c:>11} {kind:>10} {rate:>8.0f} {rate / median('raw', c, 'rate'):>6.2f} "
                f"{median(kind, c, 'client_us'):>10.1f} {median(kind, c, 'other_us'):>10.1f}"
                f" {median(kind, c, 'p99_ms'):>7.3f}   {rounds}"
            )

    for each in (store, solo):
        await each.aclose()
        await each.pool.close()
    for conn in raw_conns:
        await conn.close()
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.close()


if __name__ == "__main__":
    try:
        import uvloop  # the loop uvicorn serves on when it is installed, as it is with chatlog
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
