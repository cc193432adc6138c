"""Running the projection workers inside a process (`serve`, `mcp`, `project`)."""

from __future__ import annotations

import asyncio
import logging

from projections import select
from projections.slices import layout
from projections.worker import SliceGroup, Worker, WorkerSettings
from service.eventstore import EventStore
from service.queries import projection_moved
from service.sealing import Keyring
from service.settings import Settings

log = logging.getLogger(__name__)


def worker_settings(settings: Settings) -> WorkerSettings:
    return WorkerSettings(
        batch_size=settings.projection_batch_size,
        poll_interval=settings.projection_poll_interval,
        linger=settings.projection_linger,
        horizon_warn_seconds=settings.horizon_warn_seconds,
    )


def make_workers(settings: Settings, keyring: Keyring, names: list[str] | None = None) -> list[Worker]:
    """A worker for every slice of every projection named (all for none)."""
    assert settings.database_url
    workers: list[Worker] = []
    for projection in select(settings, names):
        group = SliceGroup(projection.name, settings.projection_slices)
        for part in layout(settings.projection_slices):
            workers.append(
                Worker(
                    settings.database_url,
                    projection,
                    keyring,
                    worker_settings(settings),
                    after_commit=projection_moved,  # readers of this process waiting for their own writes
                    part=part,
                    group=group,
                )
            )
    return workers


def start_workers(
    settings: Settings, keyring: Keyring, store: EventStore | None = None
) -> dict[Worker, asyncio.Task[None]]:
    """A worker task for every projection slice, woken by this process's own appends too."""
    workers: dict[Worker, asyncio.Task[None]] = {}
    for worker in make_workers(settings, keyring):
        if store is not None:
            store.on_append(worker.wake)
        workers[worker] = asyncio.get_running_loop().create_task(supervise(worker), name=f"projection-{worker.name}")
    return workers


async def supervise(worker: Worker) -> None:
    """Run `worker` until it is stopped (or its projection stops on an event). A worker that dies
    of anything else, a defect, is logged with its traceback and started again after 1 s, then
    2, 4, ... up to 60 s; meanwhile `worker_states` says "restarting" and /readyz answers 503."""
    delay = 1.0
    while True:
        try:
            await worker.run()
            return
        except Exception as exc:
            worker.crashed = f"{type(exc).__name__}: {exc}"
            log.exception("projection worker %s died; restarting it in %.0f s", worker.name, delay)
            if await worker.sleep_unless_stopped(delay):
                return
            delay = min(delay * 2, 60.0)
            worker.crashed = None


def worker_states(workers: dict[Worker, asyncio.Task[None]]) -> dict[str, str]:
    """What each projection worker (each slice's, named by its checkpoint row) of this process is
    doing; all but "active", "standby" and "reconnecting" (riding out an outage) mean that no
    worker of it runs here ("retired": a newer slice layout replaced it)."""
    states: dict[str, str] = {}
    for worker, task in workers.items():
        if worker.crashed is not None:
            state = "restarting"
        elif task.done():
            state = "failed" if worker.failure is not None else "retired" if worker.retired else "stopped"
        elif worker.outage_since is not None:
            state = "reconnecting"
        else:
            state = "active" if worker.active else "standby"
        states[worker.name] = state
    return states
