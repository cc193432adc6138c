"""The event store: append to a stream, read a stream, read the log gap-safely.

An append is one SQL statement, so that in autocommit mode it is exactly one transaction and
one round trip: the statement reads the stream's head and any earlier use of the idempotency
key, then inserts the command's events only if the key is new, the stream belongs to the user
and the expected version (if any) holds. A lost race on `(stream_id, stream_version)` or on the
idempotency key is a unique violation; the append then runs again and sees the winner.

Reading the global log follows DESIGN.md: `(tx_id, position)` order, and only events of
transactions older than every transaction still running, so that an event committed late with
a smaller position is never passed over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.events import (
    SCHEMA_VERSIONS,
    DomainEvent,
    Event,
    EventValidationError,
    decode_event,
    encode_validated,
    event_type,
)
from service.ids import uuid7

log = logging.getLogger(__name__)

NOTIFY_CHANNEL: Final = "chatlog_events"
MAX_EVENTS_PER_APPEND: Final = 100
MAX_APPEND_ATTEMPTS: Final = 200
_IDEMPOTENCY_KEY_CHARS: Final = frozenset(chr(c) for c in range(0x20, 0x7F))


class NotFound(Exception):
    """The stream does not exist for this user (another user's stream answers the same)."""


class VersionConflict(Exception):
    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"expected version {expected}, stream is at version {current}")
        self.expected = expected
        self.current = current


class IdempotencyMismatch(Exception):
    """The idempotency key was used before for a different request."""


class Checkpoint(msgspec.Struct, frozen=True, order=True):
    """A place in the log's `(tx_id, position)` order; `Checkpoint()` is its start."""

    tx_id: int = 0
    position: int = 0


class Appended(msgspec.Struct, frozen=True, kw_only=True):
    positions: tuple[int, ...]
    versions: tuple[int, ...]
    replayed: bool = False

    @property
    def position(self) -> int:
        """The position of the last event appended."""
        return self.positions[-1]

    @property
    def version(self) -> int:
        return self.versions[-1]


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    event_id: uuid.UUID
    stream_id: uuid.UUID
    stream_version: int
    user_id: str
    event: DomainEvent
    metadata: dict[str, Any]
    recorded_at: datetime
    tx_id: int

    @property
    def type(self) -> str:
        return event_type(self.event)

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.position)


_APPEND = text(
    """
    WITH head AS (
        SELECT stream_version, user_id FROM events
        WHERE stream_id = :stream_id ORDER BY stream_version DESC LIMIT 1
    ), prior AS (
        SELECT tx_id, request_fingerprint FROM events
        WHERE user_id = :user_id AND idempotency_key = :key
    ), base AS (
        SELECT coalesce((SELECT stream_version FROM head), 0) AS version,
               (SELECT user_id FROM head) AS owner
    ), ins AS (
        INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, metadata,
                            idempotency_key, request_fingerprint)
        SELECT e.event_id, :stream_id, base.version + e.ord::int, :user_id, e.type,
               e.data::jsonb, e.metadata::jsonb,
               CASE WHEN e.ord = 1 THEN :key END, CASE WHEN e.ord = 1 THEN :fingerprint END
        FROM base, unnest(CAST(:event_ids AS uuid[]), CAST(:types AS text[]), CAST(:datas AS text[]),
                          CAST(:metadatas AS text[])) WITH ORDINALITY AS e(event_id, type, data, metadata, ord)
        WHERE NOT EXISTS (SELECT 1 FROM prior)
          AND (base.owner IS NULL OR base.owner = :user_id)
          AND (CAST(:expected AS integer) IS NULL OR base.version = CAST(:expected AS integer))
        RETURNING position, stream_version
    )
    SELECT (SELECT array_agg(position ORDER BY stream_version) FROM ins) AS positions,
           base.version, base.owner,
           (SELECT tx_id FROM prior) AS prior_tx,
           (SELECT request_fingerprint FROM prior) AS prior_fingerprint
    FROM base
    """
)

_COMMAND_EVENTS = text(
    "SELECT position, stream_version FROM events WHERE tx_id = :tx_id AND user_id = :user_id "
    "ORDER BY position"
)

_COLUMNS = "position, event_id, stream_id, stream_version, user_id, type, data, metadata, recorded_at, tx_id"

_READ_STREAM = text(
    f"SELECT {_COLUMNS} FROM events WHERE stream_id = :stream_id AND user_id = :user_id "
    "AND stream_version > :after ORDER BY stream_version"
)

