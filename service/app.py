"""The Litestar application, assembled in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from projections import PROJECTIONS
from projections.worker import ProjectionStatus, Worker, WorkerSettings, projection_status
from service.connections import ConnectionPool
from service.database import head_revision, make_engine
from service.eventstore import EventStore
from service.metrics import ChatlogCollector, make_registry
from service.settings import Settings

log = logging.getLogger(__name__)


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    database: str
    schema_revision: str | None
    expected_revision: str
    projections: dict[str, ProjectionStatus]


@get("/healthz", sync_to_thread=False, tags=["operations"])
def healthz() -> Health:
    """200 while the process runs."""
    return Health(status="ok")


@get("/readyz", tags=["operations"])
async def readyz(state: State) -> Response[Readiness]:
    """200 when the database answers, the schema is at the newest migration and no projection
    has stopped on an event it could not apply; 503 otherwise. Lists each projection's position
    and lag."""
    expected: str = state.head_revision
    revision: str | None = None
    projections: dict[str, ProjectionStatus] = {}
    database = "ok"
    try:
        async with state.pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"):
                revision = await conn.fetchval("SELECT version_num FROM alembic_version")
            if revision == expected:
                projections = await projection_status(conn, list(PROJECTIONS))
    except Exception:
        log.warning("readiness check could not reach the database", exc_info=True)
        database = "unavailable"
    ready = database == "ok" and revision == expected and all(p.status == "ok" for p in projections.values())
    body = Readiness(
        status="ready" if ready else "not_ready",
        database=database,
        schema_revision=revision,
        expected_revision=expected,
        projections=projections,
    )
    return Response(body, status_code=200 if ready else 503)


@get("/metrics", tags=["operations"], media_type=CONTENT_TYPE_LATEST)
async def metrics(state: State) -> Response[bytes]:
    """Prometheus text: events appended, each projection's position and lag."""
    collector: ChatlogCollector = state.metrics_collector
    try:
        async with state.pool.acquire() as conn:
            collector.projections = await projection_status(conn, list(PROJECTIONS))
    except Exception:
        log.warning("metrics could not read projection status", exc_info=True)
        collector.projections = {}
    return Response(generate_latest(state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings) -> Litestar:
    """The app for `settings`, whose `database_url` must be resolved (see `service.cli`)."""
    if not settings.database_url:
        raise ValueError("create_app needs settings.database_url")
    url = settings.database_url

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = make_engine(url, pool_size=settings.db_pool_size)
        pool = ConnectionPool(url, size=settings.db_pool_size)
        store = EventStore(pool)
        app.state.engine, app.state.pool, app.state.store = engine, pool, store
        app.state.metrics_registry, app.state.metrics_collector = make_registry(store)
        workers = start_workers(settings, store) if settings.run_workers else {}
        try:
            yield
        finally:
            for worker, task in workers.items():
                worker.stop()
                await asyncio.gather(task, return_exceptions=True)
            await store.aclose()
            await pool.close()
            await engine.dispose()

    return Litestar(
        route_handlers=[healthz, readyz, metrics],
        lifespan=[lifespan],
        state=State({"settings": settings, "head_revision": head_revision()}),
    )


def worker_settings(settings: Settings) -> WorkerSettings:
    return WorkerSettings(batch_size=settings.projection_batch_size, poll_interval=settings.projection_poll_interval)


def start_workers(settings: Settings, store: EventStore | None = None) -> dict[Worker, asyncio.Task[None]]:
    """A worker task for every projection, woken by this process's own appends too."""
    assert settings.database_url
    workers: dict[Worker, asyncio.Task[None]] = {}
    for projection in PROJECTIONS.values():
        worker = Worker(settings.database_url, projection, worker_settings(settings))
        if store is not None:
            store.on_append(worker.wake)
        workers[worker] = asyncio.get_running_loop().create_task(worker.run(), name=f"projection-{projection.name}")
    return workers
