"""The Litestar application, assembled in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from projections import PROJECTIONS
from projections.worker import HorizonHolder, ProjectionStatus, horizon_holder, projection_status
from service import mcp, page
from service.api.chat import ROUTES as CHAT_ROUTES
from service.api.chat import document_stream
from service.api.lean import lean_paths
from service.api.middleware import RequestMetrics, request_context
from service.api.routes import DEPENDENCIES, ROUTES
from service.api.search import ROUTES as SEARCH_ROUTES
from service.assistants import make_assistant
from service.auth import TokenVerifier, jwt_secret
from service.chat import Chat
from service.commands import ConversationHeads
from service.connections import ConnectionPool
from service.cursors import Cursors
from service.database import head_revision
from service.eventstore import EventStore
from service.metrics import ChatlogCollector, make_registry
from service.problems import EXCEPTION_HANDLERS
from service.replicas import ReplicaStatus, primary_lsn, replica_status
from service.sealing import Keyring
from service.settings import Settings
from service.workers import start_workers, worker_states

log = logging.getLogger(__name__)


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    database: str
    schema_revision: str | None
    expected_revision: str
    projections: dict[str, ProjectionStatus]
    # This process's projection workers (when it runs them): active, standby, reconnecting,
    # restarting (it died and waits to start again), failed or stopped.
    workers: dict[str, str]
    # The age of the oldest transaction on the server that holds the projections back (0: none).
    horizon_held_seconds: float
    horizon_holder: HorizonHolder | None
    # With CHATLOG_READ_DATABASE_URL only: the read replica's state and replay lag.
    replica: ReplicaStatus | msgspec.UnsetType = msgspec.UNSET


@get("/healthz", sync_to_thread=False, tags=["operations"])
def healthz() -> Health:
    """200 while the process runs."""
    return Health(status="ok")


@get(
    "/readyz",
    tags=["operations"],
    responses={503: ResponseSpec(data_container=Readiness, description="not ready (the body says what is missing)")},
)
async def readyz(state: State) -> Response[Readiness]:
    """200 when the database (and the read replica, if there is one) answers, the schema is at the
    newest migration and no projection has stopped on an event it could not apply; 503 otherwise.
    Lists each projection's position and lag, and the replica's replay lag."""
    expected: str = state.head_revision
    revision: str | None = None
    projections: dict[str, ProjectionStatus] = {}
    holder: HorizonHolder | None = None
    lsn: str | None = None
    database = "ok"
    try:
        async with state.pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"):
                revision = await conn.fetchval("SELECT version_num FROM alembic_version")
            if revision == expected:
                projections = await projection_status(conn, list(PROJECTIONS), state.settings.projection_slices)
            holder = await horizon_holder(conn)
            if state.replica is not None:
                lsn = await primary_lsn(conn)
    except Exception as exc:
        log.warning("readiness check could not reach the database: %s: %s", type(exc).__name__, exc)
        database = "unavailable"
    replica = msgspec.UNSET if state.replica is None else await replica_status(state.replica, lsn)
    workers = worker_states(state.workers)
    running = all(w in ("active", "standby", "reconnecting") for w in workers.values())
    ready = (
        database == "ok"
        and revision == expected
        and running
        and all(p.status == "ok" for p in projections.values())
        and (replica is msgspec.UNSET or replica.status == "ok")
    )
    body = Readiness(
        status="ready" if ready else "not_ready",
        database=database,
        schema_revision=revision,
        expected_revision=expected,
        projections=projections,
        workers=workers,
        horizon_held_seconds=round(holder.seconds, 3) if holder else 0.0,
        horizon_holder=holder,
        replica=replica,
    )
    return Response(body, status_code=200 if ready else 503)


# Litestar adds the charset to a text/ media type itself; Prometheus's own string already has it.
METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")


@get("/metrics", tags=["operations"], media_type=METRICS_MEDIA_TYPE)
async def metrics(state: State) -> Response[bytes]:
    """Prometheus text: events appended, each projection's position and lag, the replica's lag."""
    collector: ChatlogCollector = state.metrics_collector
    lsn: str | None = None
    try:
        async with state.pool.acquire() as conn:
            collector.projections = await projection_status(conn, list(PROJECTIONS), state.settings.projection_slices)
            holder = await horizon_holder(conn)
            collector.horizon_held_seconds = holder.seconds if holder else 0.0
            if state.replica is not None:
                lsn = await primary_lsn(conn)
    except Exception as exc:
        log.warning("metrics could not read projection status: %s: %s", type(exc).__name__, exc)
        collector.projections = {}
    if state.replica is not None:
        collector.replica = await replica_status(state.replica, lsn)
    return Response(generate_latest(state.metrics_registry), media_type=METRICS_MEDIA_TYPE)


def create_app(settings: Settings) -> Litestar:
    """The app for `settings`, whose `database_url` must be resolved (see `service.cli`)."""
    if not settings.database_url:
        raise ValueError("create_app needs settings.database_url")
    url, read_url = settings.database_url, settings.read_database_url
    keyring = Keyring.from_settings(settings)
    registry, collector = make_registry()
    request_metrics = RequestMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = ConnectionPool(url, size=settings.db_pool_size)
        # The read routes' rows come from the replica; their own-writes checks and everything
        # else from the primary (README, "Read replicas").
        replica = ConnectionPool(read_url, size=settings.db_pool_size) if read_url else None
        app.state.replica, app.state.reads = replica, replica or pool
        appends = ConnectionPool.for_appends(url, size=max(4, settings.db_pool_size // 2))
        store = EventStore(appends, keyring, group_commit=settings.group_commit)
        collector.store = store
        app.state.pool, app.state.store = pool, store
        app.state.chat = Chat(settings, store, app.state.heads, make_assistant(settings))
        workers = app.state.workers = start_workers(settings, keyring, store) if settings.run_workers else {}
        tools = mcp.Tools(
            settings, pool, store, app.state.heads, app.state.cursors, mcp.http_user(app.state.verifier), replica
        )
        app.state.mcp = mcp.session_manager(mcp.build_server(tools))
        try:
            async with app.state.mcp.run():
                yield
        finally:
            for worker, task in workers.items():
                worker.stop()
                await asyncio.gather(task, return_exceptions=True)
            await app.state.chat.aclose()
            await store.aclose()
            await appends.close()
            await pool.close()
            if replica is not None:
                await replica.close()

    app = Litestar(
        route_handlers=[healthz, readyz, metrics, *ROUTES, *CHAT_ROUTES, *SEARCH_ROUTES, *page.ROUTES, mcp.mount],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        on_startup=[_problem_documents_only, document_stream],
        request_max_body_size=settings.max_body_bytes,
        # Logging is configured once, by the CLI (CHATLOG_LOG_LEVEL); Litestar's default would
        # replace it with its own INFO-level queue handler.
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="chatlog",
            version="0.1.0",
            description="An event-sourced conversation log. The contract: shared/API.md.",
            path="/schema",
            security=[{"bearer": []}],
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
        ),
        state=State(
            {
                "settings": settings,
                "head_revision": head_revision(),
                "metrics_registry": registry,
                "metrics_collector": collector,
                "verifier": TokenVerifier(settings),
                "heads": ConversationHeads(),
                "cursors": Cursors(settings.cursor_secret or jwt_secret(settings)),
                "page_assets": page.load_assets(),
                "workers": {},
            }
        ),
    )
    # Around the router, not as route middleware: every answer gets a request id and is counted,
    # a 404 for an unknown path or a 405 too, and a route is not wrapped in a second exception
    # handler layer (Litestar adds one under any route middleware).
    # The lean paths (the append, the history page) go in front of the router, inside the request context.
    app.asgi_handler = request_context(request_metrics)(lean_paths(app)(app.asgi_handler))
    return app


def _problem_documents_only(app: Litestar) -> None:
    """Validation answers 422 problem documents here, not Litestar's default 400 body: say so."""
    for path, item in (app.openapi_schema.paths or {}).items():
        for operation in (item.get, item.post, item.patch, item.delete, item.put):
            if operation is None or operation.responses is None:
                continue
            operation.responses.pop("400", None)
            if not path.startswith("/v1/"):
                operation.security = []
