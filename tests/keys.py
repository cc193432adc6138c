"""The master key of the test suite: the test process and every `chatlog` it starts share it, so
that what one seals the other opens."""

from collections import Counter

import asyncpg

from service.events import MessageAppended
from service.eventstore import Checkpoint, RecordedEvent, read_all
from service.sealing import Keyring, parse_master_keys

MASTER_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
KEYRING = Keyring(parse_master_keys(MASTER_KEY), source="the test suite's master key")


async def opened_events(dsn: str) -> list[RecordedEvent]:
    """Every event of the log, opened with the test suite's key (erased ones as structure)."""
    conn = await asyncpg.connect(dsn)
    try:
        found: list[RecordedEvent] = []
        while page := await read_all(conn, KEYRING, found[-1].checkpoint if found else Checkpoint(), 5000):
            found.extend(page)
        return found
    finally:
        await conn.close()


async def message_contents(dsn: str) -> Counter[str]:
    """How often each message content stands in the log (opened)."""
    return Counter(e.event.content for e in await opened_events(dsn) if isinstance(e.event, MessageAppended))
