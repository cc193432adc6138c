"""The projection worker: gap-safe batches, checkpointed in the same transaction.

One worker per projection is active: it holds a session-level advisory lock on its own
connection, and others wait as standbys, trying the lock every `standby_interval` seconds; a
holder that dies drops its connection and with it the lock. The active worker wakes on NOTIFY
(or on a call to `wake()` from its own process) and polls every `poll_interval` as a fallback.

Each batch is one transaction: lock the checkpoint row, read the next events after it by
DESIGN.md's rule, fold them, move the checkpoint. A crash anywhere in it rolls all of it back.
An event the projection cannot apply stops the projection: the batch is retried one event at a
time to find it, the events before it are applied, and its position and the error are written
to the checkpoint row (where readiness reads it) and logged. It stays stopped until a replay
succeeds or an operator clears the error.

With slices (projections/slices.py) a process runs one `Worker` per slice, each with its own
connection, checkpoint row and lock, as one `SliceGroup`. The group makes its N the current
layout once, when the first of them connects, and keeps the process to its share of the slices:
a worker takes a free slice only while the process holds fewer than ceil(N / processes running
this projection's workers, counted by their connections' `application_name`), and the process
gives one back (between batches, once a second at most) while it holds more. A process that dies
drops its connections and their locks, and the others' standby workers take its slices at their
next try (`standby_interval`, 1 s). A worker whose checkpoint row was retired by a later layout
stops ("retired"): it would otherwise write beside the new layout's workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from projections.base import Projection, ProjectionError
from projections.slices import RETIRED, WHOLE, Slice, adopt_layout, layout
from service.citus import is_distributed
from service.connections import DATABASE_UNAVAILABLE, connect_args
from service.eventstore import NOTIFY_CHANNEL, Checkpoint, RecordedEvent, read_all
from service.sealing import Keyring

log = logging.getLogger(__name__)


# The database, not the events: retry the batch later (a deadlock or serialization failure too).
_TRANSIENT: Final = (*DATABASE_UNAVAILABLE, asyncpg.exceptions.TransactionRollbackError)

BeforeCommit = Callable[[Sequence[RecordedEvent]], Awaitable[None]]


def lock_key(name: str) -> int:
    """The advisory lock of a projection: a stable 63-bit number from its name."""
    return int.from_bytes(hashlib.sha256(f"chatlog.projection.{name}".encode()).digest()[:8], "big") >> 1


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    batch_size: int = 1000
    poll_interval: float = 1.0
    # After a wake-up, wait this long for more events before reading: under a stream of appends
    # one batch then carries many events instead of each its own transaction.
    linger: float = 0.005
    standby_interval: float = 1.0
    # Warn (once a minute at most) when one transaction has held the horizon back this long.
    horizon_warn_seconds: float = 30.0
    reconnect_interval: float = 0.5  # the first delay after losing the database; doubled up to:
    max_reconnect_interval: float = 2.0


class ProjectionFailed(Exception):
    def __init__(self, name: str, position: int | None, error: str) -> None:
        super().__init__(f"projection {name} stopped at position {position}: {error}")
        self.position = position
        self.error = error


class SliceRetired(Exception):
    """The checkpoint row belongs to a slice layout that another one has replaced."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"projection {name}: the slice layout changed (another process started with another "
            "CHATLOG_PROJECTION_SLICES); this slice stops, restart this process with the new setting"
        )


