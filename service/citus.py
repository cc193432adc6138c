"""chatlog on a Citus cluster (DESIGN.md, "Growing past one machine").

`chatlog migrate` on a database with the `citus` extension distributes the log and every
per-user table by `user_id`, colocated, once the schema is at head (`distribute`); on plain
PostgreSQL nothing changes. Unique keys gain `user_id` (Citus needs the distribution column in
them) and keep their names, so that `ON CONFLICT ON CONSTRAINT` and the store's reading of a
unique violation work on both. A stream id stays unique across users through `stream_owners`,
distributed by the stream id: a new stream is claimed there, in a transaction of its own, before
its first events go in.

The traps of `../shared/citus/README.md`, and what answers each:
- the snapshot must be the coordinator's: the gap-safe reads take `chatlog_horizon()` in a
  `MATERIALIZED` CTE, which Citus evaluates on the coordinator;
- a transaction that writes through several connections commits in two phases (a reader can
  pass its id before its rows are visible): every write transaction of the log stays on one
  shard (group commit batches per shard); the projection's batches, which span users, leave a
  mark per user in the same shard as that user's rows (`projection_marks`), and own-writes reads
  wait for it;
- NOTIFY from a trigger would run on a worker: the store sends it to the coordinator itself.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any, Final

import asyncpg

log = logging.getLogger(__name__)

_EVENTS_DISTRIBUTED: Final = "SELECT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = to_regclass('events'))"
_SETTINGS: Final = "SET plan_cache_mode = force_custom_plan; SET citus.override_table_visibility = off"
_KNOWN: weakref.WeakKeyDictionary[asyncpg.Connection, bool] = weakref.WeakKeyDictionary()

_HAS_CITUS: Final = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"  # then pg_dist_* exist


async def is_distributed(conn: asyncpg.Connection) -> bool:
    """Whether the log on this connection's database is distributed by Citus (asked once per connection)."""
    known = _KNOWN.get(conn)
    if known is None:
        known = bool(await conn.fetchval(_HAS_CITUS)) and bool(await conn.fetchval(_EVENTS_DISTRIBUTED))
        if known:
            # Citus plans a statement over distributed tables with its parameters' values; a
            # generic plan (the store's pool asks for them on one server) cannot be distributed.
            # And it hides shards from every scan of pg_class, which made asyncpg's lookup of a
            # new connection's types cost 0.4-0.6 s of the coordinator's CPU (15 ms without).
            if conn.is_in_transaction():
                await conn.execute(_SETTINGS.replace("SET ", "SET LOCAL "))
                return True  # asked again outside: the settings go with this transaction
            await conn.execute(_SETTINGS)
        _KNOWN[conn] = known
    return known


_SHARD_SUFFIX: Final = re.compile(r"_\d+$")
_VIOLATED: Final = re.compile(r'unique constraint "([^"]+)"')


def violated_constraint(exc: asyncpg.UniqueViolationError) -> str | None:
    """The unique constraint a statement violated, as the schema names it: Citus relays a shard's
    error without the constraint field, and a shard's name (`events_pkey_102008`) in its message."""
    name = exc.constraint_name
    if name is None:
        found = _VIOLATED.search(str(exc))
        name = found.group(1) if found else None
    return None if name is None else _SHARD_SUFFIX.sub("", name)


async def insert_values(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    rows: Sequence[Sequence[Any]],
    returning: str | None = None,
) -> list[asyncpg.Record]:
    """Insert `rows` with one multi-row `INSERT ... VALUES` per few thousand rows: on Citus an
    `INSERT ... SELECT` from arrays goes through the coordinator by COPY, which always commits in
    two phases; rows of one shard in VALUES are sent over one connection and commit in one."""
    width = len(columns)
    chunk = 60_000 // width  # PostgreSQL takes at most 65,535 parameters a statement
    found: list[asyncpg.Record] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        values = ", ".join(
            "(" + ", ".join(f"${i * width + j + 1}::{types[j]}" for j in range(width)) + ")" for i in range(len(part))
        )
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}"
        args = [value for row in part for value in row]
        if returning is None:
            await conn.execute(sql, *args)
        else:
            found.extend(await conn.fetch(f"{sql} RETURNING {returning}", *args))
    return found


