"""The connection pool of the hot paths: bounded, reuses what is sound, drops what is not."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from service.connections import ConnectionPool, connect_args


async def backend(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def assert_slots(pool: ConnectionPool, size: int) -> None:
    """Exactly `size` checkouts can be held at once: no slot was lost, none was made up."""
    held = [pool.acquire() for _ in range(size)]
    async with asyncio.timeout(5):
        for checkout in held:
            await checkout.__aenter__()
    extra = asyncio.create_task(_hold(pool, 0))
    await asyncio.sleep(0.1)
    assert not extra.done(), "one checkout more than the pool's size"
    for checkout in held:
        await checkout.__aexit__(None, None, None)
    async with asyncio.timeout(5):
        assert await extra == 1


async def test_it_never_checks_out_more_than_its_size_and_reuses_connections(db_url: str) -> None:
    pool = ConnectionPool(db_url, size=2)
    out, most, pids = 0, 0, set()

    async def work() -> None:
        nonlocal out, most
        async with pool.acquire() as conn:
            out += 1
            most = max(most, out)
            pids.add(await backend(conn))
            await asyncio.sleep(0.01)
            out -= 1

    try:
        await asyncio.gather(*(work() for _ in range(20)))
        await assert_slots(pool, 2)
    finally:
        await pool.close()
    assert most == 2 and len(pids) == 2


async def test_a_cancelled_waiter_gives_back_nothing_it_did_not_take(db_url: str) -> None:
    pool = ConnectionPool(db_url, size=1)
    try:
        async with pool.acquire():
            waiter = asyncio.create_task(_hold(pool, 0))
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        await assert_slots(pool, 1)
    finally:
        await pool.close()


async def test_a_slot_handed_to_a_cancelled_waiter_passes_to_the_next(db_url: str) -> None:
    pool = ConnectionPool(db_url, size=1)
    try:
        first = pool.acquire()
        await first.__aenter__()
        cancelled = asyncio.create_task(_hold(pool, 0))
        served = asyncio.create_task(_hold(pool, 0))
        await asyncio.sleep(0.05)
        await first.__aexit__(None, None, None)  # hands the slot to `cancelled` ...
        cancelled.cancel()  # ... which is cancelled before it runs again
        async with asyncio.timeout(5):
            assert await served == 1
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await assert_slots(pool, 1)
    finally:
        await pool.close()


async def _hold(pool: ConnectionPool, seconds: float) -> int:
    async with pool.acquire() as conn:
        await asyncio.sleep(seconds)
        return int(await conn.fetchval("SELECT 1"))


async def test_a_statement_error_keeps_the_connection_a_cancelled_statement_drops_it(db_url: str) -> None:
    pool = ConnectionPool(db_url, size=1)
    try:
        async with pool.acquire() as conn:
            pid = await backend(conn)
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1 / 0")
        async with pool.acquire() as conn:
            assert await backend(conn) == pid  # the server's refusal leaves the connection sound

        async def slow() -> None:
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5), pool.acquire() as conn:
            assert await backend(conn) != pid  # a new connection, not the one cut mid-statement
    finally:
        await pool.close()


async def test_a_connection_left_in_a_transaction_is_not_reused(db_url: str) -> None:
    pool = ConnectionPool(db_url, size=1)
    try:
        async with pool.acquire() as conn:
            pid = await backend(conn)
            await conn.execute("BEGIN")
        async with pool.acquire() as conn:
            assert await backend(conn) != pid and not conn.is_in_transaction()
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("url", "hosts", "ports"),
    [
        ("postgresql://u:pw@a:5001,b:5002/chat?target_session_attrs=read-write", ["a", "b"], [5001, 5002]),
        ("postgresql://u@a,b/chat", ["a", "b"], [5432, 5432]),
        ("postgresql://u@/chat?host=a:5001&host=b:5002", ["a", "b"], [5001, 5002]),
    ],
)
def test_several_hosts_for_failover_are_read_in_libpq_and_asyncpg_forms(
    url: str, hosts: list[str], ports: list[int]
) -> None:
    args = connect_args(url)
    assert (args["host"], args["port"], args["database"]) == (hosts, ports, "chat")