async def ensure_checkpoint(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", name)


async def apply_batch(
    conn: asyncpg.Connection,
    projection: Projection,
    keyring: Keyring,
    batch_size: int,
    before_commit: BeforeCommit | None = None,
    *,
    part: Slice = WHOLE,
) -> int:
    """Fold the next batch (of the slice `part`) into the live tables and move its checkpoint,
    in one transaction.

    Returns how many events it applied. When the projection cannot apply an event, the events
    before it are applied, the failure is recorded in the checkpoint row, that is committed, and
    `ProjectionFailed` is raised; `SliceRetired` when a newer slice layout replaced the row.
    """
    try:
        return await _batch(conn, projection, keyring, batch_size, before_commit, part=part, careful=False)
    except _BatchFailed:
        pass  # rolled back: the same batch again, one event at a time
    return await _batch(conn, projection, keyring, batch_size, before_commit, part=part, careful=True)


class _BatchFailed(Exception):
    """The batch, folded as a whole, failed: its transaction rolls back, and it runs again carefully."""


async def _batch(
    conn: asyncpg.Connection,
    projection: Projection,
    keyring: Keyring,
    batch_size: int,
    before_commit: BeforeCommit | None,
    *,
    part: Slice,
    careful: bool,
) -> int:
    """`apply_batch`'s transaction. The batch is folded as a whole with no savepoint: a savepoint
    and its release are two more round trips, each a wait behind the API's requests when the worker
    runs in the API process. Only when that fails (`_BatchFailed`), `careful` folds the batch again
    one event at a time, each in a savepoint, up to the one that fails."""
    names = {t: t for t in projection.tables}
    name = part.row(projection.name)
    failure: ProjectionFailed | None = None
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT tx_id, position, error, failed_position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
            name,
        )
        if row is None:
            raise RuntimeError(f"no checkpoint row for projection {name}")
        if row["error"] == RETIRED:
            raise SliceRetired(name)
        if row["error"] is not None:
            raise ProjectionFailed(name, row["failed_position"], row["error"])
        checkpoint = Checkpoint(int(row["tx_id"]), row["position"])
        hashes = None if part.whole else part.bounds
        events = await read_all(conn, keyring, checkpoint, batch_size, hold_keys=True, hashes=hashes)
        if not events:
            return 0
        if not careful:
            if await _apply(conn, projection, events, names, savepoint=False) is not None:
                raise _BatchFailed
            await mark_users(conn, projection.name, {e.user_id for e in events}, events[-1].checkpoint)
            await _save_checkpoint(conn, name, events[-1].checkpoint)
        else:
            for event in events:
                failure = await _apply(conn, projection, [event], names)
                if failure is not None:
                    failure = ProjectionFailed(name, failure.position, failure.error)
                    await record_failure(conn, name, failure)
                    break
                await mark_users(conn, projection.name, {event.user_id}, event.checkpoint)
                await _save_checkpoint(conn, name, event.checkpoint)
        if failure is None:
            if before_commit is not None:
                await before_commit(events)
            return len(events)
    raise failure


async def _apply(
    conn: asyncpg.Connection,
    projection: Projection,
    events: Sequence[RecordedEvent],
    names: dict[str, str],
    *,
    savepoint: bool = True,
) -> ProjectionFailed | None:
    """Fold `events` (in a savepoint, unless the caller rolls back on failure); what went wrong if
    the projection could not apply them."""
    try:
        if savepoint:
            async with conn.transaction():
                await projection.apply(conn, events, names)
        else:
            await projection.apply(conn, events, names)
    except (ProjectionError, asyncpg.PostgresError) as exc:
        if isinstance(exc, _TRANSIENT):
            raise  # the database, not the event: the worker retries the batch
        position = exc.position if isinstance(exc, ProjectionError) else events[0].position
        return ProjectionFailed(projection.name, position, f"{type(exc).__name__}: {exc}")
    return None


_MARK: Final = """
INSERT INTO projection_marks (user_id, name, tx_id, position)
SELECT user_id, $2, $3::xid8, $4 FROM unnest($1::text[]) AS u(user_id)
ON CONFLICT (user_id, name) DO UPDATE SET tx_id = excluded.tx_id, position = excluded.position
"""


async def mark_users(conn: asyncpg.Connection, name: str, users: Iterable[str], checkpoint: Checkpoint) -> None:
    """On Citus, where a batch that spans workers commits in two phases: the checkpoint beside each
    of the batch's users' rows, on their shard, so that a reader who sees it there sees the rows
    too (`service.queries.wait_until_readable`). On one server the checkpoint row says it all."""
    if await is_distributed(conn):
        await conn.execute(_MARK, sorted(users), name, checkpoint.tx_id, checkpoint.position)


async def mark_all_users(
    conn: asyncpg.Connection, name: str, checkpoint: Checkpoint, hashes: tuple[int, int] | None = None
) -> None:
    """`mark_users` for every user of the log (or of a slice's `hashes`): a replay folded them up to `checkpoint`."""
    if await is_distributed(conn):
        low, high = hashes or (-(2**31), 2**31 - 1)
        await conn.execute(
            "INSERT INTO projection_marks (user_id, name, tx_id, position) "
            "SELECT user_id, $1, $2::xid8, $3 FROM events WHERE hashtext(user_id) BETWEEN $4 AND $5 GROUP BY user_id "
            "ON CONFLICT (user_id, name) DO UPDATE SET tx_id = excluded.tx_id, position = excluded.position",
            name,
            checkpoint.tx_id,
            checkpoint.position,
            low,
            high,
        )


