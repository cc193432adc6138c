"""Queries: the read tables (and the user's own event feed), always filtered by user.

Pages use keyset pagination on the orders the indexes hold, so a page costs the same at any
depth, and items that arrive while a client walks the pages do not shift them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from projections.slices import slice_sql
from service import shapes
from service.citus import is_distributed
from service.errors import BadRequest, NotReady
from service.eventstore import Checkpoint, NotFound, RecordedEvent, read_user
from service.sealing import Keyring

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_CONVERSATION_COLUMNS: Final = (
    "id, title, metadata::text, created_at, updated_at, message_count, last_message_preview, version, "
    "active_leaf_id, forked_from_conversation, forked_from_message"
)
_MESSAGE_COLUMNS: Final = "id, conversation_id, seq, role, content, metadata::text, created_at, position, parent_id"


def micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _conversation(row: asyncpg.Record) -> shapes.Conversation:
    return shapes.Conversation(
        id=row[0],
        title=row[1],
        metadata=msgspec.json.decode(row[2]),
        created_at=shapes.timestamp(row[3]),
        updated_at=shapes.timestamp(row[4]),
        message_count=row[5],
        last_message_preview=row[6],
        version=row[7],
        active_leaf_id=row[8],
        forked_from=None if row[9] is None else shapes.ForkedFrom(conversation_id=row[9], message_id=row[10]),
    )


def message_from_row(row: Sequence[Any], parent_column: int = 8, first: int = 0) -> shapes.Message:
    """The message in `row`'s columns `_MESSAGE_COLUMNS`, from column `first` on."""
    return shapes.Message(
        id=row[first],
        conversation_id=row[first + 1],
        seq=row[first + 2],
        role=row[first + 3],
        content=row[first + 4],
        metadata=msgspec.json.decode(row[first + 5]),
        created_at=shapes.timestamp(row[first + 6]),
        position=row[first + 7],
        parent_id=row[first + parent_column],
    )


# The caller's newest event (in log order, by the user's own index) and, if asked, the event at a
# position: found in the database, so that a write answered by any instance of the service counts.
_TARGETS: Final = """
LEFT JOIN LATERAL (
    SELECT tx_id, position FROM events WHERE user_id = $1 ORDER BY tx_id DESC, position DESC LIMIT 1
) AS own ON true
LEFT JOIN LATERAL (SELECT tx_id FROM events WHERE position = $2) AS asked ON true
"""
# Where the read models stand, and the targets: one round trip.
_READABLE: Final = f"""
SELECT c.tx_id, c.position, own.tx_id, own.position, asked.tx_id
FROM projection_checkpoints AS c {_TARGETS}
WHERE c.name = 'conversations'
"""
# With a replica, the targets come from the primary (where an answered write is certain to be) and
# the checkpoint from the replica (whose read rows it vouches for: a standby replays WAL in commit
# order, so the rows written with a checkpoint are there once the checkpoint is).
_PRIMARY_TARGETS: Final = (
    "SELECT NULL, NULL, own.tx_id, own.position, asked.tx_id, asked.tx_id < chatlog_horizon() "
    f"FROM (VALUES (1)) AS c {_TARGETS}"
)
_CHECKPOINT: Final = "SELECT tx_id, position FROM projection_checkpoints WHERE name = 'conversations'"

# With N projection slices: the checkpoint of the caller's slice (projections/slices.py, $3 = N).
# It moves only with its own users' events, so a `min_position` counts once every transaction up
# to that event has ended (its event below the horizon) and the caller's newest event is folded:
# the caller's events up to it are then all visible, and folded in log order before the newest.
_READABLE_SLICED: Final = _READABLE.replace(
    "asked.tx_id\n", "asked.tx_id, asked.tx_id < chatlog_horizon()\n", 1
).replace("c.name = 'conversations'", f"c.name = 'conversations#' || {slice_sql('$1', '$3')} || '/' || $3", 1)
assert _READABLE_SLICED.count("chatlog_horizon") == 1 and "hashtext" in _READABLE_SLICED

