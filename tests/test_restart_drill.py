"""Drill: PostgreSQL stopped and started again under append load, at random moments (also while
it is starting up), with one `chatlog serve` running throughout. After each restart appends are
answered and projected again within seconds, without restarting chatlog; every failure answer
meanwhile is a 503 problem document; no acknowledged append is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.clusters import Appends, Cluster, chatlog_env, pages, require_pg_bin
from tests.support import Api, _free_port, new_user, serve

pytestmark = pytest.mark.cluster
RESTARTS = int(os.environ.get("CHATLOG_TEST_RESTARTS", "20"))


async def test_postgres_restarted_under_load_is_ridden_out_without_restarting_chatlog(tmp_path: Path) -> None:
    cluster = Cluster(require_pg_bin()).init()
    cluster.start()
    served = serve(chatlog_env(cluster.url(), tmp_path / "data"), _free_port(), tmp_path / "serve.log")
    api = Api(served.base_url, cluster.url())
    try:
        user = new_user()
        cid = (await api.create(user))["id"]
        appends = Appends(api, user, [cid] * 4, "drill")
        recoveries: list[float] = []
        for i in range(RESTARTS):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            await asyncio.to_thread(cluster.stop, "immediate" if i % 2 else "fast")
            await asyncio.sleep(random.uniform(0, 0.3))
            await asyncio.to_thread(cluster.start, wait=False)  # requests meet it while it starts up
            await asyncio.to_thread(cluster.wait_ready)
            back = time.monotonic()
            await appends.answered_after(back, 15, f"restart {i}")
            recoveries.append(time.monotonic() - back)
        await appends.stop()

        failures = appends.failures()
        for failure in failures:
            assert failure.status == 503, failure
            assert failure.content_type.startswith("application/problem+json"), failure
            assert failure.body["code"] == "not_ready", failure
        acknowledged = appends.acknowledged()
        assert len(acknowledged) > 50 and failures, "the drill did not test much"

        # Every 201 is read back (the read waits for the projection), exactly once, in seq order.
        listed = await pages(api, user, f"/v1/conversations/{cid}/messages", limit=100)
        ids = Counter(m["id"] for m in listed)
        assert all(ids[m["id"]] == 1 for m in acknowledged), "an acknowledged append is missing or doubled"
        assert max(Counter(m["content"] for m in listed).values()) == 1, "a message was stored twice"
        assert [m["seq"] for m in listed] == list(range(1, len(listed) + 1))
        ready = await api.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["workers"] == {"conversations": "active"}
        print(f"{RESTARTS} restarts: back within {max(recoveries):.1f} s at worst; {len(failures)} answers were 503")
    finally:
        await api.client.aclose()
        out = served.stop()
        cluster.destroy()
    assert "Traceback" not in out, out[-5000:]