async def _save_checkpoint(conn: asyncpg.Connection, name: str, checkpoint: Checkpoint) -> None:
    await conn.execute(
        "UPDATE projection_checkpoints SET tx_id = $2::xid8, position = $3, updated_at = now() WHERE name = $1",
        name,
        checkpoint.tx_id,
        checkpoint.position,
    )


async def record_failure(conn: asyncpg.Connection, name: str, failure: ProjectionFailed) -> None:
    await conn.execute(
        "UPDATE projection_checkpoints SET error = $2, failed_position = $3, updated_at = now() WHERE name = $1",
        name,
        failure.error,
        failure.position,
    )


class SliceGroup:
    """The workers of one projection's slices in this process (see the module docstring)."""

    def __init__(self, projection: str, n: int = 1) -> None:
        self.projection = projection
        self.n = n
        self.workers: list[Worker] = []
        self.application_name = f"chatlog-projection-{projection}-{os.getpid()}"
        self._adopted = False
        self._adopting = asyncio.Lock()

    async def adopt(self, conn: asyncpg.Connection) -> None:
        """Make this process's N the current layout, once per process (a worker reconnecting
        later must not change it back after another process changed it)."""
        async with self._adopting:
            if self._adopted:
                return
            if await adopt_layout(conn, self.projection, self.n, lock_key(f"{self.projection}:layout")):
                log.warning(
                    "projection %s now runs as %d slice(s); each new slice starts at the oldest checkpoint "
                    "of the old ones (events folded again change nothing)",
                    self.projection, self.n,
                )  # fmt: skip
            self._adopted = True

    def held(self) -> int:
        return sum(w.active for w in self.workers)

    async def share(self, conn: asyncpg.Connection) -> int:
        """How many slices this process should hold: all of one; ceil(N / processes) of several."""
        if self.n == 1:
            return 1
        processes: int = await conn.fetchval(_PROCESSES, f"chatlog-projection-{self.projection}-%")
        return -(-self.n // max(1, processes))

    def last_active(self) -> Worker | None:
        return max((w for w in self.workers if w.active), key=lambda w: w.part.k, default=None)


# Processes that run a projection's workers (each names its connections after itself).
_PROCESSES: Final = (
    "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name LIKE $1"
)


class Worker:
    """Runs one projection (or one slice of it): standby until it holds the lock, then batches
    until stopped (or, for a slice, until its process holds more than its share)."""

    def __init__(
        self,
        url: str,
        projection: Projection,
        keyring: Keyring,
        settings: WorkerSettings | None = None,
        *,
        before_commit: BeforeCommit | None = None,
        after_commit: Callable[[], None] | None = None,
        part: Slice = WHOLE,
        group: SliceGroup | None = None,
    ) -> None:
        self.url = url
        self.projection = projection
        self.keyring = keyring
        self.settings = settings or WorkerSettings()
        self.before_commit = before_commit
        self.after_commit = after_commit  # called after each batch that applied events
        self.part = part
        self.name = part.row(projection.name)  # its checkpoint row and lock
        self.group = group or SliceGroup(projection.name, part.n)
        self.group.workers.append(self)
        self.active = False
        self.failure: ProjectionFailed | None = None
        self.retired = False  # a newer slice layout replaced its checkpoint row
        self.applied = 0
        self.outage_since: float | None = None  # loop time the database was lost, while it is
        self.crashed: str | None = None  # what killed it, while its supervisor waits to restart it
        self._connected = False
        self._horizon_checked = self._horizon_warned = float("-inf")
        self._share_checked = float("-inf")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def sleep_unless_stopped(self, seconds: float) -> bool:
        """Wait `seconds`, or less if stopped meanwhile; whether it was stopped."""
        await self._sleep(seconds)
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Until `stop()`, or until the projection stops on an event it cannot apply (or its
        slice is retired by a newer layout).

        A database outage, however it shows (a broken or refused connection, a server shutting
        down or starting up: 57P01, 57P03, a standby still read-only, a deadlock), rolls the
        batch back and is retried with a growing, jittered delay (0.5 s to 2 s by default): the
        worker rides out an outage of any length. One line is logged when an outage begins and
        one when it ends. Anything else is a defect and propagates (`service.workers` logs it
        and restarts the worker).
        """
        name = self.name
        delay = self.settings.reconnect_interval
        while not self._stop.is_set():
            try:
                await self._run_connected()
                return
            except ProjectionFailed as failure:
                self.failure = failure
                log.error("projection %s stopped at position %s: %s", name, failure.position, failure.error)
                return
            except SliceRetired as retired:
                self.retired = True
                log.error("%s", retired)
                return
            except _TRANSIENT as exc:
                self.active = False
                if self.outage_since is None:
                    self.outage_since = asyncio.get_running_loop().time()
                    log.warning("projection %s lost the database (%s: %s); retrying", name, type(exc).__name__, exc)
                else:
                    log.debug("projection %s: still no database (%s)", name, exc)
                if self._connected:  # the outage began after a working spell: start again from the first delay
                    delay, self._connected = self.settings.reconnect_interval, False
                await self._sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.settings.max_reconnect_interval)

    def _reconnected(self) -> None:
        self._connected = True
        if self.outage_since is not None:
            seconds = asyncio.get_running_loop().time() - self.outage_since
            log.warning("projection %s has the database again after %.1f s", self.name, seconds)
            self.outage_since = None

    async def _run_connected(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            **connect_args(self.url),
            server_settings={
                "application_name": self.group.application_name,
                # This connection lives long. A generic plan cached while `conversations` looked
                # empty (analyzed before any row arrived) makes the per-row foreign-key check a
                # sequential scan for good, and catch-up quadratic; custom plans stay correct.
                "plan_cache_mode": "force_custom_plan",
                # Never hold the server's horizon (and every projection) back by idling in a transaction.
                "idle_in_transaction_session_timeout": "60s",
            },
        )
        try:
            await is_distributed(conn)  # on Citus: the settings its statements need, before any other
            self._reconnected()
            await self.group.adopt(conn)
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            while await self._become_active(conn):
                log.info("projection %s: active", self.name)
                await self._run_active(conn)
        finally:
            self.active = False
            conn.terminate()

    async def _run_active(self, conn: asyncpg.Connection) -> None:
        """Batches until stopped, or until this process holds more slices than its share: then
        this slice's lock is given back (between batches) for another process to take."""
        while not self._stop.is_set():
            self._wake.clear()
            applied = await apply_batch(
                conn, self.projection, self.keyring, self.settings.batch_size, self.before_commit, part=self.part
            )
            self.applied += applied
            if applied and self.after_commit is not None:
                self.after_commit()
            await self._watch_horizon(conn)
            if await self._over_share(conn):
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key(self.name))
                self.active = False
                log.info("projection %s: given back to another process (standby)", self.name)
                return
            if applied < self.settings.batch_size:
                await self._sleep(self.settings.poll_interval, wakeable=True)
                if self._wake.is_set() and not self._stop.is_set() and self.settings.linger > 0:
                    await asyncio.sleep(self.settings.linger)

    async def _over_share(self, conn: asyncpg.Connection) -> bool:
        """Whether this worker should give its slice back: once a second at most, and only the
        process's active slice of the highest index, so that one goes at a time."""
        if self.part.whole or self.group.last_active() is not self:
            return False
        now = asyncio.get_running_loop().time()
        if now < self._share_checked + self.settings.standby_interval:
            return False
        self._share_checked = now
        return self.group.held() > await self.group.share(conn)

    async def _watch_horizon(self, conn: asyncpg.Connection) -> None:
        """Once a second: warn, naming it, about a transaction that holds every projection
        back (the horizon is the whole server's: one idle `BEGIN` anywhere freezes them)."""
        now = asyncio.get_running_loop().time()
        if now < self._horizon_checked + 1:
            return
        self._horizon_checked = now
        holder = await horizon_holder(conn)
        if holder is None or holder.seconds < self.settings.horizon_warn_seconds:
            return
        if now >= self._horizon_warned + 60:
            self._horizon_warned = now
            log.warning(
                "projection %s is held back by a transaction open for %.0f s: application_name %r, state %r, "
                "pid %s, database %s; events committed after it began wait until it ends",
                self.name, holder.seconds, holder.application_name, holder.state, holder.pid,
                holder.database,
            )  # fmt: skip

    async def _become_active(self, conn: asyncpg.Connection) -> bool:
        key = lock_key(self.name)
        while not self._stop.is_set():
            if self.group.held() < await self.group.share(conn) and await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", key
            ):
                self.active = True
                return True
            await self._sleep(self.settings.standby_interval)
        return False

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        event = self._wake if wakeable else self._stop
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)


