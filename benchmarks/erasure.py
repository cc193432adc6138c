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

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import libpq, server_url  # noqa: E402
from service.connections import ConnectionPool  # noqa: E402
from service.database import make_engine, migrate  # noqa: E402
from service.events import ConversationStarted, MessageAppended  # noqa: E402
from service.eventstore import EventStore  # noqa: E402
from service.ids import uuid7  # noqa: E402
from service.sealing import Keyring, new_master_key, parse_master_keys  # noqa: E402

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
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of reads before the erasure")
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
    await fill(store, VICTIM, args.conversations, args.messages)
    readable = await fill(store, READER, 20, 100)
    await store.aclose()
    await store.pool.close()
    total = args.conversations * args.messages
    print(f"wrote {total:,} messages of {VICTIM} in {args.conversations} conversations, 2,000 of {READER}, "
          f"in {time.monotonic() - started:.0f} s")  # fmt: skip

    port = 8731
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")} | {
        "CHATLOG_DATABASE_URL": url,
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_MASTER_KEY": master,
        "CHATLOG_LOG_LEVEL": "WARNING",
        "CHATLOG_DATA_DIR": tempfile.mkdtemp(prefix="chatlog-bench-data-"),
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=ROOT)
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
            victim = {"Authorization": f"Bearer {token(VICTIM)}"}
            listed = await client.get("/v1/conversations", params={"limit": 100}, headers=victim)
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
            erase_began = time.perf_counter()
            r = await client.delete("/v1/me", headers=victim)
            erase_ended = time.perf_counter()
            assert r.status_code == 204, r.text
            await asyncio.sleep(1.0)
            stop.set()
            await reading
            after = await client.get("/v1/conversations", headers=victim)
            assert after.json()["data"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def p(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")

    before = [ms for at, ms in samples if at < erase_began]
    during = [ms for at, ms in samples if erase_began <= at <= erase_ended]
    print(f"DELETE /v1/me of {total:,} messages in {args.conversations} conversations: "
          f"{(erase_ended - erase_began) * 1000:.0f} ms (target <= 2000 ms)")  # fmt: skip
    print(f"{READER}'s history page reads: before p50 {p(before, 50):.2f} ms, p99 {p(before, 99):.2f} ms "
          f"({len(before)} reads); during the erasure p50 {p(during, 50):.2f} ms, "
          f"max {max(during, default=float('nan')):.2f} ms ({len(during)} reads)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
