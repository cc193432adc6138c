"""chatlog on a 3-node Citus cluster (a coordinator and two workers, made by this module): the
contract tests of conversations, messages, events, isolation, idempotency, search and own-writes
reads, run again here against a distributed database, and the cluster's own drills.

Needs Citus built into the server's binaries (`.ci/run` builds it from ../shared/citus); skips
without it, unless CHATLOG_TEST_REQUIRE_CITUS=1.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from projections.conversations import ConversationsProjection
from projections.replay import verify
from service.connections import ConnectionPool
from service.erasure import erase_conversation, erase_user
from service.events import ConversationStarted, MessageAppended
from service.eventstore import EventStore
from service.ids import uuid7
from service.sealing import new_master_key
from tests.citus import CitusCluster, CitusDatabases, require_citus
from tests.clusters import chatlog_env, pages
from tests.keys import KEYRING
from tests.support import Api, _free_port, auth, chatlog, new_user, serve

# The contract, again, on Citus: every test of these modules runs here with this module's
# `databases` (the conftest's `api` and `db_url` fixtures take it).
from tests.test_api import *  # noqa: F403
from tests.test_own_writes import *  # noqa: F403
from tests.test_search import *  # noqa: F403

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def citus() -> Iterator[CitusCluster]:
    cluster = CitusCluster(require_citus()).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def databases(citus: CitusCluster) -> CitusDatabases:
    return CitusDatabases(citus)


def chain(contents: list[str]) -> list[MessageAppended]:
    """A conversation's messages as the service writes them: numbered, each the previous one's child."""
    events: list[MessageAppended] = []
    for seq, content in enumerate(contents, 1):
        parent = events[-1].message_id if events else None
        events.append(MessageAppended(message_id=uuid7(), role="user", content=content, seq=seq, parent_id=parent))
    return events


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    from tests.conftest import _libpq

    conn = await asyncpg.connect(_libpq(url))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_migrate_distributes_every_per_user_table_by_user_colocated_with_the_trigger(
    databases: CitusDatabases,
) -> None:
    url = await databases.fresh()
    rows = await fetch(
        url,
        "SELECT logicalrelid::text, column_to_column_name(logicalrelid, partkey), colocationid "
        "FROM pg_dist_partition ORDER BY 1",
    )
    found = {r[0]: (r[1], r[2]) for r in rows}
    per_user = ["conversations", "data_keys", "erasures", "events", "idempotency_keys", "messages", "projection_marks"]
    assert {t: found[t][0] for t in per_user} == dict.fromkeys(per_user, "user_id")
    assert len({found[t][1] for t in per_user}) == 1, "the per-user tables are colocated"
    assert found["stream_owners"][0] == "stream_id"
    local = {r[0] for r in await fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")} - set(found)
    assert local == {"alembic_version", "log_clock", "projection_checkpoints"}
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await fetch(url, "DELETE FROM events WHERE user_id = 'anyone'")
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await fetch(url, "UPDATE events SET type = 'x' WHERE user_id = 'anyone'")


async def test_concurrent_appends_of_many_users_in_four_slices_are_each_listed_once_and_verify_passes(
    citus: CitusCluster, databases: CitusDatabases, tmp_path: Path
) -> None:
    url = await databases.fresh()
    # Four projection slices, each a quarter of the shards (8 here), folding side by side.
    env = chatlog_env(url, tmp_path / "data", CHATLOG_PROJECTION_SLICES="4")
    served = serve(env, _free_port(), tmp_path / "serve.log")
    api = Api(served.base_url, url)
    try:
        users = [new_user() for _ in range(24)]
        conversations = {u: [(await api.create(u))["id"] for _ in range(2)] for u in users}

        gate = asyncio.Semaphore(32)  # 32 requests in flight at a time, the benchmarks' concurrency

        async def post(user: str, cid: str, i: int) -> tuple[str, str, int, dict[str, object]]:
            async with gate:
                return await post_now(user, cid, i)

        async def post_now(user: str, cid: str, i: int) -> tuple[str, str, int, dict[str, object]]:
            r = await api.client.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": "user", "content": f"{user} {cid} {i}"},
                headers=auth(user),
            )
            return user, cid, r.status_code, r.json()

        answers = await asyncio.gather(*(post(u, cid, i) for u in users for cid in conversations[u] for i in range(8)))
        assert Counter(status for *_, status, _ in answers) == {201: len(users) * 2 * 8}
        for user in users:
            for cid in conversations[user]:
                listed = await pages(api, user, f"/v1/conversations/{cid}/messages", limit=100)
                acknowledged = [body["id"] for u, c, _, body in answers if u == user and c == cid]
                assert sorted(m["id"] for m in listed) == sorted(acknowledged), "each 201 listed exactly once"
                assert [m["seq"] for m in listed] == list(range(1, 9))
            feed = await pages(api, user, "/v1/events", limit=100)
            assert len(feed) == len({e["position"] for e in feed}) == 2 + 16, "each event in the feed once"

        placement = citus.placements(url.rsplit("/", 1)[1])
        print("users per worker:", {port: len(found) for port, found in placement.items()})
        assert set(placement) == {w.port for w in citus.workers}
        assert all(len(found) >= 2 for found in placement.values()), placement
    finally:
        await api.client.aclose()
        out = served.stop()
    assert "Traceback" not in out, out
    done = chatlog(env, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    done = chatlog(env, "replay")
    assert done.returncode == 0, done.stdout + done.stderr
    done = chatlog(env, "replay", "--slice", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    done = chatlog(env, "verify")
    assert done.returncode == 0, done.stdout + done.stderr


# The worker's connection (named after its process) inside a batch, on the coordinator: the batch's
# transaction has an id once it has locked its checkpoint row, and keeps it until it commits.
_IN_A_BATCH = (
    "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'chatlog-projection-%-' || $1::text "
    "AND backend_xid IS NOT NULL"
)


async def test_a_projection_worker_killed_mid_batch_ten_times_loses_and_doubles_nothing(
    databases: CitusDatabases, tmp_path: Path
) -> None:
    url = await databases.fresh()
    env = chatlog_env(url, tmp_path / "data", CHATLOG_PROJECTION_BATCH_SIZE="50")
    pool = ConnectionPool(url, size=8)
    store = EventStore(pool, KEYRING)
    expected: dict[uuid.UUID, int] = {}
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        user = f"killer-{n}"
        while not stop.is_set():
            stream = uuid7()
            await store.append(user, stream, [ConversationStarted(title=f"{n}")])
            count = random.randint(1, 4)
            for event in chain([f"{n} {i}" for i in range(count)]):
                await store.append(user, stream, [event])
            expected[stream] = count

    writers = [asyncio.create_task(writer(n)) for n in range(6)]
    kills = 0
    try:
        for _ in range(10):
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "project"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(random.uniform(0.5, 1.2))  # batches of 50 under a stream of appends
            for _ in range(2000):  # then kill it inside a batch: its transaction begun, not committed
                if await fetch(url, _IN_A_BATCH, str(proc.pid)):
                    break
                await asyncio.sleep(0.001)
            else:
                raise AssertionError("the worker was never seen inside a batch")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
        stop.set()
        await asyncio.gather(*writers)
    finally:
        stop.set()
        await store.aclose()
        await pool.close()
    assert kills == 10 and len(expected) > 30
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "project"], env=env)
    try:
        for _ in range(600):
            rows = await fetch(url, "SELECT id, message_count FROM conversations")
            if {r[0]: r[1] for r in rows} == expected:
                break
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    rows = await fetch(url, "SELECT id, message_count FROM conversations")
    assert {r[0]: r[1] for r in rows} == expected, "a conversation's messages are missing or doubled"
    doubled = await fetch(url, "SELECT conversation_id, seq FROM messages GROUP BY 1, 2 HAVING count(*) > 1")
    assert doubled == []
    assert await verify(url, ConversationsProjection(search_config="simple"), KEYRING) == []


async def test_a_single_server_database_moves_into_the_cluster_by_dump_restore_and_migrate(
    citus: CitusCluster, tmp_path: Path
) -> None:
    """The documented way from one server to Citus: pg_dump the single server's database, restore
    it into a Citus database, run `chatlog migrate` (which distributes what it finds)."""
    coordinator = citus.coordinator
    single = f"single_{uuid.uuid4().hex[:8]}"
    coordinator.psql(f"CREATE DATABASE {single}")  # no citus extension in it: a plain PostgreSQL database
    single_env = chatlog_env(coordinator.url(single), tmp_path / "single")
    assert chatlog(single_env, "migrate").returncode == 0
    pool = ConnectionPool(coordinator.url(single), size=4)
    store = EventStore(pool, KEYRING)
    streams = {}
    for n in range(6):
        stream = uuid7()
        await store.append(f"mover-{n}", stream, [ConversationStarted(title=f"moved {n}")])
        for event in chain([f"m{n}-{i}" for i in range(3)]):
            await store.append(f"mover-{n}", stream, [event])
        streams[stream] = f"mover-{n}"
    await store.aclose()
    await pool.close()
    done = chatlog(single_env, "replay")  # the read tables and their checkpoint move in too
    assert done.returncode == 0, done.stdout + done.stderr
    dump = tmp_path / "single.dump"
    bin_dir = coordinator.bin
    subprocess.run(
        [str(bin_dir / "pg_dump"), "-Fc", "-f", str(dump), coordinator.url(single)], check=True, capture_output=True
    )

    target = citus.create_bare()
    restored = subprocess.run(
        [str(bin_dir / "pg_restore"), "--no-owner", "-d", coordinator.url(target), str(dump)],
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr
    env = chatlog_env(coordinator.url(target), tmp_path / "target")
    done = chatlog(env, "migrate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "distributed the log" in done.stderr
    rows = await fetch(
        coordinator.url(target), "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'events'::regclass"
    )
    assert rows[0][0] == 1
    assert (await fetch(coordinator.url(target), "SELECT count(*) FROM events"))[0][0] == 6 * 4
    owners = await fetch(coordinator.url(target), "SELECT stream_id, user_id FROM stream_owners")
    assert dict(owners) == streams
    done = chatlog(env, "verify")  # the moved read tables, as they came
    assert done.returncode == 0, done.stdout + done.stderr
    served = serve(env, _free_port(), tmp_path / "serve.log")
    api = Api(served.base_url, coordinator.url(target))
    try:
        for stream, user in streams.items():
            listed = await pages(api, user, f"/v1/conversations/{stream}/messages", limit=100, tree="true")
            assert [m["content"] for m in listed] == [f"m{user.split('-')[1]}-{i}" for i in range(3)]
            r = await api.client.post(
                f"/v1/conversations/{stream}/messages", json={"role": "user", "content": "after"}, headers=auth(user)
            )
            assert r.status_code == 201, r.text
            assert r.json()["seq"] == 4
    finally:
        await api.client.aclose()
        served.stop()
    # Then the maintenance commands, on the cluster: replay, a master key rotation, verify.
    done = chatlog(env, "replay")
    assert done.returncode == 0, done.stdout + done.stderr
    rotating = env | {"CHATLOG_MASTER_KEY": f"{new_master_key()},{env['CHATLOG_MASTER_KEY']}"}
    done = chatlog(rotating, "keys", "rotate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "re-wrapped 6 data key(s)" in done.stdout, done.stdout
    done = chatlog(rotating, "verify")
    assert done.returncode == 0, done.stdout + done.stderr


async def test_group_commit_batches_users_of_a_shard_and_never_commits_the_log_in_two_phases(
    databases: CitusDatabases,
) -> None:
    """A batch that wrote to two workers would commit in two phases, and a reader could pass its
    transaction id before its rows are visible: each batch keeps to one shard."""
    url = await databases.fresh()
    pool = ConnectionPool(url, size=8)
    store = EventStore(pool, KEYRING)
    try:
        users = [f"batched-{i}" for i in range(40)]
        streams = {u: uuid7() for u in users}
        await asyncio.gather(*(store.append(u, streams[u], [ConversationStarted(title=u)]) for u in users))
        before = {tuple(r) for r in await fetch(url, "SELECT groupid, gid FROM pg_dist_transaction")}
        assert store.group is not None
        batches = store.group.batches
        for round_ in range(5):
            await asyncio.gather(*(store.append(u, streams[u], chain([f"{u} {round_}"])[:1]) for u in users))
        assert store.group.batches > batches, "appends that came together went in batches"
        async with pool.acquire() as conn:  # erasures write the log too
            await erase_conversation(conn, users[0], streams[users[0]])
            await erase_user(conn, users[1])
        after = {tuple(r) for r in await fetch(url, "SELECT groupid, gid FROM pg_dist_transaction")}
        assert after - before == set(), "a transaction that wrote the log committed in two phases"
        counts = await fetch(url, "SELECT user_id, count(*) FROM events GROUP BY user_id")
        assert {r[0]: r[1] for r in counts} == {u: 7 if u in users[:2] else 6 for u in users}
        erased = await fetch(url, "SELECT user_id FROM data_keys WHERE user_id = ANY($1)", users[:2])
        assert erased == [], "the erased conversations' keys are gone"
    finally:
        await store.aclose()
        await pool.close()
