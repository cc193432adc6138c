"""Rebuild a projection's read tables from the log (`replay`), or check them against it (`verify`).

Both fold the whole log, through the projection's own `apply`, into shadow tables made `LIKE`
the live ones (so they follow whatever the migrations made of them), while the live tables keep
serving. Replay then swaps them in, in one transaction that first locks the projection's
checkpoint row (pausing its worker between batches, in the worker's own lock order), folds the
last events, renames the live tables away and drops them, gives the new tables (and their
indexes and foreign keys) the live names, and moves the checkpoint. Readers see the old tables
until that commit. Interrupted before it, a replay leaves the live tables untouched; the next one
starts its shadow tables afresh.

The fold from the start is the bulk of the work: one connection reads while several fold the
users' shares side by side (`_bulk_fold`), and the indexes that only serve readers are built once
the rows are in (`Shadow`), before the swap pauses the worker.

Verify folds into shadow tables up to the live checkpoint, then, holding the checkpoint row,
compares every row both ways and drops them.

With slices (projections/slices.py), a whole replay holds every slice's checkpoint row for the
swap and moves them all to where it stopped. A replay of one slice folds only that slice's
users' events into shadow tables, and then, holding the slice's row and the tables against
writes (readers go on), replaces that slice's rows in the live tables with the shadow's. A whole
verify checks each slice in turn, each against its own checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from projections.base import Projection
from projections.slices import RETIRED, LayoutMismatch, Slice, adopt_layout, current_layout, layout
from projections.worker import ProjectionFailed, lock_key, mark_all_users
from service.citus import is_distributed
from service.connections import connect_args
from service.eventstore import Checkpoint, RecordedEvent, read_all
from service.sealing import Keyring

REPLAY: Final = "__replay"
VERIFY: Final = "__verify"

MAINTENANCE_WORK_MEM: Final = "128MB"
WRITERS: Final = 2  # connections that fold in parallel (see `_bulk_fold`)

Progress = Callable[[int, float], None]


class ReplayBusy(Exception):
    """Another replay or verify of this projection is running."""


class Shadow(msgspec.Struct, frozen=True):
    """A replay's or verify's tables (`names`: live name -> shadow name).

    They are made without the indexes that only readers use, which the fold would otherwise
    maintain row by row: a replay builds them (`deferred_indexes`, statements for the shadow
    tables) once the fold is done, each in one sort; a verify never needs them. A verify's tables
    are also unlogged: nothing of them has to survive a crash. A replay's are logged from the
    start: unlogged ones made logged after the fold saved no time at 1M events (the rewrite,
    which nothing else can overlap, cost about what their WAL costs while folding, where the
    other connections keep working).
    """

    names: dict[str, str]
    deferred_indexes: list[str]


class Difference(msgspec.Struct, frozen=True):
    table: str
    side: str  # "only in the read table" or "only in a fresh fold"
    row: dict[str, Any]


@contextlib.asynccontextmanager
async def _connections(url: str, purpose: str, count: int) -> AsyncIterator[list[asyncpg.Connection]]:
    connections: list[asyncpg.Connection] = []
    try:
        for _ in range(count):
            connections.append(await _connect(url, purpose))
        yield connections
    finally:
        for conn in connections:
            await conn.close()


async def _connect(url: str, purpose: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(
        **connect_args(url),
        server_settings={
            "application_name": f"chatlog-{purpose}",
            # The shadow tables are nobody's until the swap, which alone is committed synchronously.
            "synchronous_commit": "off",
            # Plans of the fold's statements cached while the shadow tables were small would stay.
            "plan_cache_mode": "force_custom_plan",
            # For building the readers' indexes after the fold (per connection; the server's own).
            "maintenance_work_mem": MAINTENANCE_WORK_MEM,
        },
    )
    await is_distributed(conn)  # on Citus: the settings its statements need, before any other
    return conn


async def _create_shadow(conn: asyncpg.Connection, projection: Projection, suffix: str, *, logged: bool) -> Shadow:
    """Empty tables like the live ones, with their unique indexes only (see `Shadow`)."""
    names = {t: f"{t}{suffix}" for t in projection.tables}
    deferred: list[str] = []
    async with conn.transaction():
        for table in reversed(projection.tables):
            await conn.execute(f"DROP TABLE IF EXISTS {names[table]} CASCADE")
        for table in projection.tables:
            kind = "TABLE" if logged else "UNLOGGED TABLE"
            await conn.execute(f"CREATE {kind} {names[table]} (LIKE {table} INCLUDING ALL)")
            for name, definition in await conn.fetch(_READERS_INDEXES, names[table]):
                await conn.execute(f'DROP INDEX "{name}"')
                deferred.append(definition)
    if await is_distributed(conn):  # shards beside the log's, as the live tables'
        for table in projection.tables:
            await conn.execute(
                "SELECT create_distributed_table($1, 'user_id', colocate_with => 'events')", names[table]
            )
    return Shadow(names, deferred)


# Indexes that only serve readers: neither unique (the fold relies on those to refuse what the
# live tables would refuse, at the event that breaks them) nor behind a constraint.
_READERS_INDEXES = """
SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1::regclass AND NOT i.indisunique
  AND NOT EXISTS (SELECT FROM pg_constraint WHERE conindid = i.indexrelid)