# On Citus (service/citus.py) the checkpoint is on the coordinator, the rows on the user's worker,
# and a projection batch over several workers commits in two phases: the coordinator first. The
# batch also leaves its checkpoint beside the user's rows (`projection_marks`): the caller's newest
# event counts as readable once that mark, read from the user's shard with the event, has passed it.
_OWN_AND_MARK: Final = """
SELECT own.tx_id, own.position, mark.tx_id, mark.position
FROM (SELECT tx_id, position FROM events WHERE user_id = $1 ORDER BY tx_id DESC, position DESC LIMIT 1) AS own
LEFT JOIN projection_marks AS mark ON mark.user_id = $1 AND mark.name = 'conversations'
"""
_ASKED: Final = "SELECT tx_id FROM events WHERE position = $1"


_SLICE_CHECKPOINT: Final = (
    "SELECT tx_id, position FROM projection_checkpoints "
    f"WHERE name = 'conversations#' || {slice_sql('$1::text', '$2')} || '/' || $2"
)
_BELOW_HORIZON: Final = "SELECT $1::xid8 < chatlog_horizon()"


async def _checkpoint_of(conn: asyncpg.Connection, user_id: str, slices: int) -> asyncpg.Record | None:
    """The checkpoint row that covers the user: the projection's, or their slice's."""
    if slices == 1:
        return await conn.fetchrow(_CHECKPOINT)
    return await conn.fetchrow(_SLICE_CHECKPOINT, user_id, slices)


async def _readable_distributed(
    conn: asyncpg.Connection, user_id: str, min_position: int | None, slices: int
) -> tuple[Any, ...]:
    """`_READABLE`'s answer on Citus (`_READABLE_SLICED`'s with slices), the own event counted
    only once its mark has passed it."""
    asked = await conn.fetchval(_ASKED, min_position) if min_position is not None else None
    below = asked is not None and bool(await conn.fetchval(_BELOW_HORIZON, asked))  # the coordinator's horizon
    checkpoint = await _checkpoint_of(conn, user_id, slices)
    own = await conn.fetchrow(_OWN_AND_MARK, user_id)
    own_tx, own_position = (None, None) if own is None else (own[0], own[1])
    if checkpoint is None or (
        own is not None and (own[2] is None or Checkpoint(int(own[2]), own[3]) < Checkpoint(int(own[0]), own[1]))
    ):
        return (0, 0, own_tx, own_position, asked, below)  # the rows may not be visible on the worker yet
    return (checkpoint[0], checkpoint[1], own_tx, own_position, asked, below)


# Readers of this process waiting for the read tables (`wait_until_readable`), woken when this
# process's projection worker commits a batch (`projection_moved`): the worker running in the API
# process, as `chatlog serve` runs it, then answers a reader within its commit, not at the next
# step of the reader's back-off. A batch committed by another process still reaches the reader at
# that next step.
_readers: set[asyncio.Future[None]] = set()


def projection_moved() -> None:
    """Wake the readers that wait for the read tables on the running event loop (the worker's,
    which in the API process is the requests' too): a batch has committed. Each reader takes
    itself out of `_readers` when its pause ends."""
    loop = asyncio.get_running_loop()
    for waiter in _readers:
        if waiter.get_loop() is loop and not waiter.done():
            waiter.set_result(None)


async def _pause(delay: float) -> None:
    """Sleep `delay`, or less if this process's projection worker commits a batch meanwhile."""
    waiter = asyncio.get_running_loop().create_future()
    _readers.add(waiter)
    try:
        await asyncio.wait((waiter,), timeout=delay)
    finally:
        _readers.discard(waiter)
        waiter.cancel()


