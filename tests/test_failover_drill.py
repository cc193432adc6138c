"""Drill: a primary with a synchronous physical standby, appends streaming at concurrency 8, the
primary stopped in immediate mode and the standby promoted. chatlog, given both hosts with
`target_session_attrs=read-write`, goes on without a restart: every 201 answered before, during
and after is listed exactly once, and `chatlog verify` finds the read tables equal to the log."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.clusters import Appends, Cluster, chatlog_env, pages, require_pg_bin, standby_of
from tests.support import Api, _free_port, new_user, serve

pytestmark = pytest.mark.cluster


async def test_failover_to_a_synchronous_standby_loses_no_acknowledged_append(tmp_path: Path) -> None:
    primary = Cluster(require_pg_bin()).init()
    with (primary.data / "postgresql.conf").open("a") as conf:
        conf.write("synchronous_standby_names = '*'\nsynchronous_commit = on\nwal_level = replica\n")
    primary.start()
    standby = standby_of(primary)
    standby.start()
    deadline = time.monotonic() + 30
    while primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1":
        assert time.monotonic() < deadline, "the standby never became synchronous"
        await asyncio.sleep(0.1)

    # libpq's form: both hosts in the address, the writable one wanted.
    url = f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres?target_session_attrs=read-write"
    env = chatlog_env(url, tmp_path / "data")
    served = serve(env, _free_port(), tmp_path / "serve.log")
    api = Api(served.base_url, url)
    try:
        user = new_user()
        conversations = [(await api.create(user))["id"] for _ in range(8)]
        appends = Appends(api, user, conversations, "failover")
        await asyncio.sleep(2)
        failed_at = time.monotonic()
        await asyncio.to_thread(primary.stop, "immediate")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(standby._run, str(standby.bin / "pg_ctl"), "-D", str(standby.data), "-w", "promote")
        await appends.answered_after(failed_at, 30, "the failover")
        await asyncio.sleep(2)
        await appends.stop()

        answered = [a.at for a in appends.answers if a.status == 201]
        before = [t for t in answered if t < failed_at]
        after = [t for t in answered if t > failed_at]
        unavailable = max(b - a for a, b in itertools.pairwise(sorted(t for t in answered if t > failed_at - 1)))
        failures = appends.failures()
        assert all(f.status == 503 and f.body["code"] == "not_ready" for f in failures), failures[:3]
        acknowledged = appends.acknowledged()

        listed: Counter[str] = Counter()
        for cid in conversations:
            messages = await pages(api, user, f"/v1/conversations/{cid}/messages", limit=100)
            listed.update(m["id"] for m in messages)
            assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
        assert all(listed[m["id"]] == 1 for m in acknowledged), "an acknowledged append is lost or doubled"
        assert max(listed.values()) == 1

        verify = subprocess.run(
            [sys.executable, "-m", "service.cli", "verify"], env=env, capture_output=True, text=True, timeout=120
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        print(
            f"failover: {len(acknowledged)} appends acknowledged ({len(before)} before, {len(after)} after); "
            f"{len(failures)} answers 503; unavailable for {unavailable:.1f} s"
        )
    finally:
        await api.client.aclose()
        out = served.stop()
        primary.destroy()
        standby.destroy()
    assert "Traceback" not in out, out[-5000:]
