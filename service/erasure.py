"""Erasure: deleting a conversation, or a whole user, erases its content (DESIGN.md, crypto-shredding).

One transaction per erasure: append each conversation's `conversation.deleted` event, destroy
its data key (its sealed events can never be opened again), delete its idempotency records and
its read rows (search vectors with them), and write the ledger (ids and times only). Data keys
are locked first: a projection batch that holds a key (it reads and writes under it, see
`eventstore.read_all`) finishes before the erasure goes on, and the erasure then deletes what it
wrote; a batch that starts later finds no key and writes nothing.

The ledger (`erasures`) outlives the data it names: after restoring a backup taken before some
erasures, `chatlog erasures apply` (with the file `chatlog erasures export` wrote) erases again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg
import msgspec

from projections.conversations import erase_rows
from service.citus import insert_values, is_distributed
from service.events import ConversationDeleted
from service.eventstore import (
    ERASURES_LOCK,
    NotFound,
    StaleTransaction,
    VersionConflict,
    append_all,
    append_prepared,
    prepare,
)

MAX_RETRIES: Final = 50


class _Moved(Exception):
    """The stream moved on between reading its head and appending its deletion."""


# What a fresh transaction can get past: a stream that moved on, an append by a newer transaction
# (StaleTransaction), a deadlock or serialization failure.
_AGAIN: Final = (_Moved, StaleTransaction, asyncpg.TransactionRollbackError)

_HEAD = """
SELECT stream_version, user_id, type FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1
"""

# The streams' heads: one backward step on (stream_id, stream_version) each. (A DISTINCT ON over
# the user's events read all 10,000 of a large user's events, 6 ms of CPU at the erasure's start.)
# On Citus the user's shard is named, and the one-shard query keeps the simple form.
_HEADS = """
SELECT s.id, (SELECT stream_version FROM events WHERE stream_id = s.id ORDER BY stream_version DESC LIMIT 1)
FROM unnest($1::uuid[]) AS s(id) ORDER BY s.id
"""
_HEADS_DISTRIBUTED = """
SELECT DISTINCT ON (stream_id) stream_id, stream_version FROM events
WHERE user_id = $2 AND stream_id = ANY($1::uuid[]) ORDER BY stream_id, stream_version DESC
"""


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `chatlog erasures export`: who, which conversation (none: the user's own
    records, such as idempotency keys), the erasure's event, when."""

    user_id: str
    conversation_id: uuid.UUID | None
    position: int | None
    erased_at: datetime


async def erase_conversation(
    conn: asyncpg.Connection, user_id: str, stream_id: uuid.UUID, expected_version: int | None = None
) -> int:
    """Erase one live conversation of the user; the position of its deletion event. NotFound for
    another user's, an unknown or an already erased one; VersionConflict for a stale version."""
    for _ in range(MAX_RETRIES):
        try:
            async with conn.transaction():
                await _exclude_batches(conn)
                if not await conn.fetch(
                    "SELECT 1 FROM data_keys WHERE stream_id = $1 AND user_id = $2 FOR UPDATE", stream_id, user_id
                ):
                    raise NotFound(str(stream_id))
                head = await conn.fetchrow(_HEAD, stream_id)
                if head is None or head["user_id"] != user_id or head["type"] == "conversation.deleted":
                    raise NotFound(str(stream_id))
                if expected_version is not None and expected_version != head["stream_version"]:
                    raise VersionConflict(expected_version, head["stream_version"])
                try:
                    (position,) = await _erase(conn, user_id, [(stream_id, head["stream_version"])])
                except VersionConflict:
                    raise _Moved from None  # not the client's version: an append came in between
                return position
        except VersionConflict:
            if expected_version is not None:
                raise  # the client's version is stale
        except _AGAIN:
            pass  # an append came between the head and the deletion, or a deadlock: again, afresh
    raise VersionConflict(expected_version or 0, -1)


