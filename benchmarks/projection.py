"""Projection catch-up and replay throughput, and their peak memory, over a generated log of N events.

    python benchmarks/projection.py [--events 1000000] [--worker-batch 1000] [--compare-memory]

Uses CHATLOG_DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory. A fresh
database `chatlog_bench_projection` is created (and dropped at the end). Runs on uvloop when it
is installed (as `chatlog serve` does).

- generate: N / 100 conversations of 100 events each (a `conversation.started`, then 99
  `message.appended` of about 200 characters, 100 users), written in SQL, one transaction per
  chunk of about 100,000 events; conversations of a chunk are interleaved (`--order
  sequential` writes each one whole); ids are UUIDv7, as the service makes them;
- catch-up: one live `Worker` from an empty read side until its checkpoint is the log's last
  event in (tx_id, position) order;
- replay: `projections.replay.replay` (what `chatlog replay` runs) over the same log;
- verify: `projections.replay.verify`, the sanity check that the figures are for a correct fold.

Before each phase after the first, untimed, the database is vacuumed (before catch-up only the
log: see `settle`) and checkpointed, so that no phase pays for the autovacuum and the dirty
buffers of the one before it.

Each phase runs in a child process of its own (this script with `--phase`), which reports its
wall time, its CPU time (the client's share), the rest of the machine's busy CPU time over the
phase (the server's, where /proc exists and nothing else runs), and its peak RSS; the replay's
note says when its bulk fold ended (the rest: indexes, statistics, catch-up and swap). The peak
is the child's VmHWM from /proc: `ru_maxrss` would also count the parent's peak, which an exec'd
child inherits on Linux. `--compare-memory` runs everything for N and N / 10: flat memory means
about the same peaks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_cpu_seconds, server_url
from projections import select
from projections.replay import WRITERS, replay, verify
from projections.worker import Worker, WorkerSettings
from service.connections import connect_args
from service.database import make_engine, migrate
from service.sealing import Keyring
from service.settings import Settings

# The generated events are unsealed (as a log from before sealing reads); new ones would need it.
KEYRING = Keyring([os.urandom(32)], source="the benchmark's master key")

DB = "chatlog_bench_projection"
PER_CONVERSATION = 100  # events per conversation
CHUNK = 100_000  # events per generating transaction
PHASES = ("generate", "catch-up", "replay", "verify")
NAME = "conversations"

# UUIDv7 as service.ids.uuid7 makes them (time-ordered; random within a millisecond), in SQL.
_UUID7 = """
CREATE FUNCTION bench_uuid7() RETURNS uuid VOLATILE LANGUAGE sql AS $$
    SELECT encode(set_byte(overlay(r PLACING substr(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 3)
                                   FROM 1 FOR 6), 6, 112 + get_byte(r, 6) % 16), 'hex')::uuid
    FROM uuid_send(gen_random_uuid()) AS r
$$
"""

_GENERATE = f"""
WITH convs AS MATERIALIZED (
    SELECT c, gen_random_uuid() AS stream_id FROM generate_series($1::int, $2::int) AS c
)
INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata)
SELECT gen_random_uuid(), stream_id, v, 'user' || (c % 100),
       CASE WHEN v = 1 THEN 'conversation.started' ELSE 'message.appended' END,
       CASE WHEN v = 1
            THEN jsonb_build_object('type', 'conversation.started', 'title', 'conversation ' || c,
                                    'metadata', '{{}}'::jsonb)
            ELSE jsonb_build_object('type', 'message.appended', 'message_id', gen_random_uuid(),
                                    'role', (ARRAY['user', 'assistant'])[1 + v % 2],
                                    'content', 'message ' || v || ' of conversation ' || c || ': '
                                               || repeat('lorem ipsum dolor sit amet ', 7),
                                    'metadata', '{{}}'::jsonb)
       END,
       '{{"schema_version": 1}}'::jsonb