# Keys that include the distribution column, under their single-server names.
_RESHAPE: Final = """
SET LOCAL citus.enable_unsafe_triggers = on;
ALTER TABLE conversations DROP CONSTRAINT conversations_pkey,
    ADD CONSTRAINT conversations_pkey PRIMARY KEY (user_id, id);
ALTER TABLE messages DROP CONSTRAINT messages_pkey, ADD CONSTRAINT messages_pkey PRIMARY KEY (user_id, id);
DROP INDEX messages_conversation_seq;
CREATE UNIQUE INDEX messages_conversation_seq ON messages (user_id, conversation_id, seq);
DROP INDEX messages_run_depth;
CREATE UNIQUE INDEX messages_run_depth ON messages (user_id, run, depth);
ALTER TABLE events DROP CONSTRAINT events_pkey, ADD CONSTRAINT events_pkey PRIMARY KEY (user_id, position);
ALTER TABLE events DROP CONSTRAINT events_event_id_key, ADD CONSTRAINT events_event_id_key UNIQUE (user_id, event_id);
ALTER TABLE events DROP CONSTRAINT events_stream_version_key,
    ADD CONSTRAINT events_stream_version_key UNIQUE (user_id, stream_id, stream_version);
CREATE INDEX events_position ON events (position);
ALTER TABLE data_keys DROP CONSTRAINT data_keys_pkey, ADD CONSTRAINT data_keys_pkey PRIMARY KEY (user_id, stream_id);
ALTER TABLE erasures DROP CONSTRAINT erasures_pkey, ADD CONSTRAINT erasures_pkey PRIMARY KEY (user_id, id);
CREATE TABLE stream_owners (stream_id uuid PRIMARY KEY, user_id text NOT NULL);
INSERT INTO stream_owners (stream_id, user_id) SELECT DISTINCT stream_id, user_id FROM events;
CREATE TABLE projection_marks (
    user_id  text   NOT NULL,
    name     text   NOT NULL,
    tx_id    xid8   NOT NULL,
    position bigint NOT NULL,
    CONSTRAINT projection_marks_pkey PRIMARY KEY (user_id, name)
);
-- Users moved in with their events: marked at the projection's oldest checkpoint (of any slice),
-- which has folded everything before it; later events mark them as they are folded.
INSERT INTO projection_marks (user_id, name, tx_id, position)
SELECT e.user_id, 'conversations', c.tx_id, c.position
FROM (SELECT DISTINCT user_id FROM events) AS e,
     (SELECT tx_id, position FROM projection_checkpoints
      WHERE name = 'conversations' OR name LIKE 'conversations#%' ORDER BY tx_id, position LIMIT 1) AS c;
"""

PER_USER_TABLES: Final = (
    "events",
    "data_keys",
    "idempotency_keys",
    "erasures",
    "conversations",
    "messages",
    "projection_marks",
)


async def distribute(conn: asyncpg.Connection) -> bool:
    """Distribute the schema (at head) by `user_id` if the database has Citus and it is not
    distributed yet; whether it did. The rows already there move into the shards (the way from
    one server to a cluster: restore a dump into the coordinator, then `chatlog migrate`). The
    shard count is Citus's `citus.shard_count` (32 unless the database or role sets another)."""
    if not await conn.fetchval(_HAS_CITUS) or await is_distributed(conn):
        return False
    if int(await conn.fetchval("SHOW citus.shard_replication_factor")) != 1:
        # A shard with two placements is written through two connections: two-phase commits.
        raise RuntimeError("chatlog needs citus.shard_replication_factor = 1 (use the nodes' own replication)")
    async with conn.transaction():
        await conn.execute(_RESHAPE)
    # create_distributed_table copies the local rows into the shards, and may not run inside a
    # transaction block that already wrote (it opens connections of its own to the workers).
    await conn.execute("SET citus.enable_unsafe_triggers = on")
    try:
        for table in PER_USER_TABLES:
            colocate = "none" if table == "events" else "events"
            await conn.execute("SELECT create_distributed_table($1, 'user_id', colocate_with => $2)", table, colocate)
        await conn.execute("SELECT create_distributed_table('stream_owners', 'stream_id', colocate_with => 'none')")
    finally:
        await conn.execute("RESET citus.enable_unsafe_triggers")
    _KNOWN[conn] = True
    shards = await conn.fetchval("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'events'::regclass")
    log.warning("distributed the log and the read tables by user_id over %d shards (Citus)", shards)
    return True
