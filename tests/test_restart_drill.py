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
from typing import Any

import pytest

from tests.clusters import Cluster, require_pg_bin
from tests.support import SECRET, Api, _free_port, auth, new_user, serve

pytestmark = pytest.mark.cluster
RESTARTS = int(os.environ.get("CHATLOG_TEST_RESTARTS", "20"))


async def test_postgres_restarted_under_load_is_ridden_out_without_restarting_chatlog(tmp_path: Path) -> None:
    cluster = Cluster(require_pg_bin()).init()
    cluster.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(
        CHATLOG_DATABASE_URL=cluster.url(),
        CHATLOG_DATA_DIR=str(tmp_path / "data"),
        CHATLOG_JWT_SECRET=SECRET,
        CHATLOG_PROJECTION_POLL_INTERVAL="0.05",
        CHATLOG_READ_WAIT_SECONDS="5",
        CHATLOG_LOG_LEVEL="WARNING",
    )
    served = serve(env, _free_port(), tmp_path / "serve.log")
    api = Api(served.base_url, cluster.url())
    try:
        user = new_user()
        cid = (await api.create(user))["id"]
        answers: list[tuple[float, int, str, dict[str, Any]]] = []  # (time, status, content type, body)
        stop = asyncio.Event()

        async def appender(k: int) -> None:
            i = 0
            while not stop.is_set():
                r = await api.client.post(
                    f"/v1/conversations/{cid}/messages",
                    json={"role": "user", "content": f"drill {k}-{i}"},
                    headers=auth(user),
                )
                answers.append((time.monotonic(), r.status_code, r.headers.get("content-type", ""), r.json()))
                i += 1
                if r.status_code != 201:
                    await asyncio.sleep(0.05)

        appenders = [asyncio.ensure_future(appender(k)) for k in range(4)]
        recoveries: list[float] = []
        for i in range(RESTARTS):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            await asyncio.to_thread(cluster.stop, "immediate" if i % 2 else "fast")
            await asyncio.sleep(random.uniform(0, 0.3))
            await asyncio.to_thread(cluster.start, wait=False)  # requests meet it while it starts up
            await asyncio.to_thread(cluster.wait_ready)
            back = time.monotonic()
            while not any(t > back and status == 201 for t, status, _, _ in answers[-20:]):
                assert time.monotonic() - back < 15, f"restart {i}: appends not answered again within 15 s"
                await asyncio.sleep(0.05)
            recoveries.append(time.monotonic() - back)
        stop.set()
        await asyncio.gather(*appenders)

        failures = [(status, ctype, body) for _, status, ctype, body in answers if status != 201]
        for status, ctype, body in failures:
            assert status == 503 and ctype.startswith("application/problem+json"), (status, body)
            assert body["code"] == "not_ready", body
        acknowledged = [body for _, status, _, body in answers if status == 201]
        assert len(acknowledged) > 50 and failures, "the drill did not test much"

        # Every 201 is read back (the read waits for the projection), exactly once, in seq order.
        listed: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = await api.client.get(f"/v1/conversations/{cid}/messages", params=params, headers=auth(user))
            assert page.status_code == 200, page.text
            listed += page.json()["data"]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
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