_READ_ALL = text(
    f"""
    SELECT {_COLUMNS} FROM events
    WHERE (tx_id, position) > (CAST(:tx_id AS xid8), :position)
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY tx_id, position
    LIMIT :limit
    """
)

_READ_USER = text(
    f"""
    SELECT {_COLUMNS} FROM events
    WHERE user_id = :user_id
      AND (tx_id, position) > (CAST(:tx_id AS xid8), :position)
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY tx_id, position
    LIMIT :limit
    """
)


def validate_user_id(user_id: str) -> None:
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= 255:
        raise EventValidationError("user_id must be 1 to 255 characters")
    _require_clean("user_id", user_id)


def validate_idempotency_key(key: str) -> None:
    if not isinstance(key, str) or not 1 <= len(key) <= 255 or not set(key) <= _IDEMPOTENCY_KEY_CHARS:
        raise EventValidationError("an idempotency key is 1 to 255 printable ASCII characters")


def _require_clean(name: str, value: str) -> None:
    if "\x00" in value:
        raise EventValidationError(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EventValidationError(f"{name} contains a lone surrogate") from exc


def fingerprint_of(stream_id: uuid.UUID, expected_version: int | None, encoded: Sequence[bytes]) -> bytes:
    """A digest of what an append asks for, to recognise a reused idempotency key."""
    digest = hashlib.sha256(f"{stream_id}:{expected_version}".encode())
    for data in encoded:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


async def append(
    conn: AsyncConnection,
    user_id: str,
    stream_id: uuid.UUID,
    events: Sequence[Event],
    *,
    expected_version: int | None = None,
    idempotency_key: str | None = None,
    fingerprint: bytes | None = None,
    metadata: dict[str, Any] | None = None,
) -> Appended:
    """Append `events` to a stream of `user_id` as one transaction.

    `conn` is best in autocommit mode (see `EventStore`): each attempt is then its own
    transaction. Inside an explicit transaction each attempt runs in a savepoint.

    - `expected_version`: the stream's version the caller saw (0: the stream must not exist);
      a stale one raises `VersionConflict` and writes nothing. Without it the events go after
      the stream's current version, and a lost race is retried.
    - `idempotency_key`: a retry with the same key returns the first append's positions and
      appends nothing; the same key for a different request raises `IdempotencyMismatch`.
      `fingerprint` identifies the request (callers that generate ids pass a digest of the
      request itself); by default it is a digest of the events.
    - A stream that belongs to another user raises `NotFound` (or `VersionConflict` for
      `expected_version=0`: that stream id is taken).
    """
    validate_user_id(user_id)
    if not isinstance(stream_id, uuid.UUID):
        raise EventValidationError("stream_id must be a UUID")
    if not 1 <= len(events) <= MAX_EVENTS_PER_APPEND:
        raise EventValidationError(f"an append carries 1 to {MAX_EVENTS_PER_APPEND} events")
    if expected_version is not None and (type(expected_version) is not int or expected_version < 0):
        raise EventValidationError("expected_version must be an integer >= 0")
    if idempotency_key is not None:
        validate_idempotency_key(idempotency_key)
    encoded = [encode_validated(event) for event in events]
    types = [event_type(event) for event in events]
    common = dict(metadata or {})
    if idempotency_key is not None:
        common["idempotency_key"] = idempotency_key
        if fingerprint is None:
            fingerprint = fingerprint_of(stream_id, expected_version, encoded)
    else:
        fingerprint = None
    try:
        metadatas = [msgspec.json.encode({**common, "schema_version": SCHEMA_VERSIONS[t]}).decode() for t in types]
    except (UnicodeEncodeError, TypeError, msgspec.EncodeError) as exc:
        raise EventValidationError(f"metadata cannot be stored: {exc}") from exc
    _require_clean("metadata", "".join(metadatas))
    params = {
        "stream_id": stream_id,
        "user_id": user_id,
        "key": idempotency_key,
        "fingerprint": fingerprint,
        "expected": expected_version,
        "event_ids": [uuid7() for _ in events],
        "types": types,
        "datas": [data.decode() for data in encoded],
        "metadatas": metadatas,
    }
    autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    for attempt in range(MAX_APPEND_ATTEMPTS):
        try:
            if autocommit:
                row = (await conn.execute(_APPEND, params)).one()
            else:
                async with conn.begin_nested():
                    row = (await conn.execute(_APPEND, params)).one()
        except IntegrityError as exc:
            if _constraint(exc) not in ("events_stream_version_key", "events_user_idempotency_key"):
                raise
            # Lost a race: the winner has committed by now (the unique index waited for it).
            if attempt >= 3:
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 20)))
            continue
        positions, version, owner, prior_tx, prior_fingerprint = row
        if prior_tx is not None:
            if prior_fingerprint != fingerprint:
                raise IdempotencyMismatch(f"idempotency key {idempotency_key!r} was used for another request")
            rows = (await conn.execute(_COMMAND_EVENTS, {"tx_id": prior_tx, "user_id": user_id})).all()
            return Appended(
                positions=tuple(r[0] for r in rows), versions=tuple(r[1] for r in rows), replayed=True
            )
        if owner is not None and owner != user_id:
            if expected_version == 0:
                raise VersionConflict(0, version)
            raise NotFound(str(stream_id))
        if positions is None:
            assert expected_version is not None
            raise VersionConflict(expected_version, version)
        return Appended(positions=tuple(positions), versions=tuple(range(version + 1, version + 1 + len(events))))
    raise RuntimeError(f"append to stream {stream_id} lost {MAX_APPEND_ATTEMPTS} races in a row")


