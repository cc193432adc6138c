"""A lean pool of asyncpg connections for the event log's hot paths.

Appends, catch-up reads and replays run fixed statements on the driver directly. Measured on
the 2-core reference machine at 32 concurrent appends, a checkout from SQLAlchemy's pool cost
about 50 us of CPU and one from asyncpg's pool about 20 us (90 us with its default reset query),
next to about 30 us for the append statement itself; this pool costs a few microseconds. It
hands out idle connections last-in first-out, opens new ones up to `size`, and drops any
connection that comes back closed, inside a transaction, or after an error that was not the
server's answer to a statement (a cancellation mid-query, a broken socket).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from service.citus import is_distributed
from service.settings import database_url

# Errors that say the database cannot be had right now, not that a statement is wrong: a broken
# or refused connection (class 08, OSError), a server shutting down, starting up or crashed, or
# an operator's cancel (class 57), no resources (class 53), a read-only standby answering for a
# primary (25006: a failover under way). Whoever meets one retries later; nothing about the
# data is learnt from it, and the pool drops the connection it came from.
DATABASE_UNAVAILABLE: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # An idle pooled connection that the server closed under it (a shutdown's FATAL 57P01 that
    # arrived while nobody was reading) fails its next use with this, before the socket closes.
    asyncpg.exceptions.InternalClientError,
)


def connect_args(url: str) -> dict[str, Any]:
    """asyncpg.connect keywords for a database URL (read as the settings read it, then parsed by
    SQLAlchemy's asyncpg dialect)."""
    engine = create_async_engine(database_url(url))
    try:
        args, kwargs = engine.sync_engine.dialect.create_connect_args(engine.url)
    finally:
        engine.sync_engine.dispose()
    assert not args
    return dict(kwargs)


class ConnectionPool:
    @classmethod
    def for_appends(cls, url: str, *, size: int) -> ConnectionPool:
        """Connections for the event store: its append statement (several data-modifying CTEs,
        arrays of unknown length) costs PostgreSQL's planner about 0.2 ms a time under the
        default custom plans, more than the insert itself, and its generic plan is as good for
        every call (measured: 0.36 against 0.58 ms a statement). Reads keep the default."""
        return cls(url, size=size, plan_cache_mode="force_generic_plan")

    def __init__(self, url: str, *, size: int = 20, **server_settings: str) -> None:
        self._connect_args = connect_args(url)
        self._server_settings = {
            "application_name": "chatlog",
            # Never hold the server's horizon (and every projection) back by idling in a transaction.
            "idle_in_transaction_session_timeout": "60s",
            **server_settings,
        }
        self._free = size  # connections that may still be checked out
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[asyncpg.Connection] = []
        self._closed = False

    def acquire(self) -> _Checkout:
        """`async with pool.acquire() as conn:` a connection for the block's duration."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        return _Checkout(self)

    async def _take_slot(self) -> None:
        """Wait for a free slot. (asyncio.Semaphore, which this replaces, looked up the running
        loop, a getpid system call, on every acquire: a measurable share of an append.)"""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # a releasing checkout hands its slot over
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over, but this task was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def _get(self) -> asyncpg.Connection:
        await self._take_slot()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
            conn = await asyncpg.connect(**self._connect_args, server_settings=self._server_settings)
            try:
                await is_distributed(conn)  # on Citus, sets what distributed plans need (service/citus.py)
            except BaseException:
                conn.terminate()
                raise
            return conn
        except BaseException:
            self._release_slot()
            raise

    def _put(self, conn: asyncpg.Connection, error: BaseException | None) -> None:
        if error is None or isinstance(error, Exception):
            # The server refused a statement, or the caller's own error: the connection is fine,
            # unless the socket or the protocol state broke, or the server is going away.
            reusable = not isinstance(error, DATABASE_UNAVAILABLE)
        else:
            reusable = False  # cancelled mid-statement: do not trust its state
        if reusable and not (conn.is_closed() or conn.is_in_transaction() or self._closed):
            self._idle.append(conn)
        else:
            conn.terminate()
        self._release_slot()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)


class _Checkout:
    """One connection's checkout: a class rather than a generator-based context manager, which
    cost several microseconds per append at 32 concurrent appends."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._conn = await self._pool._get()
        return self._conn

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._put(conn, exc)