FROM convs CROSS JOIN generate_series(1, {PER_CONVERSATION}) AS v
"""


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM), falling back to ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def last_event(conn: asyncpg.Connection) -> int:
    position: int = await conn.fetchval("SELECT position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
    return position


async def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One phase, in this (child) process; returns what the parent prints."""
    (projection,) = select(Settings.from_env(), [NAME])
    conn = await asyncpg.connect(**connect_args(args.url))
    note = ""
    machine, cpu = machine_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    if args.phase == "generate":
        conversations = args.events // PER_CONVERSATION
        step = CHUNK // PER_CONVERSATION
        sql = f"{_GENERATE} ORDER BY {'v, c' if args.order == 'interleaved' else 'c, v'}"
        if args.ids == "uuid7":
            await conn.execute(_UUID7)
            sql = sql.replace("gen_random_uuid()", "bench_uuid7()")
        for first in range(1, conversations + 1, step):
            await conn.execute(sql, first, min(first + step - 1, conversations))  # one transaction each
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('events'))")
        note = f"{args.order}, {args.ids} ids; events table {size}"
    elif args.phase == "catch-up":
        head = await last_event(conn)
        settings = WorkerSettings(batch_size=args.worker_batch, poll_interval=0.05)
        worker = Worker(args.url, projection, KEYRING, settings)
        task = asyncio.ensure_future(worker.run())
        query = "SELECT position FROM projection_checkpoints WHERE name = $1"
        seen, moved = None, time.perf_counter()
        while (position := await conn.fetchval(query, NAME)) != head:
            if task.done():
                task.result()
                raise RuntimeError(f"the worker stopped early: {worker.failure}")
            if position != seen:
                seen, moved = position, time.perf_counter()
            elif time.perf_counter() - moved > 60:  # e.g. an old open transaction holds the horizon back
                raise RuntimeError(f"the worker made no progress for 60 s (checkpoint at position {position})")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        worker.stop()
        await task
        note = f"batch {args.worker_batch}; applied {worker.applied:,}"
    elif args.phase == "replay":
        folded = [0.0]  # seconds until the bulk fold's last batch

        def progress(applied: int, seconds: float) -> None:
            folded[0] = seconds

        checkpoint = await replay(args.url, projection, KEYRING, batch_size=args.replay_batch, progress=progress)
        assert checkpoint.position == await last_event(conn), checkpoint
        note = f"batch {args.replay_batch}, {WRITERS} folding connections; bulk fold {folded[0]:.1f} s"
    else:
        differences = await verify(args.url, projection, KEYRING)
        note = f"{len(differences)} differences"
    if args.phase != "catch-up":
        elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    busy = machine_cpu_seconds()
    server = busy - machine - cpu if busy is not None and machine is not None else None
    await conn.close()
    return {"seconds": elapsed, "cpu": cpu, "server_cpu": server, "rss": peak_rss_mib(), "note": note}


async def settle(url: str, phase: str) -> None:
    """Before a phase, untimed: no dead rows or dirty buffers of the last phase for this one to pay for.

    Before catch-up, only the log: read tables analyzed while empty would make the worker's
    connection cache a generic plan that scans `conversations` for each message's foreign key check.
    """
    conn = await asyncpg.connect(**connect_args(url))
    try:
        await conn.execute("VACUUM ANALYZE events" if phase == "catch-up" else "VACUUM ANALYZE")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def child(args: argparse.Namespace, phase: str, url: str, events: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--phase", phase, "--url", url, "--events", str(events)]
    command += ["--worker-batch", str(args.worker_batch), "--replay-batch", str(args.replay_batch)]
    command += ["--order", args.order, "--ids", args.ids]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {"phase": phase, "events": events, **json.loads(out.splitlines()[-1])}


async def recreate(server: str, drop_only: bool = False) -> tuple[str, str]:
    """A fresh, migrated database (or none, with `drop_only`); its URL and the server's version."""
    admin = await asyncpg.connect(**connect_args(server))
    try:
        version = await admin.fetchval("SHOW server_version")
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        if not drop_only:
            await admin.execute(f"CREATE DATABASE {DB}")
    finally:
        await admin.close()
    url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    if not drop_only:
        engine = make_engine(url, pool_size=1)
        await migrate(engine)
        await engine.dispose()
    return url, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="N (rounded down to a multiple of 100)")
    parser.add_argument("--worker-batch", type=int, default=1000)
    parser.add_argument("--replay-batch", type=int, default=5000)
    parser.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved")
    parser.add_argument("--ids", choices=("uuid7", "random"), default="uuid7", help="as the service makes them, or v4")
    parser.add_argument("--compare-memory", action="store_true", help="also run with N / 10")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run(run_phase(args))))
        return

    server = server_url()
    sizes = [max(PER_CONVERSATION, n - n % PER_CONVERSATION) for n in (args.events, args.events // 10)]
    results = []
    for events in sizes[: 2 if args.compare_memory else 1]:
        url, version = run(recreate(server))
        if not results:
            print(f"PostgreSQL {version}, {os.cpu_count()} cores, N = {events:,} events", flush=True)
        try:
            for phase in PHASES:
                if phase != "generate":
                    run(settle(url, phase))
                results.append(child(args, phase, url, events))
                r = results[-1]
                print(f"  {phase}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
        finally:
            run(recreate(server, drop_only=True))

    header = f"{'phase':<9} {'events':>10} {'seconds':>8} {'events/s':>9} {'client CPU':>10} {'server CPU':>10}"
    print(f"{header} {'peak RSS':>8}  notes")
    for r in results:
        rate = r["events"] / r["seconds"]
        server = "-" if r["server_cpu"] is None else f"{r['server_cpu']:.1f}s"
        print(
            f"{r['phase']:<9} {r['events']:>10,} {r['seconds']:>8.2f} {rate:>9,.0f} "
            f"{r['cpu']:>9.1f}s {server:>10} {r['rss']:>4.0f} MiB  {r['note']}"
        )
    print(
        f"CPU: the phase's own process (client) and the rest of the machine (server: PostgreSQL, when nothing "
        f"else runs); {os.cpu_count()} cores give {os.cpu_count()} CPU seconds per second"
    )
    if args.compare_memory:
        for phase in PHASES:
            big, small = (r["rss"] for r in results if r["phase"] == phase)
            print(f"peak RSS {phase}: {big:.0f} MiB at N = {sizes[0]:,}, {small:.0f} MiB at N = {sizes[1]:,}")
    print("target: replay >= 100,000 events/s on 2 cores; peak RSS flat in N (see --compare-memory)")


def run(coro: Any) -> Any:
    try:
        import uvloop  # the loop uvicorn serves on when it is installed, as it is with chatlog
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