class HorizonHolder(msgspec.Struct, frozen=True, kw_only=True):
    """The oldest transaction still running on the database server, which every projection (and
    the event feed) waits behind: events of newer transactions are read only once it ends."""

    seconds: float
    application_name: str
    state: str
    pid: int | None  # None for a prepared (two-phase) transaction
    database: str | None


# The transaction whose id is the current snapshot's xmin (the horizon), running or prepared.
_HORIZON_HOLDER: Final = """
WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::xid AS xmin)
SELECT extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.application_name, a.state, a.pid, a.datname
FROM pg_stat_activity AS a, horizon
WHERE a.backend_xid = horizon.xmin AND a.xact_start IS NOT NULL
UNION ALL
SELECT extract(epoch FROM clock_timestamp() - p.prepared)::float8, 'prepared transaction ' || p.gid, 'prepared',
       NULL, p.database
FROM pg_prepared_xacts AS p, horizon
WHERE p.transaction = horizon.xmin
LIMIT 1
"""


async def horizon_holder(conn: asyncpg.Connection) -> HorizonHolder | None:
    """The transaction that holds the horizon back now, if any (none while nothing writes)."""
    row = await conn.fetchrow(_HORIZON_HOLDER)
    if row is None:
        return None
    return HorizonHolder(
        seconds=max(0.0, row[0]), application_name=row[1] or "", state=row[2] or "", pid=row[3], database=row[4]
    )


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    lag: int  # events after the checkpoint (counted up to LAG_COUNT_LIMIT)
    lag_seconds: float  # age of the oldest event not yet applied
    status: str  # "ok", or "failed" (stopped on an event it could not apply)
    error: str | None = None
    failed_position: int | None = None


