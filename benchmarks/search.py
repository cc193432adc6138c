"""Search latency over HTTP at concurrency 1, over 1,000,000 stored messages.

    python benchmarks/search.py [--messages 1000000] [--seconds 5] [--rounds 2] [--keep] [--scatter]

Needs `wrk` (Debian: apt-get install wrk). Uses CHATLOG_DATABASE_URL when set, else an embedded
PostgreSQL in a temporary directory; works in a fresh database `chatlog_bench_search`.

N messages (default 1,000,000) are written to the log for 100 users (10,000 each, in
conversations of 100), in words drawn from a 5,000-word vocabulary with a skewed (Zipf-like)
frequency, as `message.appended` events; `chatlog replay` builds the read tables (and the search
vectors) from them. Then one `chatlog serve` (one worker) answers GET /v1/search for user
`bench-0` from wrk at concurrency 1: each query kind on its own, then all of them in rotation,
and the p50/p99 latencies are printed. Target: p99 at most 20 ms.

Replay writes each user's rows together (bench-0's on about 1,000 pages); `--scatter` first
rewrites the table in random order, as the live worker leaves it (bench-0's on about 9,400).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder (with its http.py) would shadow the standard library's `http`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.common import libpq, server_url  # noqa: E402
from benchmarks.http import SECRET, free_port, rotating, start, token, wrk  # noqa: E402

DB = "chatlog_bench_search"
USERS = 100
VOCABULARY = 5000

# Each conversation: one start and 100 messages of 8 to 40 words, each drawn from the vocabulary
# with random()^3 as its place, so the first words are very common and the last ones rare. (`k * 0`
# ties the aggregate to the inner query, so every message gets its own words.)
GENERATE = """
WITH words AS (
    SELECT array_agg(w ORDER BY n) AS w FROM (
        SELECT n, CASE WHEN n <= 40 THEN (ARRAY['the','of','and','to','in','is','you','that','it','he',
            'was','for','on','are','as','with','his','they','at','be','this','have','from','or','one',
            'had','by','word','but','not','what','all','were','we','when','your','can','said','there',
            'use'])[n] ELSE 'w' || substr(md5(n::text), 1, 2 + n % 7) END AS w
        FROM generate_series(1, {vocabulary}) AS n) AS v
)
INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata)
SELECT gen_random_uuid(), c.id, v, 'bench-' || (c.n % {users}),
       CASE WHEN v = 1 THEN 'conversation.started' ELSE 'message.appended' END,
       CASE WHEN v = 1
            THEN jsonb_build_object('type', 'conversation.started', 'title', 'conversation ' || c.n,
                                    'metadata', '{{}}'::jsonb)
            ELSE jsonb_build_object('type', 'message.appended', 'message_id', gen_random_uuid(), 'role',
                                    CASE WHEN v % 2 = 0 THEN 'user' ELSE 'assistant' END,
                                    'content', (SELECT string_agg(
                                                  words.w[1 + k * 0 + floor(pow(random(), 3) * {vocabulary})::int], ' ')
                                                FROM generate_series(1, 8 + (v * 7 + c.n) % 33) AS k),
                                    'metadata', '{{}}'::jsonb, 'seq', v - 1)
       END,
       '{{"schema_version": 1}}'::jsonb
FROM words, (SELECT n, md5('search' || n)::uuid AS id FROM generate_series($1::int, $2::int) AS n) AS c,
     generate_series(1, 101) AS v
ORDER BY c.n, v
"""


# The read table as the live worker leaves it: rows in commit order, each user's spread over the
# whole table (replay writes each user's rows together). The same rows, in random order (one
# transaction: the statements are sent together).
SCATTER = """
CREATE TEMP TABLE shuffled AS SELECT * FROM messages ORDER BY random();
DROP INDEX messages_search, messages_user_created, messages_conversation_seq;
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
TRUNCATE messages;
INSERT INTO messages SELECT * FROM shuffled;
ALTER TABLE messages ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE INDEX messages_search ON messages USING gin (search);
CREATE INDEX messages_user_created ON messages (user_id, created_at);
DROP TABLE shuffled;
ANALYZE messages;
"""


async def generate(dsn: str, messages: int) -> None:
    conversations = max(1, messages // 100)
    conn = await asyncpg.connect(dsn)
    try:
        sql = GENERATE.format(users=USERS, vocabulary=VOCABULARY)
        for first in range(0, conversations, 500):
            await conn.execute(sql, first, min(first + 500, conversations) - 1)
    finally:
        await conn.close()


async def queries(dsn: str) -> dict[str, list[str]]:
    """Query strings by kind, from words that occur in bench-0's messages at various frequencies."""
    conn = await asyncpg.connect(dsn)
    try:
        rare = [
            r[0]
            for r in await conn.fetch(
                "SELECT 'w' || substr(md5(n::text), 1, 2 + n % 7) FROM generate_series(2000, 2019) AS n"
            )
        ]
        mid = [
            r[0]
            for r in await conn.fetch(
                "SELECT 'w' || substr(md5(n::text), 1, 2 + n % 7) FROM generate_series(100, 119) AS n"
            )
        ]
        conversation = await conn.fetchval(
            "SELECT stream_id FROM events WHERE user_id = 'bench-0' AND stream_version = 1 LIMIT 1"
        )
    finally:
        await conn.close()
    return {
        "very common word": ["the", "of", "and", "to"],  # in most messages
        "mid-frequency word": mid,
        "rare word": rare,
        "two words": [f"{a} {b}" for a, b in itertools.pairwise(mid)],
        "phrase": [f'"{a} {b}"' for a, b in zip(mid, rare, strict=False)],
        "word -word": [f"{a} -{b}" for a, b in itertools.pairwise(mid)],
        "a or b": [f"{a} or {b}" for a, b in zip(rare, mid, strict=False)],
        "in one conversation": [f"{w}&conversation_id={conversation}" for w in mid],
        "role filter": [f"{w}&role=assistant" for w in mid],
    }


