"""HTTP throughput and history latency of `chatlog serve`, next to a naive endpoint, in one run.

    python benchmarks/http.py [--seconds 10] [--rounds 2] [--messages 1000000] [--skip-history]

Needs `wrk` (Debian: apt-get install wrk). Uses CHATLOG_DATABASE_URL when set, else an embedded
PostgreSQL in a temporary directory; works in a fresh database `chatlog_bench_http`.

1. Appends: one `chatlog serve` process (one uvicorn worker, the projection worker in-process)
   takes POST /v1/conversations/{id}/messages from wrk at concurrency 32 (256 conversations,
   round robin); in the same run, rounds alternating, `benchmarks/naive_app.py` (Litestar +
   asyncpg, one INSERT per request, same server, one worker) takes the same load.
2. History: N messages (default 1,000,000, in conversations of 100) are written to the log,
   the projection catches up, then wrk at concurrency 1 reads 50-message pages
   (GET /v1/conversations/{id}/messages?limit=50) and reports p50 and p99.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py, as asked; run as a script, its folder would shadow the standard
# library's `http` package for everything imported after it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import os
import re
import shutil
import socket
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

from service.database import embedded_url

DB = "chatlog_bench_http"
SECRET = "benchmark-secret-" + "x" * 48


def libpq(url: str, database: str | None = None) -> str:
    u = make_url(url).set(drivername="postgresql")
    return (u.set(database=database) if database else u).render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")


def start(cmd: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    log = tempfile.NamedTemporaryFile(prefix="chatlog-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(health, timeout=1).status_code < 500:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} exited; its output: {log.name}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd} did not answer {health}")


def wrk(url: str, script: str, *, connections: int, seconds: float, threads: int = 2) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    duration = f"-d{max(1, round(seconds))}s"
    command = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", duration, "--latency", "-s", f.name, url]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            result[f"p{pct}_ms"] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return result


def rotating(method: str, paths: list[str], headers: dict[str, str], body: str | None = None) -> str:
    lua_paths = ",\n".join(f'"{p}"' for p in paths)
    lua_headers = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
    lua_body = f"[[{body}]]" if body is not None else "nil"
    return f"""
local paths = {{ {lua_paths} }}
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("{method}", paths[i], {{ {lua_headers} }}, {lua_body})
end
"""


GENERATE = """
INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata)
SELECT gen_random_uuid(), c.id, v, 'bench-' || (c.n % 100),
       CASE WHEN v = 1 THEN 'conversation.started' ELSE 'message.appended' END,
       CASE WHEN v = 1
            THEN jsonb_build_object('type', 'conversation.started', 'title', 'bench ' || c.n, 'metadata', '{}'::jsonb)
            ELSE jsonb_build_object('type', 'message.appended', 'message_id', gen_random_uuid(), 'role',
                                    CASE WHEN v % 2 = 0 THEN 'user' ELSE 'assistant' END,
                                    'content', repeat('lorem ipsum dolor ', 12), 'metadata', '{}'::jsonb,
                                    'seq', v - 1)
       END,
       '{"schema_version": 1}'::jsonb
FROM (SELECT n, md5('bench' || n)::uuid AS id FROM generate_series($1::int, $2::int) AS n) AS c,
     generate_series(1, 101) AS v
