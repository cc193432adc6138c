"""What a projection is: a name, the read tables it owns, and a fold of a batch of events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import asyncpg

from service.eventstore import RecordedEvent


class ProjectionError(Exception):
    """An event the projection cannot apply. The worker stops that projection on it."""

    def __init__(self, position: int | None, message: str) -> None:
        super().__init__(message if position is None else f"event at position {position}: {message}")
        self.position = position


class Projection(Protocol):
    """A fold of events into read tables.

    `tables` are the live table names, parents first, each with a primary key (verify pairs
    rows by it). `apply` folds a batch (in log order) into the tables named by `names` (live
    name -> the table to write: the live one, or a replay's shadow), inside the caller's
    transaction. It must be a function of the events and the tables alone, so that a replay
    into empty tables gives what incremental batches gave, and a user's rows must follow from
    that user's events alone: a replay folds the events of different users on different
    connections, each user's in log order.
    """

    name: str
    tables: tuple[str, ...]

    async def apply(
        self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], names: Mapping[str, str]
    ) -> None: ...

    async def erase(self, conn: asyncpg.Connection, names: Mapping[str, str]) -> None:
        """Remove the rows of every conversation in the erasure ledger. An erasure removes them from
        the live tables in its own transaction, before the projection reaches its events; replay
        and verify call this on their fresh fold, so that it agrees with the live tables."""
        ...
