"""Erasing a user: DELETE /v1/me of a user with 10,000 messages in 50 conversations, timed, while
another user's reader keeps reading history pages; the reader's p99 before and during, in one run.

    python benchmarks/erasure.py [--conversations 50] [--messages 200] [--baseline 5]

Uses CHATLOG_DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory; works
in a fresh database `chatlog_bench_erasure`. The content is written through the event store
(sealed, as the service writes it) with the same master key as the `chatlog serve` it then
starts, whose in-process worker projects it before anything is measured. Targets (issue
"Deleting is erasing"): the erasure within 2 s; the other user's reads within their p99.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would shadow the standard library's `http` (benchmarks/http.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time

import asyncpg
import httpx
import jwt
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import libpq, server_url
from service.connections import ConnectionPool
from service.database import make_engine, migrate
from service.events import ConversationStarted, MessageAppended
from service.eventstore import EventStore
from service.ids import uuid7
from service.sealing import Keyring, new_master_key, parse_master_keys

DB = "chatlog_bench_erasure"
SECRET = "erasure-benchmark-secret-" + "0123456789abcdef" * 3
VICTIM, READER = "bench-victim", "bench-reader"


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


async def fill(store: EventStore, user: str, conversations: int, messages: int) -> list[str]:
    """`conversations` of `messages` each, 32 appends in flight."""
    ids = [uuid7() for _ in range(conversations)]
    for cid in ids:
        await store.append(user, cid, [ConversationStarted(title=f"{user} {cid}")], expected_version=0)
    text = "lorem ipsum dolor sit amet " * 6
    jobs = [(cid, i) for i in range(messages) for cid in ids]
    queue: asyncio.Queue[tuple[object, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            cid, i = queue.get_nowait()
            await store.append(user, cid, [MessageAppended(message_id=uuid7(), role="user", content=f"{text} {i}")])  # type: ignore[arg-type]

    await asyncio.gather(*(worker() for _ in range(32)))
    return [str(c) for c in ids]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200, help="per conversation")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of reads before the erasures")
    parser.add_argument(
        "--victims", type=int, default=20, help="users erased one after another (more: more reads during erasures)"
    )
    parser.add_argument(
        "--projector",
        choices=["in-process", "separate"],
        default="in-process",
        help="the projection worker inside the API process (default), or as `chatlog project` beside it",
    )
    args = parser.parse_args()

    server = server_url()
    admin = await asyncpg.connect(libpq(server))
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {DB}")
    await admin.close()
    url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    master = new_master_key()
    keyring = Keyring(parse_master_keys(master))
    engine = make_engine(url, pool_size=1)
    await migrate(engine, keyring=keyring)
    await engine.dispose()
    store = EventStore(ConnectionPool.for_appends(url, size=32), keyring)
    started = time.monotonic()
    for v in range(args.victims):
        await fill(store, f"{VICTIM}-{v}", args.conversations, args.messages)
    readable = await fill(store, READER, 20, 100)
    await store.aclose()
    await store.pool.close()
    total = args.conversations * args.messages
    print(f"wrote {total:,} messages for each of {args.victims} users in {args.conversations} conversations, "
          f"2,000 of {READER}, "
          f"in {time.monotonic() - started:.0f} s")  # fmt: skip

    port = 8731
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")} | {
        "CHATLOG_DATABASE_URL": url,
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_MASTER_KEY": master,
        "CHATLOG_LOG_LEVEL": "WARNING",
        "CHATLOG_DATA_DIR": tempfile.mkdtemp(prefix="chatlog-bench-data-"),
    }
    serve = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    if args.projector == "separate":
        serve.append("--no-workers")
    proc = subprocess.Popen(serve, env=env, cwd=ROOT)
    projector = None
    if args.projector == "separate":
        projector = subprocess.Popen([sys.executable, "-m", "service.cli", "project"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            while True:
                try:
                    ready = await client.get("/readyz")
                    if ready.status_code == 200 and ready.json()["projections"]["conversations"]["lag"] == 0:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
            victims = [{"Authorization": f"Bearer {token(f'{VICTIM}-{v}')}"} for v in range(args.victims)]
            listed = await client.get("/v1/conversations", params={"limit": 100}, headers=victims[0])
            assert len(listed.json()["data"]) == args.conversations
            reader = {"Authorization": f"Bearer {token(READER)}"}
            samples: list[tuple[float, float]] = []  # (when it started, ms)
            stop = asyncio.Event()

            async def read() -> None:
                async with httpx.AsyncClient(base_url=base, timeout=30, headers=reader) as own:
                    i = 0
                    while not stop.is_set():
                        began = time.perf_counter()
                        r = await own.get(f"/v1/conversations/{readable[i % len(readable)]}/messages",
                                          params={"limit": 50})  # fmt: skip
                        assert r.status_code == 200, r.text
                        samples.append((began, (time.perf_counter() - began) * 1000))
                        i += 1

            reading = asyncio.ensure_future(read())
            await asyncio.sleep(args.baseline)
            windows: list[tuple[float, float]] = []
            for victim in victims:
                began = time.perf_counter()
                r = await client.delete("/v1/me", headers=victim)
                windows.append((began, time.perf_counter()))
                assert r.status_code == 204, r.text
                after = await client.get("/v1/conversations", headers=victim)
                assert after.json()["data"] == []
                await asyncio.sleep(0.5)
            stop.set()
            await reading
    finally:
        for running in (proc, projector):
            if running is not None:
                running.terminate()
                running.wait(timeout=30)

    def p(values: list[float], q: int) -> float:
        # Inclusive: within the samples (the default extrapolates past the largest of a small set).
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")

    before = [ms for at, ms in samples if at < windows[0][0]]
    during = [ms for at, ms in samples if any(start <= at <= end for start, end in windows)]
    took = sorted((end - start) * 1000 for start, end in windows)
    print(f"projection worker: {args.projector}")
    print(f"DELETE /v1/me of {total:,} messages in {args.conversations} conversations, {len(took)} users: "
          f"median {statistics.median(took):.0f} ms, slowest {took[-1]:.0f} ms (target <= 2000 ms)")  # fmt: skip
    slower = sum(ms > p(before, 99) for ms in during) / max(1, len(during))
    print(f"{READER}'s history page reads: before p50 {p(before, 50):.2f} ms, p99 {p(before, 99):.2f} ms "
          f"({len(before)} reads); while an erasure ran p50 {p(during, 50):.2f} ms, p99 {p(during, 99):.2f} ms, "
          f"max {max(during, default=float('nan')):.2f} ms ({len(during)} reads), {slower:.0%} of them slower "
          f"than the p99 before (1% if the erasures cost the reader nothing)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