async def wait_until_readable(
    pool: Any, user_id: str, min_position: int | None, wait_seconds: float, replica: Any = None, slices: int = 1
) -> None:
    """Return once the read tables include the caller's own newest event and, with `min_position`,
    the event at that position and every event before it in log order (API.md: a user always
    reads their own writes); those of `replica` (a physical standby of `pool`'s database) if
    given, else those of `pool`'s.

    Raises NotReady after `wait_seconds`, also for a `min_position` that does not exist (yet).
    """
    deadline = time.monotonic() + wait_seconds
    delay = 0.001
    targets: Sequence[Any] | None = None
    while True:
        row: Sequence[Any] | None
        if replica is None:
            async with pool.acquire() as conn:
                if await is_distributed(conn):
                    row = await _readable_distributed(conn, user_id, min_position, slices)
                elif slices == 1:
                    row = await conn.fetchrow(_READABLE, user_id, min_position)
                else:
                    row = await conn.fetchrow(_READABLE_SLICED, user_id, min_position, slices)
        else:
            if targets is None or (min_position is not None and not targets[5]):
                async with pool.acquire() as conn:
                    targets = await conn.fetchrow(_PRIMARY_TARGETS, user_id, min_position)
            async with replica.acquire() as conn:
                checkpoint = await _checkpoint_of(conn, user_id, slices)
            row = None if checkpoint is None or targets is None else (*checkpoint, *targets[2:])
        if row is not None and _includes(row, min_position, sliced=slices > 1):
            return
        if time.monotonic() + delay > deadline:
            if min_position is None:
                raise NotReady("the read models have not caught up with your newest write yet; retry shortly")
            raise NotReady(f"the read models have not reached position {min_position} yet; retry shortly")
        await _pause(delay)
        delay = min(delay * 2, 0.05)


def _includes(row: Sequence[Any], min_position: int | None, *, sliced: bool = False) -> bool:
    """Whether the checkpoint in `row` (of `_READABLE`, or `_READABLE_SLICED`) has passed both targets."""
    checkpoint = Checkpoint(int(row[0]), row[1])
    if row[2] is not None and checkpoint < Checkpoint(int(row[2]), row[3]):
        return False
    if min_position is None:
        return True
    if sliced:
        return bool(row[5])
    return row[4] is not None and checkpoint >= Checkpoint(int(row[4]), min_position)


async def get_conversation(conn: asyncpg.Connection, user_id: str, conversation_id: uuid.UUID) -> shapes.Conversation:
    row = await conn.fetchrow(
        f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND user_id = $2", conversation_id, user_id
    )
    if row is None:
        raise NotFound(str(conversation_id))
    return _conversation(row)


async def list_conversations(
    conn: asyncpg.Connection, user_id: str, limit: int, descending: bool, after: list[Any] | None
) -> tuple[list[shapes.Conversation], list[Any] | None]:
    """A page by updated_at (then id, the index's way), and the keyset after its last item if more follow."""
    if descending:
        order, cmp = "updated_at DESC, id ASC", "(updated_at < $2 OR (updated_at = $2 AND id > $3))"
    else:
        order, cmp = "updated_at ASC, id DESC", "(updated_at > $2 OR (updated_at = $2 AND id < $3))"
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 ORDER BY {order} LIMIT $2",
            user_id,
            limit + 1,
        )
    else:
        updated_at, last_id = _conversation_keyset(after)
        rows = await conn.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 AND {cmp} ORDER BY {order} LIMIT $4",
            user_id,
            updated_at,
            last_id,
            limit + 1,
        )
    page = [_conversation(r) for r in rows[:limit]]
    more = len(rows) > limit
    return page, ([micros(rows[limit - 1][4]), str(rows[limit - 1][0])] if more else None)


def _conversation_keyset(after: list[Any]) -> tuple[datetime, uuid.UUID]:
    try:
        value, last_id = after
        return from_micros(int(value)), uuid.UUID(str(last_id))
    except (ValueError, TypeError, OverflowError):
        raise BadRequest("the cursor is not valid", field="cursor") from None


async def list_messages(
    conn: asyncpg.Connection,
    user_id: str,
    conversation_id: uuid.UUID,
    limit: int,
    descending: bool,
    after: list[Any] | None,
) -> tuple[list[shapes.Message], list[Any] | None]:
    last_seq = _int_keyset(after) if after is not None else (2_147_483_647 if descending else 0)
    # The conversation (404 unless it is the user's, and live) and the page in one round trip: no
    # row, no conversation; one row of nulls, no message on this page.
    rows = await conn.fetch(
        _MESSAGES_DESC if descending else _MESSAGES_ASC, conversation_id, user_id, last_seq, limit + 1
    )
    if not rows:
        raise NotFound(str(conversation_id))
    if rows[0][0] is None:
        rows = []
    page = [message_from_row(r) for r in rows[:limit]]
    return page, ([rows[limit - 1][2]] if len(rows) > limit else None)


