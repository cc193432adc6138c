"""The price of distribution: `chatlog serve` on one PostgreSQL server beside the same on a 3-node
Citus cluster, in one run on this machine.

    python benchmarks/scale.py [--seconds 10] [--rounds 1] [--history-messages 20000]
                               [--history-seconds 5] [--shards 32]

Needs `wrk` (Debian: apt-get install wrk), PostgreSQL's server binaries and Citus installed beside
them (../shared/citus/build.sh). Makes its own clusters, each in a temporary folder, all with the
knobs of tests/clusters.py (fsync off, 32 MB of shared buffers, 100 connections): one plain
PostgreSQL server, and a coordinator with two workers (tests/citus.py; Citus preloaded, the
database distributed by `chatlog migrate` over `--shards` shards). Both are removed at the end,
also after an error or Ctrl-C. CHATLOG_DATABASE_URL is not used: the comparison needs both
targets set up alike on this machine, and their servers' CPU.

Everything shares this machine's cores, the three Citus nodes included: the figures are what
distribution costs (the coordinator's planning and routing, a hop to a worker for every
statement), not what it gains, which comes from workers on machines of their own.

For each target: `chatlog migrate`; 256 users with one conversation each (their appends spread
over the shards); `--history-messages` messages of one reader, in conversations of 100, written
through the event store (sealed, as the service writes). Then, per round, each target in turn
(rounds alternate, so drift hits both alike), `chatlog serve` started afresh (its projection
worker in-process):

1. Appends: wrk at concurrency 32 posts messages round robin over the 256 conversations, each as
   its owner, for `--seconds` → req/s, after a warm-up until the rate is steady (every pooled
   connection open: a new connection's first statements introspect types, which costs a Citus
   coordinator far more; the line before the rounds shows how much). Meanwhile the CPU of every
   process of each PostgreSQL cluster (live ones, and ended ones through the postmaster's
   children's time) and of `chatlog serve` is read from /proc; divided by the events appended,
   it is the CPU per event of the single server, or of the coordinator and of the two workers
   together (the projection's fold of each event included: it runs meanwhile).
2. History: once the projection has caught up, wrk at concurrency 1 reads 50-message pages
   (GET /v1/conversations/{id}/messages?limit=50) of the reader's conversations for
   `--history-seconds`, after a second's warm-up → p50 and p99.

The last lines put the CPU per event on paper: how many events a second one core of each role
would hold, the arithmetic behind the README's guide to how many nodes a rate needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on the path, and its http.py would shadow the
# standard library's `http` package for everything imported after it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import base64
import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from typing import NamedTuple

import asyncpg
import httpx

from benchmarks.common import libpq, process_cpu_seconds
from benchmarks.http import SECRET, STAGGERED, free_port, rotating, start, stop, token, wait_caught_up, wrk
from service.connections import ConnectionPool
from service.events import ConversationStarted, MessageAppended
from service.eventstore import EventStore
from service.ids import uuid7
from service.sealing import Keyring, parse_master_keys
from service.settings import database_url
from tests.citus import CitusCluster
from tests.clusters import Cluster, pg_bin

DB = "chatlog_bench_scale"
USERS = 256
READER = "bench-reader"
CONTENT = "benchmark message " * 8
NAN = float("nan")
MASTER_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()


class Target(NamedTuple):
    name: str
    url: str  # the database chatlog uses (the coordinator's, on Citus)
    coordinator: Cluster  # the single server, or the Citus coordinator
    workers: list[Cluster]
    env: dict[str, str]


def cluster_cpu_seconds(cluster: Cluster) -> float:
    """CPU seconds spent so far by a cluster's processes: the postmaster and its live descendants,
    and, through the postmaster's children's time, the backends that have ended (Citus closes
    the connections to the workers that a statement opened beyond the one it caches)."""
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    live = process_cpu_seconds(pid)
    if live is None:
        raise SystemExit(f"the postmaster of {cluster.data} (pid {pid}) is gone")
    return live + reaped


def appends(paths: list[str], tokens: list[str]) -> str:
    """wrk's script: POST a message to each path in turn, as the path's owner, each wrk thread
    starting at a place of its own (`STAGGERED`)."""
    lua_paths = ",\n".join(f'"{p}"' for p in paths)
    lua_tokens = ",\n".join(f'"{t}"' for t in tokens)
    body = '{"role": "user", "content": "' + CONTENT + '"}'
    return f"""
