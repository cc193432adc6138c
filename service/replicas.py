"""A read replica (README, "Read replicas"): a physical standby that serves the read routes, and
how far its replay is behind the primary.

Lag is measured in WAL: the primary's current position against the standby's replayed one. The
age of the standby's last replayed commit says nothing while the primary is idle (it grows with
no lag at all), so it counts as the lag in seconds only while some WAL is still to replay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import asyncpg
import msgspec

from service.connections import ConnectionPool

log = logging.getLogger(__name__)

# An unreachable standby must not hold /readyz or /metrics for asyncpg's 60 s connect timeout.
CHECK_TIMEOUT: Final = 5.0


class ReplicaStatus(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ok", or "unavailable" (it cannot be reached: the reads answer 503)
    # WAL written on the primary that the standby has not replayed yet (null: the primary's
    # position is unknown); 0 for a server that is not in recovery.
    lag_bytes: int | None = None
    # The age of the standby's last replayed commit while WAL is still to replay, else 0.
    # (null: unknown, as when it has replayed no commit since it started)
    lag_seconds: float | None = None


_PRIMARY_LSN: Final = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text"
)
_REPLICA_LAG: Final = """
SELECT CASE WHEN pg_is_in_recovery()
            THEN pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) ELSE 0 END::bigint,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
"""


async def primary_lsn(conn: asyncpg.Connection) -> str | None:
    """The primary's current WAL position (as text), to measure a replica against."""
    lsn: str | None = await conn.fetchval(_PRIMARY_LSN)
    return lsn


async def replica_status(replica: ConnectionPool, primary_lsn: str | None) -> ReplicaStatus:
    """How far `replica` is behind `primary_lsn`; "unavailable" if it cannot be asked in time."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT), replica.acquire() as conn:
            row = await conn.fetchrow(_REPLICA_LAG, primary_lsn)
    except Exception as exc:  # down, refused, timed out: the same to a reader
        log.warning("the read replica cannot be reached: %s: %s", type(exc).__name__, exc)
        return ReplicaStatus(status="unavailable")
    assert row is not None
    if row[0] is None:
        return ReplicaStatus(status="ok")
    lag_bytes = max(0, int(row[0]))
    lag_seconds = 0.0 if lag_bytes == 0 else None if row[1] is None else max(0.0, round(row[1], 3))
    return ReplicaStatus(status="ok", lag_bytes=lag_bytes, lag_seconds=lag_seconds)