async def erase_user(conn: asyncpg.Connection, user_id: str, erased: list[uuid.UUID] | None = None) -> int:
    """Erase every conversation of the user and their idempotency records; the position of the
    last deletion event (or of the user's last event, 0 for none, when there was nothing to erase).
    `erased` receives the conversations' ids."""
    erased = [] if erased is None else erased
    for _ in range(MAX_RETRIES):
        try:
            async with conn.transaction():
                await _exclude_batches(conn)
                keyed = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT stream_id FROM data_keys WHERE user_id = $1 ORDER BY stream_id FOR UPDATE", user_id
                    )
                ]
                if await is_distributed(conn):
                    heads = await conn.fetch(_HEADS_DISTRIBUTED, keyed, user_id)
                else:
                    heads = [r for r in await conn.fetch(_HEADS, keyed) if r[1] is not None]
                positions = await _erase(conn, user_id, [(r[0], r[1]) for r in heads])
                erased[:] = [r[0] for r in heads]
                await conn.execute("DELETE FROM idempotency_keys WHERE user_id = $1", user_id)
                await conn.execute("INSERT INTO erasures (user_id) VALUES ($1)", user_id)
                if positions:
                    return max(positions)
                last = await conn.fetchval("SELECT max(position) FROM events WHERE user_id = $1", user_id)
                return int(last or 0)
        except (VersionConflict, *_AGAIN):
            continue  # an append came between the heads and the deletions, or a deadlock: again, afresh
    raise VersionConflict(0, -1)


async def _erase(conn: asyncpg.Connection, user_id: str, streams: Sequence[tuple[uuid.UUID, int]]) -> list[int]:
    """In the caller's transaction, with the streams' keys locked: the deletion events, then
    every trace of the streams' content."""
    if len(streams) == 1:
        stream_id, version = streams[0]
        deletion = prepare(user_id, stream_id, [ConversationDeleted()], data_key=None, expected_version=version)
        positions = [(await append_prepared(conn, deletion)).position]
    else:  # all the deletions in one statement, each at the version just read
        positions = await append_all(
            conn,
            [
                prepare(user_id, stream_id, [ConversationDeleted()], data_key=None, expected_version=version)
                for stream_id, version in streams
            ],
        )
    ids = [stream_id for stream_id, _ in streams]
    # Every statement names the user: on Citus it then stays on the user's shard (service/citus.py).
    await conn.execute("DELETE FROM data_keys WHERE user_id = $2 AND stream_id = ANY($1::uuid[])", ids, user_id)
    await conn.execute("DELETE FROM idempotency_keys WHERE user_id = $2 AND stream_id = ANY($1::uuid[])", ids, user_id)
    await erase_rows(conn, {"messages": "messages", "conversations": "conversations"}, ids, user_id)
    if await is_distributed(conn):  # on one shard, in one phase (service/citus.py)
        rows = [(user_id, stream_id, position) for stream_id, position in zip(ids, positions, strict=True)]
        await insert_values(conn, "erasures", ("user_id", "stream_id", "position"), ("text", "uuid", "bigint"), rows)
    else:
        await conn.execute(
            "INSERT INTO erasures (user_id, stream_id, position) SELECT $1, * FROM unnest($2::uuid[], $3::bigint[])",
            user_id,
            ids,
            positions,
        )
    return positions


async def _exclude_batches(conn: asyncpg.Connection) -> None:
    """On Citus, wait for the projection batches that hold keys (see `eventstore.read_all`); on one
    server the keys' row locks do it."""
    if await is_distributed(conn):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ERASURES_LOCK)


async def owner_of(conn: asyncpg.Connection, stream_id: uuid.UUID) -> str | None:
    owner: str | None = await conn.fetchval("SELECT user_id FROM events WHERE stream_id = $1 LIMIT 1", stream_id)
    return owner


async def export_ledger(conn: asyncpg.Connection) -> list[LedgerEntry]:
    rows = await conn.fetch("SELECT user_id, stream_id, position, erased_at FROM erasures ORDER BY id")
    return [LedgerEntry(user_id=r[0], conversation_id=r[1], position=r[2], erased_at=r[3]) for r in rows]


async def apply_ledger(conn: asyncpg.Connection, entries: Sequence[LedgerEntry]) -> tuple[int, int]:
    """Erase again what the ledger names and this database still holds (after restoring an older
    backup): each conversation that still has its key, and each user's idempotency records made
    before their erasure. Idempotent. Returns (conversations erased, idempotency records deleted)."""
    conversations = records = 0
    for entry in entries:
        if entry.conversation_id is not None:
            try:
                await erase_conversation(conn, entry.user_id, entry.conversation_id)
                conversations += 1
            except NotFound:
                pass  # erased already, or made after this backup
        else:
            async with conn.transaction():
                status = await conn.execute(
                    "DELETE FROM idempotency_keys WHERE user_id = $1 AND created_at <= $2",
                    entry.user_id,
                    entry.erased_at,
                )
                records += int(status.split()[-1])
                await conn.execute(
                    "INSERT INTO erasures (user_id, erased_at) SELECT $1, $2 WHERE NOT EXISTS "
                    "(SELECT 1 FROM erasures WHERE user_id = $1 AND stream_id IS NULL AND erased_at = $2)",
                    entry.user_id,
                    entry.erased_at,
                )
    return conversations, records
