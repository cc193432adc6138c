"""Running the projection workers inside a process (`serve`, `mcp`, `project`)."""

from __future__ import annotations

import asyncio

from projections import select
from projections.worker import Worker, WorkerSettings
from service.eventstore import EventStore
from service.settings import Settings


def worker_settings(settings: Settings) -> WorkerSettings:
    return WorkerSettings(
        batch_size=settings.projection_batch_size,
        poll_interval=settings.projection_poll_interval,
        linger=settings.projection_linger,
    )


def start_workers(settings: Settings, store: EventStore | None = None) -> dict[Worker, asyncio.Task[None]]:
    """A worker task for every projection, woken by this process's own appends too."""
    assert settings.database_url
    workers: dict[Worker, asyncio.Task[None]] = {}
    for projection in select(settings):
        worker = Worker(settings.database_url, projection, worker_settings(settings))
        if store is not None:
            store.on_append(worker.wake)
        workers[worker] = asyncio.get_running_loop().create_task(worker.run(), name=f"projection-{projection.name}")
    return workers