local paths = {{ {lua_paths} }}
local tokens = {{ {lua_tokens} }}
{STAGGERED}request = function()
  i = i % #paths + 1
  return wrk.format("POST", paths[i], {{ ["Authorization"] = "Bearer " .. tokens[i],
                                        ["Content-Type"] = "application/json" }}, [[{body}]])
end
"""


def chatlog_env(url: str, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    return env | {
        "CHATLOG_DATABASE_URL": url,
        "CHATLOG_JWT_SECRET": SECRET,
        "CHATLOG_MASTER_KEY": MASTER_KEY,
        "CHATLOG_LOG_LEVEL": "WARNING",
        "CHATLOG_DATA_DIR": str(data),
    }


def single_target(bin_dir: Path, scratch: Path, made: list[Cluster]) -> Target:
    server = Cluster(bin_dir)
    made.append(server)
    server.init()
    server.start()
    server.psql(f"CREATE DATABASE {DB}")
    url = database_url(server.url(DB))
    return Target("single", url, server, [], chatlog_env(url, scratch / "single"))


def citus_target(bin_dir: Path, shards: int, scratch: Path, made: list[Cluster]) -> Target:
    cluster = CitusCluster(bin_dir)
    made.extend(cluster.nodes)
    cluster.start()
    name = cluster.create_bare()
    cluster.coordinator.psql(f"ALTER DATABASE {name} SET citus.shard_count = {shards}", name)
    url = cluster.url(name)
    return Target("citus", url, cluster.coordinator, cluster.workers, chatlog_env(url, scratch / "citus"))


def serve(target: Target) -> tuple[subprocess.Popen[bytes], str]:
    base = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "service.cli", "serve", "--port", base.rsplit(":", 1)[1]]
    return start(command, target.env, f"{base}/healthz"), base


def halt(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `chatlog serve` of `start`, and remove its log unless it failed (where /proc exists)."""
    log = Path(os.readlink(f"/proc/{proc.pid}/fd/1")) if Path(f"/proc/{proc.pid}/fd/1").exists() else None
    stop(proc)
    if log is not None and log.name.startswith("chatlog-bench-"):
        log.unlink(missing_ok=True)