_MESSAGES = f"""
SELECT m.* FROM conversations AS c
LEFT JOIN LATERAL (
    SELECT {_MESSAGE_COLUMNS} FROM messages
    WHERE user_id = c.user_id AND conversation_id = c.id AND {{cmp}} ORDER BY {{order}} LIMIT $4
) AS m ON true
WHERE c.id = $1 AND c.user_id = $2
"""
_MESSAGES_ASC: Final = _MESSAGES.format(cmp="seq > $3", order="seq ASC")
_MESSAGES_DESC: Final = _MESSAGES.format(cmp="seq < $3", order="seq DESC")


async def list_branch(
    conn: asyncpg.Connection,
    user_id: str,
    conversation_id: uuid.UUID,
    limit: int,
    descending: bool,
    leaf_id: uuid.UUID | None,
    after: list[Any] | None,
) -> tuple[list[shapes.Message], list[Any] | None]:
    """A page of the branch that ends at `leaf_id` (default: the active leaf), in path order from
    the first message (or back from the leaf), and the keyset after its last item if more follow.

    The keyset holds the leaf and a depth, so a walk stays on the branch it started on while
    messages arrive or the active branch moves. One statement: the conversation (no row: 404),
    the leaf, the runs of the branch that the page touches (walked up from the leaf: one step per
    fork on the way, not per message) and the page, from `messages_run_depth`."""
    leaf_id, depth = _branch_keyset(leaf_id, after)
    rows = await conn.fetch(
        _BRANCH_DESC if descending else _BRANCH_ASC, conversation_id, user_id, leaf_id, depth, limit + 1
    )
    return _branch_page(rows, conversation_id, limit, leaf_id, after)


async def list_branch_if_readable(
    conn: asyncpg.Connection,
    user_id: str,
    conversation_id: uuid.UUID,
    limit: int,
    descending: bool,
    leaf_id: uuid.UUID | None,
    after: list[Any] | None,
    min_position: int | None,
) -> tuple[list[shapes.Message], list[Any] | None] | None:
    """`list_branch`'s answer with `_READABLE`'s check in the same statement: one round trip
    instead of two for the history page, the read a chat app makes most. None when the read
    tables do not hold the caller's newest event (or `min_position`) yet: the caller then waits
    (`wait_until_readable`) and reads again. One statement reads one snapshot, and the projection
    moves its checkpoint in the transaction that writes the rows: where the checkpoint read has
    passed the caller's event, the rows read beside it hold it. For this database's own read
    tables only (no replica, one projection slice, not on Citus)."""
    leaf_id, depth = _branch_keyset(leaf_id, after)
    rows = await conn.fetch(
        _BRANCH_READABLE_DESC if descending else _BRANCH_READABLE_ASC,
        conversation_id, user_id, leaf_id, depth, limit + 1, min_position,
    )  # fmt: skip
    if rows[0][0] is None or not _includes(rows[0], min_position):  # no checkpoint yet, or behind
        return None
    return _branch_page(rows if rows[0][5] is not None else [], conversation_id, limit, leaf_id, after, first=5)