ORDER BY c.relname
"""


async def _complete(connections: Sequence[asyncpg.Connection], projection: Projection, shadow: Shadow) -> None:
    """Give the folded shadow tables what the live ones have, before the worker is paused: the
    readers' indexes (built side by side on the connections) and the planner's statistics."""
    pending = iter(shadow.deferred_indexes)

    async def build(conn: asyncpg.Connection) -> None:
        for definition in pending:
            await conn.execute(definition)

    for outcome in await asyncio.gather(*(build(conn) for conn in connections), return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome  # once no build is running on any connection
    # Statistics too: swapped in without them, the tables would be planned on default estimates
    # (a search for a common word scanning the text index across all users) until autovacuum
    # got round to them.
    for table in shadow.names.values():
        await connections[0].execute(f"ANALYZE {table}")


async def _drop_shadow(conn: asyncpg.Connection, projection: Projection, suffix: str) -> None:
    for table in reversed(projection.tables):
        await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix} CASCADE")


async def _bulk_fold(
    reader: asyncpg.Connection,
    keyring: Keyring,
    writers: Sequence[asyncpg.Connection],
    projection: Projection,
    names: dict[str, str],
    *,
    until: Checkpoint | None,
    batch_size: int,
    progress: Progress | None,
    hashes: tuple[int, int] | None = None,
) -> Checkpoint:
    """Fold the log from its start (up to `until`, or as far as it is readable) into the shadow
    tables `names`; returns where it stopped.

    One connection reads the next batch while the writers fold the last one. Each writer folds
    the events of its share of the users (by a hash of `user_id`), in log order, a batch in a
    transaction of its own (the shadow tables are nobody else's). A projection's rows of one user
    follow from that user's events alone (DESIGN.md: projections split by `user_id`), so the
    shares need no order between them, and the server folds on as many cores as there are writers.
    """
    queues = [asyncio.Queue[list[RecordedEvent] | None](maxsize=1) for _ in writers]
    checkpoint, applied, started = Checkpoint(), 0, time.monotonic()
    # The first failure ends the fold, without cancelling a statement in flight: a cancel request
    # can reach the server after its statement ended and cancel the connection's next one.
    failures: list[Exception] = []

    async def read() -> None:
        nonlocal checkpoint
        try:
            while not failures and (events := await read_all(reader, keyring, checkpoint, batch_size, hashes=hashes)):
                if until is not None and (events := [e for e in events if e.checkpoint <= until]) == []:
                    break
                checkpoint = events[-1].checkpoint
                shares: list[list[RecordedEvent]] = [[] for _ in writers]
                for e in events:
                    shares[hash(e.user_id) % len(writers)].append(e)
                for queue, share in zip(queues, shares, strict=True):
                    if share:
                        await queue.put(share)
        except Exception as exc:
            failures.append(exc)
        finally:
            for queue in queues:
                await queue.put(None)

    async def write(conn: asyncpg.Connection, queue: asyncio.Queue[list[RecordedEvent] | None]) -> None:
        nonlocal applied
        while (events := await queue.get()) is not None:
            if failures:
                continue  # only drain the queue, so that the reader never waits on it
            try:
                async with conn.transaction():
                    await projection.apply(conn, events, names)
            except Exception as exc:
                failures.append(exc)
                continue
            applied += len(events)
            if progress is not None:
                progress(applied, time.monotonic() - started)

    await asyncio.gather(read(), *(write(conn, queue) for conn, queue in zip(writers, queues, strict=True)))
    if failures:
        raise failures[0]
    return checkpoint


async def _fold_rest(
    conn: asyncpg.Connection,
    keyring: Keyring,
    projection: Projection,
    names: dict[str, str],
    after: Checkpoint,
    *,
    until: Checkpoint | None,
    batch_size: int,
    hashes: tuple[int, int] | None = None,
) -> Checkpoint:
    """Fold the log after `after` (up to `until`, or as far as it is readable) into `names`, in the
    caller's transaction; returns where it stopped."""
    checkpoint = after
    while events := await read_all(conn, keyring, checkpoint, batch_size, hashes=hashes):
        if until is not None and (events := [e for e in events if e.checkpoint <= until]) == []:
            break
        await projection.apply(conn, events, names)
        checkpoint = events[-1].checkpoint
    return checkpoint


async def _locked_checkpoint(conn: asyncpg.Connection, names: Sequence[str]) -> Checkpoint:
    """Lock these checkpoint rows (a layout's, or one slice's); the oldest of their checkpoints."""
    rows = await conn.fetch(
        "SELECT tx_id, position, error FROM projection_checkpoints WHERE name = ANY($1::text[]) ORDER BY name "
        "FOR UPDATE",
        list(names),
    )
    if len(rows) != len(names) or any(r["error"] == RETIRED for r in rows):
        raise LayoutMismatch("the projection's slice layout changed meanwhile; run the command again")
    return min(Checkpoint(int(r[0]), r[1]) for r in rows)


async def _checked_layout(conn: asyncpg.Connection, projection: Projection, slices: int) -> None:
    """Checkpoint rows for `slices` slices (made on a database where no worker ran yet), or
    `LayoutMismatch` if the projection runs as another number of slices."""
    current = await current_layout(conn, projection.name)
    if current is None:
        await adopt_layout(conn, projection.name, slices, lock_key(f"{projection.name}:layout"))
    elif current != slices:
        raise LayoutMismatch(
            f"projection {projection.name} runs as {current} slice(s), not {slices}: "
            f"set CHATLOG_PROJECTION_SLICES={current}"
        )


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Folding a long log allocates many short-lived objects and no cycles worth chasing; with
    the default thresholds Python's collector took about 30% of replay's CPU (measured at 1M
    events), for no memory gain. Raised for the fold, restored after."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@contextlib.asynccontextmanager
async def _exclusive(conn: asyncpg.Connection, name: str) -> Any:
    key = lock_key(f"{name}:rebuild")
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        raise ReplayBusy(f"a replay or verify of {name} is already running")
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def replay(
    url: str,
    projection: Projection,
    keyring: Keyring,
    *,
    batch_size: int = 5000,
    progress: Progress | None = None,
    writers: int = WRITERS,
    slices: int = 1,
    part: Slice | None = None,
) -> Checkpoint:
    """Rebuild `projection`'s tables from the log and swap them in (or only slice `part`'s rows,
    of a projection that runs as `slices` slices); returns the new checkpoint."""
    async with _connections(url, f"replay-{projection.name}", 1 + writers) as (reader, *folders):
        main = folders[0]
        async with _exclusive(main, projection.name):
            await _checked_layout(main, projection, slices)
            if part is not None and not part.whole:
                return await _replay_slice(reader, folders, keyring, projection, part, batch_size, progress)
            rows = [s.row(projection.name) for s in layout(slices)]
            try:
                shadow = await _create_shadow(main, projection, REPLAY, logged=True)
                with _fewer_collections():
                    checkpoint = await _bulk_fold(
                        reader, keyring, folders, projection, shadow.names,
                        until=None, batch_size=batch_size, progress=progress,
                    )  # fmt: skip
                await _complete([*folders, reader], projection, shadow)  # before the worker is paused
                async with main.transaction():
                    await main.execute("SET LOCAL synchronous_commit = on")  # this commit is the replay's result
                    await _locked_checkpoint(main, rows)  # the live workers wait from here on
                    checkpoint = await _fold_rest(
                        main, keyring, projection, shadow.names, checkpoint, until=None, batch_size=batch_size
                    )
                    await _swap(main, projection, shadow.names)
                    await mark_all_users(main, projection.name, checkpoint)
                    await main.execute(
                        "UPDATE projection_checkpoints SET tx_id = $2::xid8, position = $3, updated_at = now(), "
                        "error = NULL, failed_position = NULL WHERE name = ANY($1::text[])",
                        rows,
                        checkpoint.tx_id,
                        checkpoint.position,
                    )
                return checkpoint
            finally:
                with contextlib.suppress(Exception):
                    await _drop_shadow(main, projection, REPLAY)  # left only by an interrupted replay


async def _replay_slice(
    reader: asyncpg.Connection,
    folders: Sequence[asyncpg.Connection],
    keyring: Keyring,
    projection: Projection,
    part: Slice,
    batch_size: int,
    progress: Progress | None,
) -> Checkpoint:
    """Rebuild the rows of one slice's users (see the module docstring)."""
    main, row, hashes = folders[0], part.row(projection.name), part.bounds
    names = (await _create_shadow(main, projection, REPLAY, logged=False)).names
    try:
        with _fewer_collections():
            checkpoint = await _bulk_fold(
                reader, keyring, folders, projection, names,
                until=None, batch_size=batch_size, progress=progress, hashes=hashes,
            )  # fmt: skip
        async with main.transaction():
            await main.execute("SET LOCAL synchronous_commit = on")
            await _locked_checkpoint(main, [row])  # the slice's worker waits from here on
            checkpoint = await _fold_rest(
                main, keyring, projection, names, checkpoint, until=None, batch_size=batch_size, hashes=hashes
            )
            # Writers wait (every erasure that touched the tables has committed); readers go on.
            await main.execute(f"LOCK TABLE {', '.join(projection.tables)} IN SHARE ROW EXCLUSIVE MODE")
            await projection.erase(main, names)
            for table in reversed(projection.tables):
                await main.execute(f"DELETE FROM {table} WHERE hashtext(user_id) BETWEEN $1 AND $2", *hashes)
            for table in projection.tables:
                await main.execute(f"INSERT INTO {table} SELECT * FROM {names[table]}")
            await mark_all_users(main, projection.name, checkpoint, hashes)
            await main.execute(
                "UPDATE projection_checkpoints SET tx_id = $2::xid8, position = $3, updated_at = now(), "
                "error = NULL, failed_position = NULL WHERE name = $1",
                row,
                checkpoint.tx_id,
                checkpoint.position,
            )
        return checkpoint
    finally:
        with contextlib.suppress(Exception):
            await _drop_shadow(main, projection, REPLAY)


_INDEX_HEAD = re.compile(r"INDEX \S+ ON \S+")


async def _indexes(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """The table's indexes: name -> definition with the index and table names taken out."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1::regclass",
        table,
    )
    return {name: _INDEX_HEAD.sub("INDEX ON T", definition) for name, definition in rows}


async def _swap(conn: asyncpg.Connection, projection: Projection, names: dict[str, str]) -> None:
    """Put the shadow tables in the live ones' place, under the live names, in the caller's transaction."""
    tables = projection.tables
    await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
    # An erasure removes its rows from the live tables at once, before its events are folded:
    # with the live tables locked, every erasure that touched them has committed (or waits), so
    # the ledger read now names them all.
    await projection.erase(conn, names)
    live_indexes = {t: await _indexes(conn, t) for t in tables}
    for table in reversed(tables):
        await conn.execute(f"DROP TABLE {table} CASCADE")
    for table in tables:
        await conn.execute(f"ALTER TABLE {names[table]} RENAME TO {table}")
    for table in tables:
        by_definition = {d: n for n, d in live_indexes[table].items()}
        for name, definition in (await _indexes(conn, table)).items():
            target = by_definition.get(definition)
            if target is not None and target != name:
                await conn.execute(f'ALTER INDEX "{name}" RENAME TO "{target}"')


async def verify(
    url: str,
    projection: Projection,
    keyring: Keyring,
    *,
    batch_size: int = 5000,
    limit: int = 100,
    writers: int = WRITERS,
    slices: int = 1,
    part: Slice | None = None,
) -> list[Difference]:
    """Every row in which the read tables differ from a fresh fold of the log (at most `limit`):
    of slice `part`'s users only, or of every slice of a projection that runs as `slices`."""
    async with _connections(url, f"verify-{projection.name}", 1 + writers) as (reader, *folders):
        main = folders[0]
        async with _exclusive(main, projection.name):
            await _checked_layout(main, projection, slices)
            found: list[Difference] = []
            for each in [part] if part is not None else layout(slices):
                found += await _verify_part(reader, folders, keyring, projection, each, batch_size, limit - len(found))
                if len(found) >= limit:
                    break
            return found


async def _verify_part(
    reader: asyncpg.Connection,
    folders: Sequence[asyncpg.Connection],
    keyring: Keyring,
    projection: Projection,
    part: Slice,
    batch_size: int,
    limit: int,
) -> list[Difference]:
    main, name = folders[0], part.row(projection.name)
    hashes = None if part.whole else part.bounds
    row = await main.fetchrow(
        "SELECT tx_id, position, error, failed_position FROM projection_checkpoints WHERE name = $1", name
    )
    assert row is not None
    if row["error"] is not None:
        raise ProjectionFailed(name, row["failed_position"], row["error"])
    names = (await _create_shadow(main, projection, VERIFY, logged=False)).names
    try:
        with _fewer_collections():
            done = await _bulk_fold(
                reader, keyring, folders, projection, names,
                until=Checkpoint(int(row["tx_id"]), row["position"]), batch_size=batch_size, progress=None,
                hashes=hashes,
            )  # fmt: skip
        for shadow in names.values():  # statistics for the comparison's join plan
            await main.execute(f"ANALYZE {shadow}")
        async with main.transaction():
            live = await _locked_checkpoint(main, [name])
            await _fold_rest(main, keyring, projection, names, done, until=live, batch_size=batch_size, hashes=hashes)
            await projection.erase(main, names)  # as the live tables: erased at once
            return await _differences(main, projection, names, limit, hashes)
    finally:
        await _drop_shadow(main, projection, VERIFY)


async def _differences(
    conn: asyncpg.Connection,
    projection: Projection,
    names: dict[str, str],
    limit: int,
    hashes: tuple[int, int] | None = None,
) -> list[Difference]:
    """Rows of the read tables (of a slice's users, with `hashes`) and of the fresh fold that the
    other side lacks or has otherwise.

    Rows are paired by primary key in one join (both sides are indexed on it), instead of two
    set differences that each sort both tables whole.
    """
    found: list[Difference] = []
    for table in projection.tables:
        shadow = names[table]
        key: list[str] | None = await conn.fetchval(_PRIMARY_KEY, table)
        assert key, f"{table} has no primary key to pair its rows by"
        on = " AND ".join(f"l.{column} = f.{column}" for column in key)
        live = table if hashes is None else f"(SELECT * FROM {table} WHERE hashtext(user_id) BETWEEN $2 AND $3)"
        rows = await conn.fetch(
            f"SELECT l.*, f.* FROM {live} AS l FULL JOIN {shadow} AS f ON {on} "
            "WHERE ROW(l.*) IS DISTINCT FROM ROW(f.*) LIMIT $1",
            limit - len(found),
            *(hashes or ()),
        )
        for r in rows:
            values = tuple(r)
            width = len(values) // 2
            columns = list(r.keys())[:width]
            at = [columns.index(column) for column in key]
            for side, row in (("only in the read table", values[:width]), ("only in a fresh fold", values[width:])):
                if any(row[i] is not None for i in at):  # not the missing side of the join
                    found.append(Difference(table, side, {c: _plain(v) for c, v in zip(columns, row, strict=True)}))
        if len(found) >= limit:
            return found[:limit]
    return found


_PRIMARY_KEY = """
SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::regclass AND i.indisprimary
"""


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def terminal_progress(name: str, total: int) -> Progress | None:
    """A progress line with events/s on a terminal (stderr); nothing when not on one."""
    if not sys.stderr.isatty():
        return None

    def show(applied: int, seconds: float) -> None:
        rate = applied / seconds if seconds > 0 else 0.0
        width = 30
        done = min(width, int(width * applied / total)) if total else width
        sys.stderr.write(
            f"\r{name:>14} [{'#' * done}{'.' * (width - done)}] {applied:,}/{total:,} events  {rate:,.0f} ev/s"
        )
        sys.stderr.flush()

    return show


def differences_report(differences: Sequence[Difference]) -> str:
    return "\n".join(f"{d.table}: {d.side}: {msgspec.json.encode(d.row).decode()}" for d in differences)
