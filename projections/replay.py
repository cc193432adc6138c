"""Rebuild a projection's read tables from the log (`replay`), or check them against it (`verify`).

Both fold the whole log, through the projection's own `apply`, into shadow tables made `LIKE`
the live ones (so they follow whatever the migrations made of them), while the live tables keep
serving. Replay then swaps them in, in one transaction that first locks the projection's
checkpoint row (pausing its worker between batches, in the worker's own lock order), folds the
last events, renames the live tables away and drops them, gives the new tables (and their
indexes and foreign keys) the live names, and moves the checkpoint. Readers see the old tables
until that commit. Interrupted before it, a replay leaves the live tables untouched; the next one
starts its shadow tables afresh.

Verify folds into shadow tables up to the live checkpoint, then, holding the checkpoint row,
compares every row both ways and drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from projections.base import Projection
from projections.worker import ProjectionFailed, ensure_checkpoint, lock_key
from service.connections import connect_args
from service.eventstore import Checkpoint, RecordedEvent, read_all

REPLAY: Final = "__replay"
VERIFY: Final = "__verify"

Progress = Callable[[int, float], None]


class ReplayBusy(Exception):
    """Another replay or verify of this projection is running."""


class Difference(msgspec.Struct, frozen=True):
    table: str
    side: str  # "only in the read table" or "only in a fresh fold"
    row: dict[str, Any]


async def _connect(url: str, purpose: str) -> asyncpg.Connection:
    return await asyncpg.connect(**connect_args(url), server_settings={"application_name": f"chatlog-{purpose}"})


async def _create_shadow(conn: asyncpg.Connection, projection: Projection, suffix: str) -> dict[str, str]:
    """Empty tables like the live ones, without foreign keys yet (see `_add_foreign_keys`)."""
    names = {t: f"{t}{suffix}" for t in projection.tables}
    async with conn.transaction():
        for table in reversed(projection.tables):
            await conn.execute(f"DROP TABLE IF EXISTS {names[table]} CASCADE")
        for table in projection.tables:
            await conn.execute(f"CREATE TABLE {names[table]} (LIKE {table} INCLUDING ALL)")
    return names


async def _add_foreign_keys(conn: asyncpg.Connection, projection: Projection, names: dict[str, str]) -> None:
    """The live tables' foreign keys, on the built tables: checked once, in one join, instead of
    a lookup per inserted row while folding (the fold deletes children itself, needing no cascade)."""
    for child, column, parent, on_delete in projection.foreign_keys:
        await conn.execute(
            f"ALTER TABLE {names[child]} ADD FOREIGN KEY ({column}) "
            f"REFERENCES {names[parent]} (id) ON DELETE {on_delete}"
        )


async def _drop_shadow(conn: asyncpg.Connection, projection: Projection, suffix: str) -> None:
    for table in reversed(projection.tables):
        await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix} CASCADE")


async def _fold(
    reader: asyncpg.Connection,
    writer: asyncpg.Connection,
    projection: Projection,
    names: dict[str, str],
    after: Checkpoint,
    *,
    until: Checkpoint | None,
    batch_size: int,
    progress: Progress | None,
    in_transaction: bool = False,
) -> Checkpoint:
    """Fold the log after `after` (up to `until`, or as far as it is readable) into `names`.

    With two connections the next batch is read while the current one is written. Outside
    `in_transaction`, each batch commits on its own (the shadow tables are nobody else's).
    """
    pipelined = reader is not writer
    checkpoint, applied, started = after, 0, time.monotonic()

    async def next_batch(ck: Checkpoint) -> list[RecordedEvent]:
        events = await read_all(reader, ck, batch_size)
        if until is not None:
            events = [e for e in events if e.checkpoint <= until]
        return events

    pending = asyncio.ensure_future(next_batch(checkpoint))
    try:
        while events := await pending:
            checkpoint = events[-1].checkpoint
            if pipelined:
                pending = asyncio.ensure_future(next_batch(checkpoint))
            if in_transaction:
                await projection.apply(writer, events, names)
            else:
                async with writer.transaction():
                    await projection.apply(writer, events, names)
            applied += len(events)
            if progress is not None:
                progress(applied, time.monotonic() - started)
            if not pipelined:
                pending = asyncio.ensure_future(next_batch(checkpoint))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                await pending
    return checkpoint


async def _locked_checkpoint(conn: asyncpg.Connection, name: str) -> Checkpoint:
    row = await conn.fetchrow("SELECT tx_id, position FROM projection_checkpoints WHERE name = $1 FOR UPDATE", name)
    assert row is not None
    return Checkpoint(int(row[0]), row[1])


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
    url: str, projection: Projection, *, batch_size: int = 5000, progress: Progress | None = None
) -> Checkpoint:
    """Rebuild `projection`'s tables from the log and swap them in; returns the new checkpoint."""
    reader = await _connect(url, f"replay-{projection.name}")
    writer = await _connect(url, f"replay-{projection.name}")
    try:
        async with _exclusive(writer, projection.name):
            await ensure_checkpoint(writer, projection.name)
            names = await _create_shadow(writer, projection, REPLAY)
            with _fewer_collections():
                checkpoint = await _fold(
                    reader, writer, projection, names, Checkpoint(),
                    until=None, batch_size=batch_size, progress=progress,
                )  # fmt: skip
            await _add_foreign_keys(writer, projection, names)  # before the worker is paused
            async with writer.transaction():
                await _locked_checkpoint(writer, projection.name)  # the live worker waits from here on
                checkpoint = await _fold(
                    writer, writer, projection, names, checkpoint,
                    until=None, batch_size=batch_size, progress=None, in_transaction=True,
                )  # fmt: skip
                await _swap(writer, projection, names)
                await writer.execute(
                    "UPDATE projection_checkpoints SET tx_id = $2::xid8, position = $3, updated_at = now(), "
                    "error = NULL, failed_position = NULL WHERE name = $1",
                    projection.name,
                    checkpoint.tx_id,
                    checkpoint.position,
                )
            return checkpoint
    finally:
        with contextlib.suppress(Exception):
            await _drop_shadow(writer, projection, REPLAY)  # left only by an interrupted replay
        await reader.close()
        await writer.close()


_INDEX_HEAD = re.compile(r"INDEX \S+ ON \S+")


async def _indexes(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """The table's indexes: name -> definition with the index and table names taken out."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1::regclass",
        table,
    )
    return {name: _INDEX_HEAD.sub("INDEX ON T", definition) for name, definition in rows}


async def _foreign_keys(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'f'",
        table,
    )
    return dict(rows)


async def _swap(conn: asyncpg.Connection, projection: Projection, names: dict[str, str]) -> None:
    """Put the shadow tables in the live ones' place, under the live names, in the caller's transaction."""
    tables = projection.tables
    await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
    live_indexes = {t: await _indexes(conn, t) for t in tables}
    live_fks = {t: await _foreign_keys(conn, t) for t in tables}
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
        fk_by_definition = {d: n for n, d in live_fks[table].items()}
        for name, definition in (await _foreign_keys(conn, table)).items():
            target = fk_by_definition.get(definition)
            if target is not None and target != name:
                await conn.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{name}" TO "{target}"')


async def verify(url: str, projection: Projection, *, batch_size: int = 5000, limit: int = 100) -> list[Difference]:
    """Every row in which the read tables differ from a fresh fold of the log (at most `limit`)."""
    reader = await _connect(url, f"verify-{projection.name}")
    writer = await _connect(url, f"verify-{projection.name}")
    try:
        async with _exclusive(writer, projection.name):
            await ensure_checkpoint(writer, projection.name)
            row = await writer.fetchrow(
                "SELECT tx_id, position, error, failed_position FROM projection_checkpoints WHERE name = $1",
                projection.name,
            )
            assert row is not None
            if row["error"] is not None:
                raise ProjectionFailed(projection.name, row["failed_position"], row["error"])
            names = await _create_shadow(writer, projection, VERIFY)
            try:
                with _fewer_collections():
                    done = await _fold(
                        reader, writer, projection, names, Checkpoint(),
                        until=Checkpoint(int(row["tx_id"]), row["position"]), batch_size=batch_size, progress=None,
                    )  # fmt: skip
                async with writer.transaction():
                    live = await _locked_checkpoint(writer, projection.name)
                    await _fold(
                        writer, writer, projection, names, done,
                        until=live, batch_size=batch_size, progress=None, in_transaction=True,
                    )  # fmt: skip
                    return await _differences(writer, projection, names, limit)
            finally:
                await _drop_shadow(writer, projection, VERIFY)
    finally:
        await reader.close()
        await writer.close()


async def _differences(
    conn: asyncpg.Connection, projection: Projection, names: dict[str, str], limit: int
) -> list[Difference]:
    found: list[Difference] = []
    for table in projection.tables:
        shadow = names[table]
        for side, first, second in (
            ("only in the read table", table, shadow),
            ("only in a fresh fold", shadow, table),
        ):
            rows = await conn.fetch(
                f"SELECT * FROM (TABLE {first} EXCEPT ALL TABLE {second}) AS d LIMIT $1", limit - len(found)
            )
            found += [Difference(table, side, {k: _plain(v) for k, v in r.items()}) for r in rows]
            if len(found) >= limit:
                return found
    return found


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
