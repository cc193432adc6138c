"""Projection slices: a projection split by a hash of `user_id`, each part with its own checkpoint.

With `CHATLOG_PROJECTION_SLICES=N`, slice k of N owns the users whose `hashtext(user_id)` (the
int4 hash PostgreSQL gives `text`, which Citus also uses to place a text distribution column)
lies in the k-th of N equal ranges of the int32 space:

    lo_k = -2^31 + floor(k * 2^32 / N),   hi_k = -2^31 + floor((k+1) * 2^32 / N) - 1

With N a power of two and a Citus shard count that N divides (Citus's default, 32, for N up to
32), every slice is a whole number of shards. A user's rows follow from the user's events alone
(projections/base.py), so the slices are independent folds: each has its own checkpoint row and
advisory lock, and any process may run any of them.

N = 1 is the projection as it always was: one row named after the projection, its old lock
key, and reads without a hash predicate. N > 1 names its rows `<name>#k/N`.

**The layout** (which N the checkpoint rows are for) is changed by the first worker process that
starts with another N (`adopt_layout`): under a lock that serialises such changes, and holding
every checkpoint row of the projection, it starts each new slice at the *smallest* checkpoint of
the old ones, so that no slice skips an event, and retires the old rows. Events between that
point and a slice's old checkpoint are then folded a second time: projections skip an event
their rows already reflect (conversations: by the stream version), so that changes nothing. A
retired row carries `RETIRED` as its error: a worker of the old layout (of this version or of
one before slices) stops at its next batch instead of writing beside the new layout.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import msgspec

from service.settings import SettingsError

MAX_SLICES: Final = 64
RETIRED: Final = "retired: the projection's slice layout changed"

_SPAN: Final = 1 << 32
_LOWEST: Final = -(1 << 31)


class Slice(msgspec.Struct, frozen=True):
    """Slice `k` of `n` of the users (k in 0..n-1)."""

    k: int = 0
    n: int = 1

    @property
    def whole(self) -> bool:
        return self.n == 1

    @property
    def bounds(self) -> tuple[int, int]:
        """The inclusive range of `hashtext(user_id)` this slice owns."""
        return _LOWEST + self.k * _SPAN // self.n, _LOWEST + (self.k + 1) * _SPAN // self.n - 1

    def row(self, projection: str) -> str:
        """The name of this slice's checkpoint row (and of its advisory lock)."""
        return projection if self.whole else f"{projection}#{self.k}/{self.n}"

    def __str__(self) -> str:
        return "whole" if self.whole else f"slice {self.k} of {self.n}"


WHOLE: Final = Slice()  # the projection unsliced (N = 1)


def layout(n: int) -> list[Slice]:
    return [Slice(k, n) for k in range(n)]


def slice_sql(user_id_sql: str, n_sql: str) -> str:
    """SQL for the index k of the slice of `user_id_sql` among `n_sql` (the inverse of `bounds`:
    the largest k with lo_k <= hashtext, i.e. floor(((h + 2^31 + 1) * N - 1) / 2^32))."""
    return f"((((hashtext({user_id_sql})::bigint + 2147483649) * ({n_sql})::bigint) - 1) >> 32)"


def rows_of(projection: str, n: int) -> list[str]:
    return [s.row(projection) for s in layout(n)]


async def adopt_layout(conn: asyncpg.Connection, projection: str, n: int, lock_key: int) -> bool:
    """Make N = `n` the projection's current layout (see the module docstring); whether it changed.

    A fresh database gets rows at the log's start. `lock_key` is the advisory lock that
    serialises layout changes (the worker's `lock_key` of `<name>:layout`).
    """
    wanted = rows_of(projection, n)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        rows = await conn.fetch(
            "SELECT name, tx_id, position, error FROM projection_checkpoints "
            "WHERE name = $1 OR name LIKE $1 || '#%' ORDER BY name FOR UPDATE",
            projection,
        )
        current = [r for r in rows if r["error"] != RETIRED]
        if sorted(r["name"] for r in current) == sorted(wanted):
            return False
        start = min(((int(r["tx_id"]), r["position"]) for r in current), default=(0, 0))
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, tx_id, position) "
            "SELECT unnest($1::text[]), $2::xid8, $3 "
            "ON CONFLICT (name) DO UPDATE SET tx_id = excluded.tx_id, position = excluded.position, "
            "error = NULL, failed_position = NULL, updated_at = now()",
            wanted,
            *start,
        )
        await conn.execute(
            "UPDATE projection_checkpoints SET error = $2, failed_position = NULL, updated_at = now() "
            "WHERE name = ANY($1::text[])",
            [r["name"] for r in current if r["name"] not in wanted],
            RETIRED,
        )
        return bool(current)


async def current_layout(conn: asyncpg.Connection, projection: str) -> int | None:
    """The N of the projection's current checkpoint rows (None before any worker ran)."""
    names = await conn.fetch(
        "SELECT name FROM projection_checkpoints WHERE (name = $1 OR name LIKE $1 || '#%') "
        "AND error IS DISTINCT FROM $2",
        projection,
        RETIRED,
    )
    if not names:
        return None
    name: str = names[0][0]
    return 1 if name == projection else int(name.rsplit("/", 1)[1])


class LayoutMismatch(SettingsError):
    """The projection runs as another number of slices than this process was started with."""