ORDER BY c.n, v
"""


async def generate_history(dsn: str, messages: int) -> list[str]:
    """`messages` messages in conversations of 100; the ids of user bench-0's conversations."""
    conversations = max(1, messages // 100)
    conn = await asyncpg.connect(dsn)
    try:
        for first in range(0, conversations, 1000):
            await conn.execute(GENERATE, first, min(first + 1000, conversations) - 1)
        rows = await conn.fetch(
            "SELECT DISTINCT stream_id FROM events WHERE user_id = 'bench-0' AND stream_version = 1 LIMIT 100"
        )
        return [str(r[0]) for r in rows]
    finally:
        await conn.close()


async def wait_caught_up(base: str) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        while (await client.get(f"{base}/readyz")).json()["projections"]["conversations"]["lag"] > 0:
            await asyncio.sleep(1)
    return time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument(
        "--projector",
        choices=["in-process", "separate"],
        default="in-process",
        help="run the projection worker inside the API process (default) or as `chatlog project` beside it",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks/http.py needs wrk: apt-get install wrk")

    server = os.environ.get("CHATLOG_DATABASE_URL") or embedded_url(Path(tempfile.mkdtemp(prefix="chatlog-bench-")))
    admin = await asyncpg.connect(libpq(server))
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {DB}")
    db_url = make_url(server).set(database=DB).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env |= {
        "CHATLOG_DATABASE_URL": db_url,
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_LOG_LEVEL": "WARNING",
        "CHATLOG_DATA_DIR": tempfile.mkdtemp(prefix="chatlog-bench-data-"),
        "NAIVE_DSN": libpq(db_url),
    }
    port, naive_port = free_port(), free_port()
    base, naive = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{naive_port}"
    serve = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    if args.projector == "separate":
        serve.append("--no-workers")
    procs = [
        start(serve, env, f"{base}/healthz"),
        start(
            [sys.executable, "-m", "uvicorn", "benchmarks.naive_app:app", "--port", str(naive_port),
             "--log-level", "warning", "--no-access-log"],
            env,
            f"{naive}/",
        ),
    ]  # fmt: skip
    if args.projector == "separate":
        procs.append(start([sys.executable, "-m", "service.cli", "project"], env, f"{base}/healthz"))
    try:
        conn = await asyncpg.connect(libpq(db_url))
        print(f"PostgreSQL {await conn.fetchval('SHOW server_version')}, {os.cpu_count()} cores, "
              f"wrk {args.seconds:g} s per measurement, projection worker {args.projector}")  # fmt: skip
        await conn.close()
        headers = {"Authorization": f"Bearer {token('bench-writer')}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            ids = [
                (await client.post("/v1/conversations", json={"title": f"c{i}"}, headers=headers)).json()["id"]
                for i in range(256)
            ]
        body = '{"role": "user", "content": "' + "benchmark message " * 8 + '"}'
        ours = rotating("POST", [f"/v1/conversations/{i}/messages" for i in ids], headers, body)
        theirs = rotating("POST", [f"/naive/{i}/messages" for i in ids], {"Content-Type": "application/json"}, body)
        results: dict[str, list[dict[str, float]]] = {"chatlog": [], "naive": []}
        for _ in range(args.rounds):
            results["naive"].append(wrk(naive, theirs, connections=32, seconds=args.seconds))
            results["chatlog"].append(wrk(base, ours, connections=32, seconds=args.seconds))
        c = statistics.median(r["rps"] for r in results["chatlog"])
        n = statistics.median(r["rps"] for r in results["naive"])
        errors = sum(r["errors"] for rs in results.values() for r in rs)
        print(f"\nappend, concurrency 32: chatlog {c:,.0f} req/s, naive {n:,.0f} req/s, ratio {c / n:.2f} "
              f"(target >= 0.80); non-2xx answers: {errors:.0f}")  # fmt: skip
        for name, rs in results.items():
            print(f"  {name:>8} rounds: " + ", ".join(f"{r['rps']:,.0f} (p99 {r.get('p99_ms', 0):.1f} ms)" for r in rs))

        if not args.skip_history:
            started = time.monotonic()
            conversations = await generate_history(libpq(db_url), args.messages)
            print(f"\nhistory: wrote {args.messages:,} messages in {time.monotonic() - started:.0f} s; ", end="")
            print(f"projection caught up in {await wait_caught_up(base):.0f} s")
            reader = {"Authorization": f"Bearer {token('bench-0')}"}
            pages = rotating("GET", [f"/v1/conversations/{i}/messages?limit=50" for i in conversations], reader)
            rounds = [wrk(base, pages, connections=1, threads=1, seconds=args.seconds) for _ in range(args.rounds)]
            p50 = statistics.median(r["p50_ms"] for r in rounds)
            p99 = statistics.median(r["p99_ms"] for r in rounds)
            print(f"history page (50 messages), concurrency 1: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                  f"(target p99 <= 5 ms); {statistics.median(r['rps'] for r in rounds):,.0f} pages/s; "
                  f"non-2xx answers: {sum(r['errors'] for r in rounds):.0f}")  # fmt: skip
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