def _constraint(exc: DBAPIError) -> str | None:
    cause = exc.orig.__cause__ if exc.orig is not None else None
    name = getattr(cause, "constraint_name", None)
    return name if isinstance(name, str) else None


def _recorded(row: Any) -> RecordedEvent:
    position, event_id, stream_id, version, user_id, type_, data, metadata, recorded_at, tx_id = row
    meta = msgspec.json.decode(metadata) if isinstance(metadata, str) else metadata
    return RecordedEvent(
        position=position,
        event_id=event_id,
        stream_id=stream_id,
        stream_version=version,
        user_id=user_id,
        event=decode_event(type_, data, meta.get("schema_version", 1)),
        metadata=meta,
        recorded_at=recorded_at,
        tx_id=tx_id,
    )


async def read_stream(
    conn: AsyncConnection, user_id: str, stream_id: uuid.UUID, *, after_version: int = 0
) -> list[RecordedEvent]:
    """One user's stream, in version order (empty for another user's stream)."""
    rows = await conn.execute(_READ_STREAM, {"stream_id": stream_id, "user_id": user_id, "after": after_version})
    return [_recorded(row) for row in rows]


async def read_all(conn: AsyncConnection, after: Checkpoint, limit: int = 1000) -> list[RecordedEvent]:
    """The next events of the whole log after `after`, gap-safely (see the module docstring).

    Run it before the transaction writes anything: the reader's own transaction id would
    otherwise hold the horizon back.
    """
    rows = await conn.execute(_READ_ALL, {"tx_id": after.tx_id, "position": after.position, "limit": limit})
    return [_recorded(row) for row in rows]


async def read_user(
    conn: AsyncConnection, user_id: str, after: Checkpoint, limit: int = 100
) -> list[RecordedEvent]:
    """One user's events after `after`, in the same gap-safe order as `read_all`."""
    rows = await conn.execute(
        _READ_USER, {"user_id": user_id, "tx_id": after.tx_id, "position": after.position, "limit": limit}
    )
    return [_recorded(row) for row in rows]


async def checkpoint_of(conn: AsyncConnection, position: int) -> Checkpoint | None:
    """The log order place of the event at `position`, if it exists and is visible."""
    tx_id = await conn.scalar(text("SELECT tx_id FROM events WHERE position = :p"), {"p": position})
    return None if tx_id is None else Checkpoint(int(tx_id), position)


class EventStore:
    """Appends on autocommit connections of one engine, and wakes listeners after commit.

    The NOTIFY is sent after the append has committed, from a separate statement, and coalesced:
    while one is in flight, further appends only mark that another is due. A NOTIFY inside the
    appending transaction would take PostgreSQL's global notify lock until the commit record is
    flushed, serializing every appending commit; workers also poll, so a lost wake-up only
    delays them.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._notify_due = False
        self._notifier: asyncio.Task[None] | None = None

    async def append(
        self,
        user_id: str,
        stream_id: uuid.UUID,
        events: Sequence[Event],
        **options: Any,
    ) -> Appended:
        async with self.engine.connect() as conn:
            result = await append(conn, user_id, stream_id, events, **options)
        if not result.replayed:
            self.wake_listeners()
        return result

    def wake_listeners(self) -> None:
        self._notify_due = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._send_notifies())

    async def _send_notifies(self) -> None:
        while self._notify_due:
            self._notify_due = False
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
            except Exception:
                log.warning("NOTIFY %s failed; listeners will poll", NOTIFY_CHANNEL, exc_info=True)
                return

    async def aclose(self) -> None:
        if self._notifier is not None:
            await self._notifier