def run_replay(env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "service.cli", "replay"], env=env, cwd=ROOT, check=True)
    return time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the database (and reuse a kept one)")
    parser.add_argument(
        "--scatter",
        action="store_true",
        help="rewrite the messages table in random order first, as rows written live lie (replay packs each user's)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks/search.py needs wrk: apt-get install wrk")

    server = server_url()
    admin = await asyncpg.connect(libpq(server))
    kept = args.keep and await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", DB)
    if kept:  # a kept database from a run that stopped before its read tables were built is made anew
        conn = await asyncpg.connect(libpq(server, DB))
        try:
            kept = await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL") and await conn.fetchval(
                "SELECT EXISTS (SELECT FROM messages)"
            )
        finally:
            await conn.close()
    if not kept:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DB}")
    db_url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env |= {
        "CHATLOG_DATABASE_URL": db_url,
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_LOG_LEVEL": "WARNING",
        "CHATLOG_DATA_DIR": tempfile.mkdtemp(prefix="chatlog-bench-data-"),
    }
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, cwd=ROOT, check=True)
    proc = None
    try:
        if not kept:
            started = time.monotonic()
            await generate(libpq(db_url), args.messages)
            print(f"wrote {args.messages:,} messages ({USERS} users) to the log in {time.monotonic() - started:.0f} s; "
                  f"replay built the read tables in {run_replay(env):.0f} s")  # fmt: skip
        conn = await asyncpg.connect(libpq(db_url))
        if args.scatter:
            started = time.monotonic()
            await conn.execute(SCATTER)
            print(f"rewrote the messages table in random order in {time.monotonic() - started:.0f} s")
        mine = await conn.fetchval("SELECT count(*) FROM messages WHERE user_id = 'bench-0'")
        total = await conn.fetchval("SELECT count(*) FROM messages")
        pages = await conn.fetchval(
            "SELECT count(DISTINCT (ctid::text::point)[0]) FROM messages WHERE user_id = 'bench-0'"
        )
        print(f"PostgreSQL {await conn.fetchval('SHOW server_version')}, {os.cpu_count()} cores; "
              f"{total:,} messages, {mine:,} of them bench-0's, on {pages:,} pages of the table")  # fmt: skip
        await conn.close()

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, f"{base}/healthz")
        headers = {"Authorization": f"Bearer {token('bench-0')}"}
        kinds = await queries(libpq(db_url))
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            for kind, qs in kinds.items():
                q, _, extra = qs[0].partition("&")
                r = await client.get(f"/v1/search?q={urllib.parse.quote(q)}&{extra}")
                assert r.status_code == 200, r.text
                print(f"  {kind:<22} e.g. {qs[0][:60]!r}: {len(r.json()['data'])} hits on the first page")

        def paths(qs: list[str]) -> list[str]:
            return [f"/v1/search?q={urllib.parse.quote(q.partition('&')[0])}&{q.partition('&')[2]}" for q in qs]

        print(f"\nGET /v1/search (20 results a page), concurrency 1, wrk {args.seconds:g} s x {args.rounds}:")
        every: list[str] = []
        for kind, qs in kinds.items():
            every += paths(qs)
            rounds = [
                wrk(base, rotating("GET", paths(qs), headers), connections=1, threads=1, seconds=args.seconds)
                for _ in range(args.rounds)
            ]
            print(f"  {kind:<22} p50 {statistics.median(r['p50_ms'] for r in rounds):6.2f} ms   "
                  f"p99 {statistics.median(r['p99_ms'] for r in rounds):6.2f} ms   "
                  f"non-2xx {sum(r['errors'] for r in rounds):.0f}")  # fmt: skip
        rounds = [
            wrk(base, rotating("GET", every, headers), connections=1, threads=1, seconds=args.seconds)
            for _ in range(args.rounds)
        ]
        print(f"  {'all kinds, rotating':<22} p50 {statistics.median(r['p50_ms'] for r in rounds):6.2f} ms   "
              f"p99 {statistics.median(r['p99_ms'] for r in rounds):6.2f} ms   (target p99 <= 20 ms)")  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
