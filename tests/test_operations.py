"""/healthz, /readyz and /metrics through the app, with in-process projection workers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.events import ConversationStarted, MessageAppended
from service.eventstore import EventStore
from service.ids import uuid7
from service.settings import Settings
from tests.keys import MASTER_KEY


def settings_for(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        data_dir=tmp_path,
        master_key=MASTER_KEY,
        projection_poll_interval=0.05,
        db_pool_size=4,
        run_workers=True,
    )


async def test_readiness_and_metrics_report_projection_position_and_lag(
    db_url: str, store: EventStore, tmp_path: Path
) -> None:
    """The appends come from another store (as from another process); the app's worker folds them."""
    app = create_app(settings_for(db_url, tmp_path))
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        stream = uuid7()
        await store.append("alice", stream, [ConversationStarted(title="t")])
        last = await store.append("alice", stream, [MessageAppended(message_id=uuid7(), role="user", content="hi")])
        for _ in range(100):
            ready = await client.get("/readyz")
            if ready.json()["projections"].get("conversations", {}).get("lag") == 0:
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready" and body["schema_revision"] == body["expected_revision"]
        assert body["projections"]["conversations"]["position"] == last.position
        assert body["projections"]["conversations"]["status"] == "ok"

        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert re.search(rf'chatlog_projection_position\{{projection="conversations"\}} {last.position}(\.0)?\n', text)
        assert 'chatlog_projection_lag_events{projection="conversations"} 0.0' in text
        assert 'chatlog_projection_failed{projection="conversations"} 0.0' in text
        assert "chatlog_events_appended_total 0.0" in text  # appended by another process


async def test_readiness_is_503_when_a_projection_has_stopped(db_url: str, store: EventStore, tmp_path: Path) -> None:
    app = create_app(settings_for(db_url, tmp_path))
    async with AsyncTestClient(app=app) as client:
        orphan = await store.append(
            "alice", uuid7(), [MessageAppended(message_id=uuid7(), role="user", content="no conversation")]
        )
        # The worker's own state (in the body's `workers`) can turn before the checkpoint row's
        # commit is read: wait until both say so.
        for _ in range(100):
            ready = await client.get("/readyz")
            if ready.status_code == 503 and ready.json()["projections"]["conversations"]["status"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 503
        status = ready.json()["projections"]["conversations"]
        assert status["status"] == "failed" and status["failed_position"] == orphan.position
        assert 'chatlog_projection_failed{projection="conversations"} 1.0' in (await client.get("/metrics")).text


async def test_readiness_is_503_when_the_schema_is_behind(db_url: str, raw_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(raw_dsn)
    try:
        await conn.execute("UPDATE alembic_version SET version_num = '0001_event_log'")
    finally:
        await conn.close()
    settings = settings_for(db_url, tmp_path).with_overrides(run_workers=False)
    async with AsyncTestClient(app=create_app(settings)) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["schema_revision"] == "0001_event_log"