async def read_branch(
    pool: Any,
    replica: Any,
    user_id: str,
    conversation_id: uuid.UUID,
    limit: int,
    descending: bool,
    leaf_id: uuid.UUID | None,
    after: list[Any] | None,
    *,
    min_position: int | None,
    wait_seconds: float,
    slices: int = 1,
) -> tuple[list[shapes.Message], list[Any] | None]:
    """`list_branch` once the read tables hold the caller's own writes (and `min_position`), as
    every read does (`wait_until_readable`): where they are `pool`'s own (no `replica`, one slice,
    not Citus) first in one round trip (`list_branch_if_readable`), else, or while they are
    behind, after the wait."""
    if replica is None and slices == 1:
        async with pool.acquire() as conn:
            if not await is_distributed(conn):
                found = await list_branch_if_readable(
                    conn, user_id, conversation_id, limit, descending, leaf_id, after, min_position
                )
                if found is not None:
                    return found
    await wait_until_readable(pool, user_id, min_position, wait_seconds, replica, slices)
    async with (replica or pool).acquire() as conn:
        return await list_branch(conn, user_id, conversation_id, limit, descending, leaf_id, after)


def _branch_keyset(leaf_id: uuid.UUID | None, after: list[Any] | None) -> tuple[uuid.UUID | None, int | None]:
    """The leaf and the depth a branch's page starts after (a cursor's), checked against `leaf_id`."""
    if after is None:
        return leaf_id, None
    if len(after) != 2 or type(after[0]) is not str or type(after[1]) is not int:
        raise BadRequest("the cursor is not valid", field="cursor")
    try:
        pinned = uuid.UUID(after[0])
    except ValueError:
        raise BadRequest("the cursor is not valid", field="cursor") from None
    if leaf_id is not None and leaf_id != pinned:
        raise BadRequest("the cursor belongs to another branch", field="cursor")
    return pinned, after[1]


def _branch_page(
    rows: Sequence[Sequence[Any]],
    conversation_id: uuid.UUID,
    limit: int,
    leaf_id: uuid.UUID | None,
    after: list[Any] | None,
    *,
    first: int = 0,
) -> tuple[list[shapes.Message], list[Any] | None]:
    """The page from `_BRANCH`'s rows, from column `first` on: the conversation's id (no row, no
    such conversation), the leaf's, then the message's columns and its depth (none: no message)."""
    if not rows:
        raise NotFound(str(conversation_id))
    leaf = rows[0][first + 1]
    if leaf is None:  # the conversation has no such leaf (or no message at all)
        if leaf_id is not None and after is None:
            raise BadRequest("leaf_id is not a message of this conversation", field="leaf_id")
        return [], None
    if rows[-1][first + 2] is None:  # the leaf, and no message of it in the page's range
        return [], None
    page = [message_from_row(r, first=first + 2) for r in rows[:limit]]
    return page, ([str(leaf), rows[limit - 1][first + 2 + 9]] if len(rows) > limit else None)


# The branch's page: depths [a, b] of the path from a first message to the leaf. `seg` walks up
# from the leaf, one run at a time, until the run that holds depth a.
_BRANCH = f"""
WITH RECURSIVE conv AS (
    SELECT c.id, coalesce($3::uuid, c.active_leaf_id) AS leaf FROM conversations AS c
    WHERE c.id = $1 AND c.user_id = $2
), tip AS (
    SELECT m.id, m.run, m.depth FROM conv
    JOIN messages AS m ON m.user_id = $2 AND m.id = conv.leaf AND m.conversation_id = conv.id
), bounds AS (
    SELECT {{a}} AS a, {{b}} AS b FROM tip
), seg(run, lo, hi, up) AS (
    SELECT tip.run, r.depth, tip.depth, r.parent_id FROM tip JOIN messages AS r ON r.user_id = $2 AND r.id = tip.run
    UNION ALL
    SELECT p.run, r.depth, p.depth, r.parent_id
    FROM seg JOIN bounds ON seg.lo > bounds.a
    JOIN messages AS p ON p.user_id = $2 AND p.id = seg.up
    JOIN messages AS r ON r.user_id = $2 AND r.id = p.run
)
SELECT conv.id, tip.id, page.* FROM conv
LEFT JOIN tip ON true
LEFT JOIN LATERAL (
    SELECT x.* FROM seg CROSS JOIN bounds
    CROSS JOIN LATERAL (  -- one range scan of messages_run_depth per run (the LIMIT keeps it one)
        SELECT {_MESSAGE_COLUMNS}, depth FROM messages
        WHERE user_id = $2 AND run = seg.run AND depth BETWEEN greatest(seg.lo, bounds.a) AND least(seg.hi, bounds.b)
        ORDER BY depth LIMIT $5
    ) AS x
    ORDER BY x.depth {{order}}
) AS page ON true
"""
_BRANCH_ASC: Final = _BRANCH.format(
    a="coalesce($4::integer, 0) + 1", b="coalesce($4::integer, 0) + $5::integer", order="ASC"
)
_BRANCH_DESC: Final = _BRANCH.format(
    a="coalesce($4::integer, tip.depth + 1) - $5::integer", b="coalesce($4::integer, tip.depth + 1) - 1", order="DESC"
)