LAG_COUNT_LIMIT: Final = 1_000_000


async def projection_status(
    conn: asyncpg.Connection, names: Sequence[str], slices: int = 1
) -> dict[str, ProjectionStatus]:
    """Each projection's checkpoint position and how far behind the log it is; with several
    slices, each slice's (by its row's name, e.g. `conversations#0/4`), its lag counting only
    its own users' events."""
    parts = [(name, part) for name in names for part in layout(slices)]
    rows = {
        r["name"]: r
        for r in await conn.fetch(
            "SELECT name, tx_id, position, error, failed_position FROM projection_checkpoints WHERE name = ANY($1)",
            [part.row(name) for name, part in parts],
        )
    }
    result: dict[str, ProjectionStatus] = {}
    for name, part in parts:
        row = rows.get(part.row(name))
        tx_id, position = (int(row["tx_id"]), row["position"]) if row else (0, 0)
        hashes = "" if part.whole else "AND hashtext(user_id) BETWEEN $4 AND $5 "
        bounds = () if part.whole else part.bounds
        lag = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE (tx_id, position) > ($1::xid8, $2::bigint) "
            f"{hashes}LIMIT $3) AS s",
            tx_id,
            position,
            LAG_COUNT_LIMIT,
            *bounds,
        )
        oldest = await conn.fetchval(
            "SELECT extract(epoch FROM now() - recorded_at)::float8 FROM events "
            f"WHERE (tx_id, position) > ($1::xid8, $2::bigint) {hashes}ORDER BY tx_id, position LIMIT $3",
            tx_id,
            position,
            1,
            *bounds,
        )
        result[part.row(name)] = ProjectionStatus(
            position=position,
            lag=lag,
            lag_seconds=max(0.0, oldest or 0.0),
            status="failed" if row is not None and row["error"] is not None else "ok",
            error=row["error"] if row else None,
            failed_position=row["failed_position"] if row else None,
        )
    return result
