"""The Litestar application, assembled in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.response import Response
from sqlalchemy import text

from service.connections import ConnectionPool
from service.database import head_revision, make_engine
from service.eventstore import EventStore
from service.settings import Settings


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    database: str
    schema_revision: str | None
    expected_revision: str
    projections: dict[str, dict[str, int | float | str | None]]


@get("/healthz", sync_to_thread=False, include_in_schema=True, tags=["operations"])
def healthz() -> Health:
    """200 while the process runs."""
    return Health(status="ok")


@get("/readyz", tags=["operations"])
async def readyz(state: State) -> Response[Readiness]:
    """200 when the database answers and the schema is at the newest migration; 503 otherwise."""
    expected: str = state.head_revision
    revision: str | None = None
    database = "ok"
    try:
        async with state.engine.connect() as conn:
            if await conn.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL")):
                revision = await conn.scalar(text("SELECT version_num FROM alembic_version"))
    except Exception:
        database = "unavailable"
    ready = database == "ok" and revision == expected
    body = Readiness(
        status="ready" if ready else "not_ready",
        database=database,
        schema_revision=revision,
        expected_revision=expected,
        projections={},
    )
    return Response(body, status_code=200 if ready else 503)


def create_app(settings: Settings) -> Litestar:
    """The app for `settings`, whose `database_url` must be resolved (see `service.cli`)."""
    if not settings.database_url:
        raise ValueError("create_app needs settings.database_url")
    url = settings.database_url

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = make_engine(url, pool_size=settings.db_pool_size)
        pool = ConnectionPool(url, size=settings.db_pool_size)
        app.state.engine = engine
        app.state.store = EventStore(pool)
        try:
            yield
        finally:
            await app.state.store.aclose()
            await pool.close()
            await engine.dispose()

    return Litestar(
        route_handlers=[healthz, readyz],
        lifespan=[lifespan],
        state=State({"settings": settings, "head_revision": head_revision()}),
    )
