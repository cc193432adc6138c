"""The log's clock (migration 0006): keep the log's transaction ids rising across servers.

After a logical restore or a move by logical replication, the log's newest `tx_id` can stand at
or above the new server's current transaction id. `settle` then raises the shift under an
exclusive lock on `events`, in one transaction: the column's default, `chatlog_xact_id()` and
`chatlog_horizon()` all add the new shift, so every new event sorts after every restored one and
the restored ones fall below the horizon at once. Checkpoints, cursors and positions taken before
the move keep their meaning: nothing stored changes. It is safe to run twice and from several
processes at once (the second finds nothing to do), and costs one index lookup when nothing moved.
"""

from __future__ import annotations

import logging
from decimal import Decimal

import asyncpg

log = logging.getLogger(__name__)

_NEEDED = (
    "SELECT (SELECT max(tx_id) FROM events)::text::numeric, chatlog_xact_id()::text::numeric,"
    " (SELECT shift FROM log_clock)"
)


async def settle(conn: asyncpg.Connection) -> Decimal | None:
    """Raise the clock's shift if the log's ids started over; the new shift, or None."""
    newest, now, seen = await conn.fetchrow(_NEEDED)
    if newest is None or newest < now:
        return None
    async with conn.transaction():
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        newest, now, shifted = await conn.fetchrow(_NEEDED)
        # Another process settled it while this one waited. Its shift is read, not inferred from
        # `now`: an exclusive lock is logged for standbys, so this transaction took its id when it
        # asked for the lock, and an id older than the other process's can still stand at `newest`.
        if shifted != seen or newest < now:
            return None
        # From the oldest transaction still running, not this one: one that took its id before
        # this one (and inserts after the lock is gone) must still sort after the restored events.
        server = Decimal(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
        shift: Decimal = newest - server + 1
        ids = f"(pg_current_xact_id()::text::numeric + {shift})::text::xid8"
        horizon = f"(pg_snapshot_xmin(pg_current_snapshot())::text::numeric + {shift})::text::xid8"
        await conn.execute(f"ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT {ids}")
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION chatlog_xact_id() RETURNS xid8 LANGUAGE sql VOLATILE AS $$ SELECT {ids} $$"
        )
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION chatlog_horizon() RETURNS xid8 LANGUAGE sql STABLE AS $$ SELECT {horizon} $$"
        )
        await conn.execute("UPDATE log_clock SET shift = $1, changed_at = now()", shift)
    log.warning(
        "the log's transaction ids started over (a restore or a move to another server): its newest id %s "
        "is at or above this server's %s; new events now take ids above %s",
        newest, server, newest,
    )  # fmt: skip
    return shift