async def history(target: Target, messages: int) -> None:
    """The reader's `messages` messages, in conversations of 100, appended through the event store."""
    store = EventStore(ConnectionPool.for_appends(target.url, size=8), Keyring(parse_master_keys(MASTER_KEY)))
    limit = asyncio.Semaphore(8)

    async def conversation(n: int, size: int) -> None:
        async with limit:
            cid = uuid7()
            await store.append(READER, cid, [ConversationStarted(title=f"history {n}")], expected_version=0)
            batch, parent = [], None
            for seq in range(1, size + 1):
                m = MessageAppended(message_id=uuid7(), role="user", content=CONTENT, seq=seq, parent_id=parent)
                batch.append(m)
                parent = m.message_id
            await store.append(READER, cid, batch, expected_version=1)

    try:
        sizes = [100] * (messages // 100) + ([messages % 100] if messages % 100 else [])
        await asyncio.gather(*(conversation(n, size) for n, size in enumerate(sizes)))
    finally:
        await store.aclose()
        await store.pool.close()


async def prepare(target: Target, messages: int) -> list[str]:
    """Migrate, create the writers' conversations and the reader's history; the writers' paths."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=target.env, cwd=ROOT, check=True)
    migrated = time.monotonic() - started
    proc, base = serve(target)
    try:
        limit = asyncio.Semaphore(16)

        async def create(client: httpx.AsyncClient, user: int) -> str:
            async with limit:
                headers = {"Authorization": f"Bearer {token(f'bench-{user}')}"}
                r = await client.post("/v1/conversations", json={"title": f"c{user}"}, headers=headers)
                r.raise_for_status()
                return str(r.json()["id"])

        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            ids = await asyncio.gather(*(create(client, user) for user in range(USERS)))
        written = time.monotonic()
        await history(target, messages)
        caught_up = await wait_caught_up(base)
        print(f"  {target.name}: migrated in {migrated:.1f} s; {messages:,} messages of history written in "
              f"{time.monotonic() - written - caught_up:.1f} s, projected {caught_up:.0f} s later")  # fmt: skip
    finally:
        halt(proc)
    return [f"/v1/conversations/{cid}/messages" for cid in ids]


async def events(target: Target) -> int:
    conn = await asyncpg.connect(libpq(target.url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def reader_pages(target: Target) -> str:
    conn = await asyncpg.connect(libpq(target.url))
    try:
        rows = await conn.fetch("SELECT id FROM conversations WHERE user_id = $1 LIMIT 100", READER)
    finally:
        await conn.close()
    headers = {"Authorization": f"Bearer {token(READER)}"}
    return rotating("GET", [f"/v1/conversations/{r['id']}/messages?limit=50" for r in rows], headers)


def warm_up(base: str, writes: str) -> float:
    """Appends in 2-second slices until one's rate is within 10 % of the one before (at most a
    minute): every connection of the pools opened, the heads remembered; how long it took."""
    started, last = time.monotonic(), 0.0
    while time.monotonic() - started < 60:
        rate = wrk(base, writes, connections=32, seconds=2)["rps"]
        if last and abs(rate - last) <= 0.1 * max(rate, last):
            break
        last = rate
    return time.monotonic() - started


async def first_statement_ms(target: Target) -> float:
    """A new connection's first statement with a `uuid[]` parameter, which asyncpg does not know
    yet: its type introspection (a catalog query, once per connection and type), median of 3."""
    times = []
    for _ in range(3):
        conn = await asyncpg.connect(libpq(target.url))
        try:
            began = time.perf_counter()
            await conn.fetchval("SELECT cardinality($1::uuid[])", [uuid7()])
            times.append((time.perf_counter() - began) * 1000)
        finally:
            await conn.close()
    return statistics.median(times)


async def measure(target: Target, writes: str, reads: str, args: argparse.Namespace) -> dict[str, float]:
    proc, base = serve(target)
    try:
        warmed = warm_up(base, writes)
        before = await events(target)
        nodes = (target.coordinator, *target.workers)
        cpu = [cluster_cpu_seconds(node) for node in nodes]
        chatlog = process_cpu_seconds(proc.pid)
        measured = wrk(base, writes, connections=32, seconds=args.seconds)
        chatlog_after = process_cpu_seconds(proc.pid)
        spent = [cluster_cpu_seconds(node) - was for node, was in zip(nodes, cpu, strict=True)]
        appended = await events(target) - before
        await wait_caught_up(base)
        wrk(base, reads, connections=1, threads=1, seconds=1)  # warm-up: the reads' connection
        read = wrk(base, reads, connections=1, threads=1, seconds=args.history_seconds)
    finally:
        halt(proc)
    us = 1e6 / max(appended, 1)
    result = {
        "rps": measured["rps"],
        "errors": measured["errors"] + read["errors"],
        "p50": read["p50_ms"],
        "p99": read["p99_ms"],
        "warm_up": warmed,
        "coordinator_us": spent[0] * us,
        "workers_us": sum(spent[1:]) * us if target.workers else NAN,
    }
    if chatlog is not None and chatlog_after is not None:
        result["chatlog_us"] = (chatlog_after - chatlog) * us
    return result


async def run(args: argparse.Namespace, scratch: Path, made: list[Cluster]) -> None:
    bin_dir = pg_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        raise SystemExit("no PostgreSQL server binaries (apt-get install postgresql)")
    libdir = subprocess.run([str(bin_dir / "pg_config"), "--pkglibdir"], capture_output=True, text=True).stdout
    if not (Path(libdir.strip()) / "citus.so").exists():
        raise SystemExit(f"Citus is not installed in {libdir.strip()}: run ../shared/citus/build.sh (as root)")
    started = time.monotonic()
    targets = [single_target(bin_dir, scratch, made), citus_target(bin_dir, args.shards, scratch, made)]
    conn = await asyncpg.connect(libpq(targets[1].url))
    version = await conn.fetchval("SHOW server_version")
    citus = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
    await conn.close()
    print(f"PostgreSQL {version}, Citus {citus} ({args.shards} shards, coordinator + 2 workers), "
          f"{os.cpu_count()} cores shared by all; clusters made in {time.monotonic() - started:.0f} s")  # fmt: skip
    writes, reads = {}, {}
    for target in targets:
        paths = await prepare(target, args.history_messages)
        writes[target.name] = appends(paths, [token(f"bench-{user}") for user in range(USERS)])
        reads[target.name] = await reader_pages(target)
    firsts = [f"{t.name} {await first_statement_ms(t):.0f} ms" for t in targets]
    print(f"  a new connection's first statement with a uuid[] parameter (asyncpg's type introspection): "
          f"{', '.join(firsts)}")  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for target in targets:
            got = await measure(target, writes[target.name], reads[target.name], args)
            results.setdefault(target.name, []).append(got)
            print(f"  round {round_ + 1}, {target.name}: steady after {got['warm_up']:.0f} s of warm-up; "
                  f"{got['rps']:,.0f} req/s, history p99 {got['p99']:.2f} ms")  # fmt: skip
    report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    fields = ("rps", "p50", "p99", "chatlog_us", "coordinator_us", "workers_us")
    med = {name: {f: statistics.median(r.get(f, NAN) for r in rs) for f in fields} for name, rs in results.items()}
    errors = sum(r["errors"] for rs in results.values() for r in rs)
    print(
        f"\nappends at concurrency 32 ({args.seconds:g} s), 50-message history pages at concurrency 1 "
        f"({args.history_seconds:g} s); medians of {args.rounds} round(s); non-2xx answers: {errors:.0f}"
    )
    print("CPU per event appended, in µs (on one server, its PostgreSQL stands under coordinator)\n")
    row = "  {:<14}{:>13}{:>13}{:>13}{:>12}{:>16}{:>12}"
    print(row.format("target", "append req/s", "history p50", "history p99", "chatlog µs", "coordinator µs",
                     "workers µs"))  # fmt: skip
    for name, m in med.items():
        print(row.format(name, f"{m['rps']:,.0f}", f"{m['p50']:.2f} ms", f"{m['p99']:.2f} ms",
                         *(figure(m[f]) for f in ("chatlog_us", "coordinator_us", "workers_us"))))  # fmt: skip
    s, c = med["single"], med["citus"]
    ratios = [c[f] / s[f] for f in ("rps", "p50", "p99", "chatlog_us", "coordinator_us")]
    total = (c["coordinator_us"] + c["workers_us"]) / s["coordinator_us"]
    print(row.format("citus/single", *(f"{r:.2f} x" for r in ratios), f"{total:.2f} x"), " (workers: cluster total)")
    print(f"\non paper, the appends a second one core of each holds: the single server's PostgreSQL "
          f"{per_core(s['coordinator_us'])}; the Citus coordinator {per_core(c['coordinator_us'])}, the workers "
          f"{per_core(c['workers_us'])}; chatlog serve {per_core(s['chatlog_us'])} on one server, "
          f"{per_core(c['chatlog_us'])} on Citus")  # fmt: skip


def figure(us: float) -> str:
    return "-" if math.isnan(us) else f"{us:.0f}"


def per_core(us: float) -> str:
    return "-" if math.isnan(us) or us <= 0 else f"{1e6 / us:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="append measurement, per target and round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each measuring single then citus")
    parser.add_argument("--history-messages", type=int, default=20_000, help="the reader's messages, per target")
    parser.add_argument("--history-seconds", type=float, default=5.0, help="history measurement, per target and round")
    parser.add_argument("--shards", type=int, default=32, help="citus.shard_count of the distributed tables")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks/scale.py needs wrk: apt-get install wrk")
    # SIGTERM ends the run as Ctrl-C does: through the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    made: list[Cluster] = []
    scratch = Path(tempfile.mkdtemp(prefix="chatlog-bench-scale-"))  # chatlog's data folders
    try:
        asyncio.run(run(args, scratch, made))
    finally:
        for cluster in made:
            cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