# `_BRANCH` after `_READABLE`'s five columns, in one statement ($6: min_position): the conversation
# is then joined to the one row of the checkpoint, so that its absence still reads as a row.
_READABLE_FIRST: Final = f"""
WITH RECURSIVE readable AS (
    SELECT c.tx_id, c.position, own.tx_id AS own_tx_id, own.position AS own_position, asked.tx_id AS asked_tx_id
    FROM (VALUES (1)) AS one
    LEFT JOIN projection_checkpoints AS c ON c.name = 'conversations'
    {_TARGETS.replace("$2", "$6").replace("$1", "$2")}
), """
_BRANCH_READABLE_ASC, _BRANCH_READABLE_DESC = (
    q.replace("WITH RECURSIVE ", _READABLE_FIRST, 1).replace(
        "SELECT conv.id, tip.id, page.* FROM conv\n",
        "SELECT readable.*, conv.id, tip.id, page.* FROM readable\nLEFT JOIN conv ON true\n",
        1,
    )
    for q in (_BRANCH_ASC, _BRANCH_DESC)
)
assert all("FROM readable" in q and "$6" in q for q in (_BRANCH_READABLE_ASC, _BRANCH_READABLE_DESC))


def _int_keyset(after: list[Any]) -> int:
    if len(after) != 1 or type(after[0]) is not int:
        raise BadRequest("the cursor is not valid", field="cursor")
    return int(after[0])


async def checkpoint_after(conn: asyncpg.Connection, user_id: str, position: int) -> Checkpoint:
    """The feed's place for `after=position`: just after the user's own event at that position,
    or, for any other position, after the user's last event (in commit order) of those at or
    before it; the start of the log if there is none, as for 0. So the answer depends on the
    user's own events alone: a position of another user's event, one never used, and one beyond
    the log's end are alike. Both lookups are bounded by the user's own events (the primary key,
    then the (user_id, tx_id, position) index backwards), never a walk through other users'."""
    row = await conn.fetchrow(_CHECKPOINT_AFTER, position, user_id)
    return Checkpoint() if row is None else Checkpoint(int(row[0]), row[1])


_CHECKPOINT_AFTER = """
SELECT tx_id, position FROM events WHERE position = $1 AND user_id = $2
UNION ALL
(SELECT tx_id, position FROM events WHERE user_id = $2 AND position <= $1 ORDER BY tx_id DESC, position DESC LIMIT 1)
LIMIT 1
"""


async def list_events(
    conn: asyncpg.Connection, keyring: Keyring, user_id: str, after: Checkpoint, limit: int
) -> tuple[list[shapes.LogEvent], Checkpoint | None]:
    events = await read_user(conn, keyring, user_id, after, limit + 1)
    page = [_log_event(e) for e in events[:limit]]
    return page, (events[limit - 1].checkpoint if len(events) > limit else None)


def _log_event(e: RecordedEvent) -> shapes.LogEvent:
    """An event of the feed; an erased one keeps its place, as structure only."""
    data = None
    if e.event is not None:
        data = msgspec.to_builtins(e.event)
        data.pop("type", None)
    return shapes.LogEvent(
        position=e.position,
        event_id=e.event_id,
        type=e.type,
        conversation_id=e.stream_id,
        version=e.stream_version,
        data=data,
        metadata=e.metadata,
        recorded_at=shapes.timestamp(e.recorded_at),
        erased=True if e.erased else msgspec.UNSET,
    )
