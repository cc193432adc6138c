"""The event store: append to a stream, read a stream, read the log gap-safely.

An append is one INSERT ... SELECT, so that outside a transaction it is exactly one transaction
and one round trip: it reads the stream's head in the same statement and inserts the command's
events after it, only if the stream is new or the user's own and the expected version (if any)
holds. When it inserts nothing, or a unique index refuses it, a second query says why: the
idempotency key was used before (replay it, or a mismatch), the stream is another user's, the
version is stale, or a concurrent append won the race (run again).

Reading the global log follows DESIGN.md: `(tx_id, position)` order, and only events of
transactions older than every transaction still running, so that an event committed late with
a smaller position is never passed over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Final

import asyncpg
import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.citus import insert_values, is_distributed, violated_constraint
from service.connections import DATABASE_UNAVAILABLE, ConnectionPool
from service.events import (
    CLEAN_TEXT,
    CONTENT_FREE,
    SCHEMA_VERSIONS,
    STARTS_STREAM,
    STRUCTURE,
    DomainEvent,
    Event,
    EventValidationError,
    decode_event,
    encode_validated,
    event_type,
)
from service.ids import uuid7
from service.sealing import Keyring, event_aad, idempotency_digest, open_sealed, seal

log = logging.getLogger(__name__)

NOTIFY_CHANNEL: Final = "chatlog_events"
MAX_EVENTS_PER_APPEND: Final = 10_001  # a fork: its first event and up to 10,000 copies
MAX_APPEND_ATTEMPTS: Final = 200
CITUS_BATCHES_IN_FLIGHT: Final = 8
_IDEMPOTENCY_KEY_CHARS: Final = frozenset(chr(c) for c in range(0x20, 0x7F))

_CleanShort = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=CLEAN_TEXT)]
_CleanValue = Annotated[str, msgspec.Meta(max_length=1024, pattern=CLEAN_TEXT)]
CommandMetadata = Annotated[dict[_CleanShort, _CleanValue], msgspec.Meta(max_length=16)]
"""What a command may record about itself in its events' metadata (request id and the like)."""

_PLAIN_METADATA: Final = {t: msgspec.json.encode({"schema_version": v}).decode() for t, v in SCHEMA_VERSIONS.items()}


class NotFound(Exception):
    """The stream does not exist for this user (another user's stream answers the same)."""


class VersionConflict(Exception):
    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"expected version {expected}, stream is at version {current}")
        self.expected = expected
        self.current = current


class StaleTransaction(Exception):
    """The stream was appended to by a transaction newer than the caller's; retry in a new one."""


class IdempotencyMismatch(Exception):
    """The idempotency key was used before for a different request."""


class Checkpoint(msgspec.Struct, frozen=True, order=True):
    """A place in the log's `(tx_id, position)` order; `Checkpoint()` is its start."""

    tx_id: int = 0
    position: int = 0


class Appended(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: uuid.UUID
    positions: tuple[int, ...]
    versions: tuple[int, ...]
    recorded_at: datetime
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
    type: str
    event: DomainEvent | None  # None: erased (its stream's data key is destroyed)
    metadata: dict[str, Any] | None  # None when erased
    recorded_at: datetime
    tx_id: int

    @property
    def erased(self) -> bool:
        return self.event is None

    @property
    def schema_version(self) -> int:
        """The schema version the event was written with (its data is upcast to the current one)."""
        return int((self.metadata or {}).get("schema_version", 1))

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.position)


_HEAD = "SELECT stream_version, user_id, tx_id FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1"
_HEAD_OF_USER = (
    "SELECT stream_version, user_id, tx_id FROM events WHERE stream_id = $1 AND user_id = $2 "
    "ORDER BY stream_version DESC LIMIT 1"
)

# Appending: the commands of a batch (or one command alone) as one statement, so one transaction
# and one round trip, one row per event (command values repeated). Each command is checked as if
# alone, against its stream's head (looked up unless the store remembers it: `at`): the owner,
# its expected version, that its idempotency key is unused, and that it is sealed under the
# right key (a new stream's fresh key, or the existing stream's). A command that fails a check
# inserts none of its rows (its rows share the check) and is settled alone afterwards (a replay,
# a mismatch, a 404, a 409). A unique conflict (a race with another process, events already
# stored by a try whose answer was lost) fails the statement, and every command of a batch goes
# alone: rare, and cheaper than the speculative insertion of ON CONFLICT on every row. Rows go
# in by stream, so that batches lock in one order. The same statement stores a new stream's
# wrapped data key and a keyed command's idempotency record, so that they commit with its events.
#
# A stream's events must follow each other in the log's (tx_id, position) order too, so an
# append may not come from a transaction older than the one that wrote the stream's head. Only
# an explicit transaction that took its id before that head was written can be; an append in
# its own transaction always has the newest id.
_INSERT = """
INSERT INTO events (event_id, stream_id, stream_version, user_id, type, data, sealed, metadata)
SELECT e.event_id, e.stream_id, coalesce(e.at, head.stream_version, 0) + e.ord, e.user_id, e.type,
       e.data, decode(e.sealed, 'base64'), e.metadata
FROM json_to_recordset($1::json)
     AS e(event_id uuid, stream_id uuid, user_id text, type text, data jsonb, sealed text, metadata jsonb,
          ord integer, at integer, expected integer, new_stream boolean{digest_column})
LEFT JOIN LATERAL (
    SELECT stream_version, user_id, tx_id FROM events
    WHERE stream_id = e.stream_id AND e.at IS NULL
    ORDER BY stream_version DESC LIMIT 1
) AS head ON true
WHERE coalesce(head.user_id, e.user_id) = e.user_id
  AND (e.expected IS NULL OR coalesce(e.at, head.stream_version, 0) = e.expected)
  AND (NOT e.new_stream OR coalesce(e.at, head.stream_version, 0) = 0)
  AND (head.tx_id IS NULL OR head.tx_id < chatlog_xact_id()){digest_check}
ORDER BY e.stream_id, e.ord
RETURNING event_id, stream_id, user_id, position, stream_version, recorded_at
"""

# The common case, a batch of messages to existing streams with no idempotency key: the insert alone.
_APPEND_PLAIN = _INSERT.format(digest_column="", digest_check="").replace(
    "RETURNING event_id, stream_id, user_id, position", "RETURNING event_id, position"
)
_APPEND = f"""
WITH ins AS ({
    _INSERT.format(
        digest_column=", key_digest text",
        digest_check='''
  AND (e.key_digest IS NULL OR NOT EXISTS (
      SELECT FROM idempotency_keys AS used
      WHERE used.user_id = e.user_id AND used.key_digest = decode(e.key_digest, 'base64')))''',
    )
}), new_keys AS (
    INSERT INTO data_keys (stream_id, user_id, wrapped, master_id)
    SELECT ins.stream_id, ins.user_id, decode(k.wrapped, 'base64'), k.master_id
    FROM ins JOIN json_to_recordset($1::json) AS k(event_id uuid, wrapped text, master_id text) USING (event_id)
    WHERE k.wrapped IS NOT NULL
), new_idempotency AS (
    INSERT INTO idempotency_keys (user_id, key_digest, fingerprint, stream_id, first_version, event_count)
    SELECT ins.user_id, decode(k.key_digest, 'base64'), decode(k.fingerprint, 'base64'), ins.stream_id,
           ins.stream_version, k.events
    FROM ins JOIN json_to_recordset($1::json) AS k(event_id uuid, key_digest text, fingerprint text, events integer)
                  USING (event_id)
    WHERE k.fingerprint IS NOT NULL
)
SELECT event_id, position, stream_version, recorded_at FROM ins
"""


class _Row(msgspec.Struct, omit_defaults=True):
    """One event of `_APPEND`'s arguments (a command's values repeated on each of its events)."""

    event_id: uuid.UUID
    stream_id: uuid.UUID
    user_id: str
    type: str
    data: msgspec.Raw  # JSON, as it goes into the jsonb column
    sealed: bytes | None  # base64 in the JSON, as all the bytes here
    metadata: msgspec.Raw
    ord: int  # the event's place in its command, from 1
    at: int | None  # the stream's remembered head, if any
    expected: int | None
    new_stream: bool
    key_digest: bytes | None = None
    fingerprint: bytes | None = None  # on the command's first event only
    wrapped: bytes | None = None  # a new stream's data key, on its first event only
    master_id: str | None = None
    events: int = 0  # the command's event count


_encode_rows = msgspec.json.Encoder().encode


async def _insert(conn: asyncpg.Connection, rows: list[_Row]) -> list[Any]:
    """Insert the commands of `_rows` (each only if its checks hold); the rows inserted, as
    (event_id, position, stream_version, recorded_at).

    The arguments go as one JSON text, not an array per column: the client encodes them in one
    call instead of element by element, as the projection's writes do (projections/conversations.py)."""
    if await is_distributed(conn):
        return await _insert_distributed(conn, rows)
    # The plain insert when no command starts a stream or carries an idempotency key (nothing to
    # write beside the events).
    plain = not any(r.key_digest is not None or r.wrapped is not None for r in rows)
    result: list[Any] = await conn.fetch(_APPEND_PLAIN if plain else _APPEND, _encode_rows(rows).decode())
    return result


# On Citus (service/citus.py) the single statement cannot run: a lateral join of the arguments
# with `events` is no join on the distribution column. The same checks run as a few statements
# in one transaction on the commands' one shard: the heads, the owners and the used keys are
# read, the commands whose checks hold are inserted. What the single statement's snapshot gave,
# the unique indexes give here: a command that lost a race fails the insert and goes alone.
_HEADS_DISTRIBUTED = """
SELECT stream_id, max(stream_version), max(tx_id::text::numeric) FROM events
WHERE user_id = ANY($1::text[]) AND stream_id = ANY($2::uuid[]) GROUP BY user_id, stream_id
"""
_OWNERS = "SELECT stream_id, user_id FROM stream_owners WHERE stream_id = ANY($1::uuid[])"
_CLAIM = """
INSERT INTO stream_owners (stream_id, user_id) SELECT * FROM unnest($1::uuid[], $2::text[])
ON CONFLICT (stream_id) DO NOTHING
"""
_USED_KEYS = "SELECT key_digest FROM idempotency_keys WHERE user_id = ANY($1::text[]) AND key_digest = ANY($2::bytea[])"
_EVENT_COLUMNS: Final = ("event_id", "stream_id", "stream_version", "user_id", "type", "data", "sealed", "metadata")
_EVENT_TYPES: Final = ("uuid", "uuid", "integer", "text", "text", "jsonb", "bytea", "jsonb")
_KEY_COLUMNS: Final = (("stream_id", "user_id", "wrapped", "master_id"), ("uuid", "text", "bytea", "text"))
_IDEMPOTENCY_COLUMNS: Final = (
    ("user_id", "key_digest", "fingerprint", "stream_id", "first_version", "event_count"),
    ("text", "bytea", "bytea", "uuid", "integer", "integer"),
)


async def _insert_distributed(conn: asyncpg.Connection, batch: list[_Row]) -> list[Any]:
    columns = [list(column) for column in zip(*(msgspec.structs.astuple(r) for r in batch), strict=True)]
    (event_ids, stream_ids, user_ids, types, datas, sealeds, metadatas, ords, ats, expecteds, new_streams,
     digests, fingerprints, wrappeds, masters, counts) = columns  # fmt: skip
    datas, metadatas = [bytes(d).decode() for d in datas], [bytes(m).decode() for m in metadatas]  # msgspec.Raw
    starts = [i for i, ord_ in enumerate(ords) if ord_ == 1]  # each command's first row
    claims = [i for i in starts if new_streams[i]]
    if claims:
        # A new stream's id is claimed first, in a transaction of its own (its shard is the id's,
        # not the user's): two users cannot both start it, and the log's transaction stays on one shard.
        if conn.is_in_transaction():
            raise RuntimeError("on Citus a stream is started outside a transaction: its id is claimed first, alone")
        await conn.execute(_CLAIM, [stream_ids[i] for i in claims], [user_ids[i] for i in claims])
    users = sorted({user_ids[i] for i in starts})
    looked_up = [stream_ids[i] for i in starts if ats[i] is None]
    keyed = [digests[i] for i in starts if digests[i] is not None]
    # Within the caller's transaction the append must not be older than its stream's head (see
    # `_INSERT`); a transaction of its own, begun after the head it read committed, never is.
    in_caller_transaction = conn.is_in_transaction()

    async def checked() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows of the commands whose checks hold (heads, owners and used keys read here)."""
        now = int(await conn.fetchval("SELECT chatlog_xact_id()")) if in_caller_transaction else None
        heads = (
            {r[0]: (r[1], int(r[2])) for r in await conn.fetch(_HEADS_DISTRIBUTED, users, looked_up)}
            if looked_up
            else {}
        )
        # A stream with events of this user is this user's (its id was claimed); any other may be
        # another user's, or not exist yet.
        unknown = [stream_ids[i] for i in starts if ats[i] is None and stream_ids[i] not in heads]
        owners = dict(await conn.fetch(_OWNERS, unknown)) if unknown else {}
        used = {r[0] for r in await conn.fetch(_USED_KEYS, users, keyed)} if keyed else set()
        rows: list[tuple[Any, ...]] = []
        new_keys: list[tuple[Any, ...]] = []
        records: list[tuple[Any, ...]] = []
        for n, first in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(ords)
            stream, user = stream_ids[first], user_ids[first]
            head_version, head_tx = heads.get(stream, (0, None)) if ats[first] is None else (ats[first], None)
            if owners.get(stream, user) != user:
                continue
            if expecteds[first] is not None and head_version != expecteds[first]:
                continue
            if (new_streams[first] and head_version != 0) or (
                now is not None and head_tx is not None and head_tx >= now
            ):
                continue
            if digests[first] is not None and digests[first] in used:
                continue
            for i in range(first, end):
                rows.append((event_ids[i], stream, head_version + ords[i], user, types[i], datas[i], sealeds[i],
                             metadatas[i]))  # fmt: skip
            if wrappeds[first] is not None:
                new_keys.append((stream, user, wrappeds[first], masters[first]))
            if fingerprints[first] is not None:
                records.append((user, digests[first], fingerprints[first], stream, head_version + 1, counts[first]))
        rows.sort(key=lambda r: (r[1], r[2]))  # by stream, so that batches lock in one order
        return rows, new_keys, records

    async def write(rows: list[Any], new_keys: list[Any], records: list[Any]) -> list[Any]:
        if not rows:
            return []
        inserted = await insert_values(
            conn, "events", _EVENT_COLUMNS, _EVENT_TYPES, rows, "event_id, position, stream_version, recorded_at"
        )
        if new_keys:
            await insert_values(conn, "data_keys", *_KEY_COLUMNS, new_keys)
        if records:
            await insert_values(conn, "idempotency_keys", *_IDEMPOTENCY_COLUMNS, records)
        return inserted

    if not (looked_up or keyed or in_caller_transaction):
        # Every head remembered, nothing to read: one INSERT, its own transaction, when it is all.
        rows, new_keys, records = await checked()
        if not new_keys and not records and len(rows) * len(_EVENT_COLUMNS) <= 60_000:
            return await write(rows, [], [])
        async with conn.transaction():
            return await write(rows, new_keys, records)
    async with conn.transaction():
        return await write(*await checked())


_EXISTS = "SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = $1)"

_BY_EVENT_IDS = (
    "SELECT position, stream_version, recorded_at FROM events WHERE event_id = ANY($1::uuid[]) ORDER BY position"
)

# The events a keyed command appended: its idempotency record names its stream and versions.
_PRIOR_COMMAND = """
SELECT e.position, e.stream_version, i.fingerprint, e.recorded_at, e.stream_id
FROM idempotency_keys AS i
JOIN events AS e ON e.user_id = i.user_id AND e.stream_id = i.stream_id
                AND e.stream_version >= i.first_version AND e.stream_version < i.first_version + i.event_count
WHERE i.user_id = $1 AND i.key_digest = $2
ORDER BY e.position
"""

# An event with its stream's wrapped data key, read in the same snapshot: no key, no content.
_COLUMNS = (
    "e.position, e.event_id, e.stream_id, e.stream_version, e.user_id, e.type, e.data::text, e.sealed, "
    "e.metadata::text, e.recorded_at, e.tx_id, k.wrapped, k.master_id"
)
_FROM = (
    "FROM events AS e LEFT JOIN data_keys AS k "
    "ON k.stream_id = e.stream_id AND k.user_id = e.user_id AND e.sealed IS NOT NULL"
)

_READ_STREAM = (
    f"SELECT {_COLUMNS} {_FROM} WHERE e.stream_id = $1 AND e.user_id = $2 "
    "AND e.stream_version > $3 AND e.position <= $4 ORDER BY e.stream_version"
)

# DESIGN.md's rule: (tx_id, position) order, below the oldest running transaction.
_READ_ALL = f"""
SELECT {_COLUMNS} {_FROM}
WHERE (e.tx_id, e.position) > ($1::xid8, $2::bigint)
  AND e.tx_id < chatlog_horizon()
ORDER BY e.tx_id, e.position
LIMIT $3
"""

_READ_USER = f"""
SELECT {_COLUMNS} {_FROM}
WHERE e.user_id = $4
  AND (e.tx_id, e.position) > ($1::xid8, $2::bigint)
  AND e.tx_id < chatlog_horizon()
ORDER BY e.tx_id, e.position
LIMIT $3
"""

# A projection slice's share of `_READ_ALL` (projections/slices.py): the same statement with one
# added predicate, derived from it so that the two cannot drift apart.
_READ_SLICE = _READ_ALL.replace("\nORDER BY", "\n  AND hashtext(e.user_id) BETWEEN $4 AND $5\nORDER BY", 1)
assert _READ_SLICE != _READ_ALL

# On Citus the horizon must be the coordinator's, whose transaction ids the log holds: in a query
# over distributed tables the function would run on each worker, against the worker's own ids
# (even from a materialized CTE, in a query on one shard). It is read first, in the same
# transaction, and passed in (as the last parameter).
_HORIZON = "SELECT chatlog_horizon()"
_READ_ALL_BELOW = _READ_ALL.replace("chatlog_horizon()", "$4::xid8")
_READ_SLICE_BELOW = _READ_SLICE.replace("chatlog_horizon()", "$6::xid8")
_READ_USER_BELOW = _READ_USER.replace("chatlog_horizon()", "$5::xid8")

# The worker holds the keys of the streams it folds until its batch commits: an erasure waits
# for it (and then deletes what it wrote), or has committed and the batch sees no key. Citus
# locks rows only in a query on one shard: there the batch holds, from before its read, a shared
# advisory lock on the coordinator that an erasure takes exclusively (ERASURES_LOCK).
#
# On one server the read and the lock are one statement (one round trip): its last column says
# whether the row's key was still there to lock. A key an erasure deleted after the read's
# snapshot is not locked (the lock skips a row deleted since, once its deleter commits), and its
# stream's events are erased.
_HOLDING = """
WITH page AS ({read}), held AS MATERIALIZED (
    SELECT stream_id FROM data_keys
    WHERE stream_id IN (SELECT stream_id FROM page WHERE wrapped IS NOT NULL)
    ORDER BY stream_id FOR KEY SHARE
)
SELECT page.*, page.stream_id IN (SELECT stream_id FROM held) FROM page ORDER BY page.tx_id, page.position
"""
_READ_ALL_HOLDING = _HOLDING.format(read=_READ_ALL)
_READ_SLICE_HOLDING = _HOLDING.format(read=_READ_SLICE)
ERASURES_LOCK: Final = 0x63686C65  # "chle"


_SHARD_OF = "SELECT get_shard_id_for_distribution_column('events', $1::text)"


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


class Prepared(msgspec.Struct, frozen=True, kw_only=True):
    """An append, validated, encoded and sealed, with its event ids chosen: ready to send, as
    often as needed (the same ids each time, so that a retry after a lost connection can tell
    whether it landed). `new_key` is the wrapped data key of a stream it starts: it is then
    sealed under that key and lands only as the stream's first events."""

    user_id: str
    stream_id: uuid.UUID
    event_ids: tuple[uuid.UUID, ...]
    types: tuple[str, ...]
    data: tuple[str, ...]  # each event's structure, in clear
    sealed: tuple[bytes | None, ...]  # each event's content, sealed
    metadatas: tuple[str, ...]
    expected_version: int | None
    idempotency_key: str | None
    key_digest: bytes | None
    fingerprint: bytes | None
    new_key: bytes | None
    master_id: str | None  # of the master key that wrapped `new_key`
    data_key: AESGCM | None
    content: tuple[bytes, ...]  # each event's JSON, to seal (again, under another key)
    structures: tuple[dict[str, Any], ...]
    shard: int | None = None  # on Citus, the user's shard: a group commit batch stays on one

    def sealed_with(self, data_key: AESGCM | None, new_key: tuple[bytes, str] | None = None) -> Prepared:
        """The same command (the same event ids) sealed under `data_key` (see `prepare`)."""
        stored = [
            seal_event(data_key, event_id, type_, data, structure)
            for event_id, type_, data, structure in zip(
                self.event_ids, self.types, self.content, self.structures, strict=True
            )
        ]
        return msgspec.structs.replace(
            self,
            data=tuple(clear for clear, _ in stored),
            sealed=tuple(sealed for _, sealed in stored),
            new_key=None if new_key is None else new_key[0],
            master_id=None if new_key is None else new_key[1],
            data_key=data_key,
        )


def seal_event(
    aead: AESGCM | None, event_id: uuid.UUID, type_: str, data: bytes, structure: dict[str, Any] | None = None
) -> tuple[str, bytes | None]:
    """An event's JSON as stored: its structure in clear (the ids and numbers queries use) and
    the whole of it sealed under its stream's data key (nothing to seal for a content-free event)."""
    if type_ in CONTENT_FREE:
        return data.decode(), None
    if aead is None:
        raise EventValidationError(f"{type_} has content, and nothing to seal it with")
    if structure is None:
        raw = msgspec.json.decode(data)
        structure = {name: raw[name] for name in STRUCTURE if name in raw}
    return msgspec.json.encode(structure).decode(), seal(aead, data, event_aad(event_id, type_))


_UNSEALED: Final[Any] = object()


def prepare(
    user_id: str,
    stream_id: uuid.UUID,
    events: Sequence[Event],
    *,
    data_key: AESGCM | None = _UNSEALED,
    new_key: tuple[bytes, str] | None = None,
    expected_version: int | None = None,
    idempotency_key: str | None = None,
    fingerprint: bytes | None = None,
    metadata: dict[str, Any] | None = None,
) -> Prepared:
    """Check, encode and seal an append (see `append`); raises EventValidationError before any SQL.

    `data_key` is the stream's data key; with `new_key` (its wrapped form and the id of the master
    key that wrapped it) the append must start the stream. Without a `data_key` the command is
    checked and encoded only, to be sealed (`Prepared.sealed_with`) once its key is known."""
    validate_user_id(user_id)
    if type(stream_id) is not uuid.UUID and not isinstance(stream_id, uuid.UUID):
        raise EventValidationError("stream_id must be a UUID")
    count = len(events)
    if not 1 <= count <= MAX_EVENTS_PER_APPEND:
        raise EventValidationError(f"an append carries 1 to {MAX_EVENTS_PER_APPEND} events")
    if expected_version is not None and (type(expected_version) is not int or expected_version < 0):
        raise EventValidationError("expected_version must be an integer >= 0")
    if idempotency_key is not None:
        validate_idempotency_key(idempotency_key)
    encoded = [encode_validated(event) for event in events]
    types = tuple(event_type(event) for event in events)
    if idempotency_key is None:
        fingerprint = None
    elif fingerprint is None:
        fingerprint = fingerprint_of(stream_id, expected_version, encoded)
    if metadata is None:
        metadatas = tuple(_PLAIN_METADATA[t] for t in types)
    else:
        try:
            common: dict[str, Any] = msgspec.convert(metadata, CommandMetadata)
        except msgspec.ValidationError as exc:
            raise EventValidationError(f"command metadata: {exc}") from exc
        metadatas = tuple(msgspec.json.encode({**common, "schema_version": SCHEMA_VERSIONS[t]}).decode() for t in types)
    draft = Prepared(
        user_id=user_id,
        stream_id=stream_id,
        event_ids=tuple(uuid7() for _ in range(count)),
        types=types,
        data=(),
        sealed=(),
        metadatas=metadatas,
        expected_version=expected_version,
        idempotency_key=idempotency_key,
        key_digest=None if idempotency_key is None else idempotency_digest(user_id, idempotency_key),
        fingerprint=fingerprint,
        new_key=None,
        master_id=None,
        data_key=None,
        content=tuple(encoded),
        structures=tuple(_structure(event) for event in events),
    )
    return draft if data_key is _UNSEALED else draft.sealed_with(data_key, new_key)


def _structure(event: Event) -> dict[str, Any]:
    return {name: value for name in STRUCTURE if (value := getattr(event, name, None)) is not None}


class NewStreamRefused(Exception):
    """An append sealed under a fresh key found its stream already there: seal it again under the
    stream's own key (or, if the stream has none left, it is erased)."""


async def stream_key(conn: asyncpg.Connection, keyring: Keyring, stream_id: uuid.UUID) -> AESGCM | None:
    """The stream's data key, if it has one (a new stream has none yet; an erased one none left)."""
    row = await conn.fetchrow("SELECT wrapped, master_id FROM data_keys WHERE stream_id = $1", stream_id)
    return None if row is None else keyring.unwrap(stream_id, row[0], row[1])


def starts_stream(draft: Prepared) -> bool:
    """Whether the command must make a new stream (so its stream has no key to look up)."""
    return draft.expected_version == 0 or draft.types[0] in STARTS_STREAM


async def data_key(
    conn: asyncpg.Connection, keyring: Keyring, stream_id: uuid.UUID, *, new_stream: bool
) -> tuple[AESGCM, tuple[bytes, str] | None]:
    """The key to seal a command with: its stream's (read from the database), or, for a stream that
    has none yet, a new one with its wrapped form and master key id. NotFound for a stream that
    exists and has no key left (erased); a command that makes a new stream asks nothing."""
    if not new_stream:
        aead = await stream_key(conn, keyring, stream_id)
        if aead is not None:
            return aead, None
        if await conn.fetchval(_EXISTS, stream_id):
            # The stream's first events may have committed (with its key) since the key was read:
            # a key missing after its events were seen is erased.
            aead = await stream_key(conn, keyring, stream_id)
            if aead is not None:
                return aead, None
            raise NotFound(str(stream_id))  # erased
    return keyring.new_stream_key(stream_id)


async def append(
    conn: asyncpg.Connection,
    keyring: Keyring,
    user_id: str,
    stream_id: uuid.UUID,
    events: Sequence[Event],
    *,
    heads: StreamHeads | None = None,
    **options: Any,
) -> Appended:
    """Append `events` to a stream of `user_id` as one transaction, sealed under the stream's key.

    Outside a transaction each attempt is one statement, so one transaction; inside the
    caller's transaction each attempt runs in a savepoint (and commits with the caller).
    `heads` (outside transactions only) lets it insert at a stream's remembered head without
    looking the head up.

    The options are `prepare`'s:

    - `expected_version`: the stream's version the caller saw (0: the stream must not exist);
      a stale one raises `VersionConflict` and writes nothing. Without it the events go after
      the stream's current version, and a lost race is retried.
    - `idempotency_key`: a retry with the same key returns the first append's positions and
      appends nothing; the same key for a different request raises `IdempotencyMismatch`.
      `fingerprint` identifies the request (callers that generate ids pass a digest of the
      request itself); by default it is a digest of the events.
    - A stream that belongs to another user, or whose content was erased, raises `NotFound`
      (or `VersionConflict` for `expected_version=0`: that stream id is taken).
    """
    draft = prepare(user_id, stream_id, events, **options)
    new_stream = starts_stream(draft)
    for _ in range(MAX_APPEND_ATTEMPTS):
        prepared = draft.sealed_with(*await data_key(conn, keyring, stream_id, new_stream=new_stream))
        try:
            return await append_prepared(conn, prepared, heads=heads)
        except NewStreamRefused:  # someone started the stream first: seal under its key
            new_stream = False
    raise RuntimeError(f"append to stream {stream_id} lost {MAX_APPEND_ATTEMPTS} races in a row")


def _rows(batch: Sequence[tuple[Prepared, int | None]]) -> list[_Row]:
    """`_APPEND`'s arguments for commands, each with its stream's remembered head (or None)."""
    rows: list[_Row] = []
    for p, at in batch:
        count = len(p.event_ids)
        digest, fingerprint, wrapped, master = p.key_digest, p.fingerprint, p.new_key, p.master_id
        new_stream = wrapped is not None
        for i, event_id in enumerate(p.event_ids):
            rows.append(_Row(
                event_id, p.stream_id, p.user_id, p.types[i], msgspec.Raw(p.data[i]), p.sealed[i],
                msgspec.Raw(p.metadatas[i]), i + 1, at, p.expected_version, new_stream, digest, fingerprint,
                wrapped, master, count,
            ))  # fmt: skip
            fingerprint = wrapped = master = None  # on the command's first event only (the key on all: checked by each)
    return rows


async def append_prepared(
    conn: asyncpg.Connection, prepared: Prepared, *, heads: StreamHeads | None = None
) -> Appended:
    """Append a prepared command on `conn` (see `append`), racing and retrying alone."""
    user_id, stream_id = prepared.user_id, prepared.stream_id
    expected_version, idempotency_key, fingerprint = (
        prepared.expected_version,
        prepared.key_digest,
        prepared.fingerprint,
    )
    in_transaction = conn.is_in_transaction()
    if in_transaction:
        heads = None  # what a transaction sees may yet roll back: remember only committed heads
    for attempt in range(MAX_APPEND_ATTEMPTS):
        known = heads.get(stream_id) if heads is not None else None
        at: int | None = None
        if known is not None:
            owner, version = known
            if owner != user_id or expected_version is not None:
                _check_head(stream_id, user_id, expected_version, owner, version, exact=False)
            if expected_version is None or expected_version == version:
                at = version
        arguments = _rows([(prepared, at)])
        try:
            if in_transaction:
                async with conn.transaction():  # a savepoint, so that a lost race can be retried
                    rows = await _insert(conn, arguments)
            else:
                rows = await _insert(conn, arguments)
        except asyncpg.UniqueViolationError as exc:
            constraint = violated_constraint(exc)
            if constraint == "idempotency_keys_pkey":
                assert idempotency_key is not None and fingerprint is not None
                replayed = await _prior(conn, user_id, idempotency_key, fingerprint, prepared.idempotency_key)
                if replayed is not None:
                    return replayed
            elif constraint == "events_event_id_key":
                # These very events committed meanwhile: an earlier try whose answer was lost.
                landed = await landed_before(conn, prepared)
                if landed is not None:
                    return landed
                raise
            elif constraint not in ("events_stream_version_key", "data_keys_pkey"):
                raise
            # Lost a race, or the remembered head was stale; the winner has committed (the
            # unique index waited for it).
            if heads is not None:
                heads.forget(stream_id)
            if attempt >= 3:
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 20)))
            continue
        if rows:
            rows.sort(key=lambda r: r[1])
            if heads is not None:
                heads.remember(stream_id, user_id, rows[-1][2])
            return Appended(
                stream_id=stream_id,
                positions=tuple(r[1] for r in rows),
                versions=tuple(r[2] for r in rows),
                recorded_at=rows[0][3],
            )
        # Nothing inserted: the key was used before, or the stream refused the append.
        if idempotency_key is not None:
            assert fingerprint is not None
            replayed = await _prior(conn, user_id, idempotency_key, fingerprint, prepared.idempotency_key)
            if replayed is not None:
                return replayed
        if await is_distributed(conn):
            # On Citus the owner is in stream_owners (on the id's shard); the head on the user's.
            head = await conn.fetchrow(_HEAD_OF_USER, stream_id, user_id)
            if head is None:
                owner = await conn.fetchval("SELECT user_id FROM stream_owners WHERE stream_id = $1", stream_id)
                if owner is not None and owner != user_id:
                    head = await conn.fetchrow(_HEAD, stream_id) or (0, owner, None)
        else:
            head = await conn.fetchrow(_HEAD, stream_id)
        if head is not None:
            if heads is not None:
                heads.remember(stream_id, head[1], head[0])
            _check_head(stream_id, user_id, expected_version, head[1], head[0], exact=True)
            if in_transaction and head[2] > await conn.fetchval("SELECT chatlog_xact_id()"):
                raise StaleTransaction(
                    f"stream {stream_id} was appended to by a newer transaction; append in a new transaction"
                )
            if prepared.new_key is not None:
                raise NewStreamRefused(str(stream_id))
        elif expected_version is not None and expected_version != 0:
            raise VersionConflict(expected_version, 0)
        # The head moved between the two statements: run again.
    raise RuntimeError(f"append to stream {stream_id} lost {MAX_APPEND_ATTEMPTS} races in a row")


async def append_all(conn: asyncpg.Connection, commands: Sequence[Prepared]) -> list[int]:
    """Commands with expected versions, to streams of their own, as one statement in the caller's
    transaction: all land, or VersionConflict (a stream moved on) and none does. The positions of
    their last events."""
    if not commands:
        return []
    # Each stream's head is looked up (not taken from the expected version), so that the order
    # rule holds too: a stream written by a newer transaction skips its command.
    try:
        rows = await _insert(conn, _rows([(p, None) for p in commands]))
    except asyncpg.UniqueViolationError:
        raise VersionConflict(-1, -1) from None  # a stream moved on (and the transaction is lost)
    if len(rows) != sum(len(p.event_ids) for p in commands):
        raise VersionConflict(-1, -1)  # a stream moved on, or was written by a newer transaction
    last = {row[0]: row[1] for row in rows}
    return [last[p.event_ids[-1]] for p in commands]


async def landed_before(conn: asyncpg.Connection, prepared: Prepared) -> Appended | None:
    """The command's events, if an earlier try of it committed them (a command lands whole or not at all)."""
    rows = await conn.fetch(_BY_EVENT_IDS, list(prepared.event_ids))
    if not rows:
        return None
    return Appended(
        stream_id=prepared.stream_id,
        positions=tuple(r[0] for r in rows),
        versions=tuple(r[1] for r in rows),
        recorded_at=rows[0][2],
    )


def _check_head(
    stream_id: uuid.UUID, user_id: str, expected: int | None, owner: str, version: int, *, exact: bool
) -> None:
    """Refuse an append to another user's stream, or one whose expected version is stale.

    With `exact=False` the head is a remembered one, which the stream may have passed since:
    only an expected version below it is certainly stale.
    """
    if owner != user_id:
        if expected == 0:
            raise VersionConflict(0, version)
        raise NotFound(str(stream_id))
    if expected is not None and (expected < version or (exact and expected != version)):
        raise VersionConflict(expected, version)


class StreamHeads:
    """The last committed version (and the owner) of recently appended streams, bounded.

    Only committed heads are remembered and the log never shrinks, so a stream's true head is
    never below the remembered one: an insert at remembered + 1 either fits exactly or is refused
    by the unique index, and versions stay gapless.
    """

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._heads: dict[int, tuple[str, int]] = {}  # by the id's integer: hashed in C, not by UUID.__hash__

    def get(self, stream_id: uuid.UUID) -> tuple[str, int] | None:
        return self._heads.get(stream_id.int)

    def remember(self, stream_id: uuid.UUID, owner: str, version: int) -> None:
        key = stream_id.int
        self._heads.pop(key, None)
        self._heads[key] = (owner, version)
        if len(self._heads) > self.size:
            del self._heads[next(iter(self._heads))]

    def forget(self, stream_id: uuid.UUID) -> None:
        self._heads.pop(stream_id.int, None)


async def prior_command(conn: asyncpg.Connection, user_id: str, key: str, fingerprint: bytes) -> Appended | None:
    """The answer of the user's earlier command with this Idempotency-Key, if there was one;
    `IdempotencyMismatch` if it asked for something else."""
    return await _prior(conn, user_id, idempotency_digest(user_id, key), fingerprint, key)


async def _prior(
    conn: asyncpg.Connection, user_id: str, digest: bytes, fingerprint: bytes, key: str | None
) -> Appended | None:
    rows = await conn.fetch(_PRIOR_COMMAND, user_id, digest)
    if not rows:
        return None
    if rows[0][2] != fingerprint:
        raise IdempotencyMismatch(f"idempotency key {key!r} was used for another request")
    return Appended(
        stream_id=rows[0][4],
        positions=tuple(r[0] for r in rows),
        versions=tuple(r[1] for r in rows),
        recorded_at=rows[0][3],
        replayed=True,
    )


def recorded(row: Any, keyring: Keyring, erased: frozenset[uuid.UUID] = frozenset()) -> RecordedEvent:
    """A row of `_COLUMNS` as a decoded event, opened with its stream's key; erased when the
    stream has no key (or is among `erased`)."""
    (position, event_id, stream_id, version, user_id, type_, data, sealed, metadata, recorded_at, tx_id,
     wrapped, master_id, *_) = row  # fmt: skip
    event: DomainEvent | None = None
    meta: dict[str, Any] | None = None
    if sealed is None or (wrapped is not None and stream_id not in erased):
        meta = msgspec.json.decode(metadata)
        if sealed is not None:
            aead = keyring.unwrap(stream_id, wrapped, master_id)
            data = open_sealed(aead, sealed, event_aad(event_id, type_))
        event = decode_event(type_, data, meta.get("schema_version", 1))
    return RecordedEvent(
        position=position,
        event_id=event_id,
        stream_id=stream_id,
        stream_version=version,
        user_id=user_id,
        type=type_,
        event=event,
        metadata=meta,
        recorded_at=recorded_at,
        tx_id=int(tx_id),
    )


async def read_stream(
    conn: asyncpg.Connection,
    keyring: Keyring,
    user_id: str,
    stream_id: uuid.UUID,
    *,
    after_version: int = 0,
    until_position: int = 2**63 - 1,
) -> list[RecordedEvent]:
    """One user's stream, in version order (empty for another user's stream), up to a position."""
    rows = await conn.fetch(_READ_STREAM, stream_id, user_id, after_version, until_position)
    return [recorded(row, keyring) for row in rows]


async def read_all(
    conn: asyncpg.Connection,
    keyring: Keyring,
    after: Checkpoint,
    limit: int = 1000,
    *,
    hold_keys: bool = False,
    hashes: tuple[int, int] | None = None,
) -> list[RecordedEvent]:
    """The next events of the whole log after `after`, gap-safely (see the module docstring);
    with `hashes`, only the users whose `hashtext(user_id)` lies in that inclusive range (a
    projection slice's, projections/slices.py).

    If the reader's transaction already has an id (the worker locks its checkpoint row first),
    the horizon stops at that id: events of newer transactions wait for the next read. With
    `hold_keys` (in a transaction) the streams' data keys stay locked until it ends, so that an
    erasure cannot commit between this read and what the reader writes from it; a key erased
    since the read makes its stream's events erased here too.
    """
    distributed = await is_distributed(conn)
    sliced = () if hashes is None else tuple(hashes)
    if distributed:
        if hold_keys:
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", ERASURES_LOCK)
        horizon = await conn.fetchval(_HORIZON)
        statement = _READ_ALL_BELOW if hashes is None else _READ_SLICE_BELOW
        rows = await conn.fetch(statement, after.tx_id, after.position, limit, *sliced, horizon)
    elif hold_keys:
        statement = _READ_ALL_HOLDING if hashes is None else _READ_SLICE_HOLDING
        rows = await conn.fetch(statement, after.tx_id, after.position, limit, *sliced)
        erased = frozenset(row[2] for row in rows if row[11] is not None and not row[13])
        return [recorded(row, keyring, erased) for row in rows]
    else:
        statement = _READ_ALL if hashes is None else _READ_SLICE
        rows = await conn.fetch(statement, after.tx_id, after.position, limit, *sliced)
    return [recorded(row, keyring) for row in rows]


async def read_user(
    conn: asyncpg.Connection, keyring: Keyring, user_id: str, after: Checkpoint, limit: int = 100
) -> list[RecordedEvent]:
    """One user's events after `after`, in the same gap-safe order as `read_all`."""
    if await is_distributed(conn):
        horizon = await conn.fetchval(_HORIZON)
        rows = await conn.fetch(_READ_USER_BELOW, after.tx_id, after.position, limit, user_id, horizon)
    else:
        rows = await conn.fetch(_READ_USER, after.tx_id, after.position, limit, user_id)
    return [recorded(row, keyring) for row in rows]


async def read_positions(
    conn: asyncpg.Connection, keyring: Keyring, user_id: str, positions: Sequence[int]
) -> list[RecordedEvent]:
    """The user's events at these positions, in position order."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} {_FROM} WHERE e.position = ANY($1::bigint[]) AND e.user_id = $2 ORDER BY e.position",
        list(positions),
        user_id,
    )
    return [recorded(row, keyring) for row in rows]


async def checkpoint_of(conn: asyncpg.Connection, position: int) -> Checkpoint | None:
    """The log-order place of the event at `position`, if it exists."""
    tx_id = await conn.fetchval("SELECT tx_id FROM events WHERE position = $1", position)
    return None if tx_id is None else Checkpoint(int(tx_id), position)


class _Waiting:
    __slots__ = ("future", "prepared")

    def __init__(self, prepared: Prepared, future: asyncio.Future[Appended]) -> None:
        self.prepared, self.future = prepared, future


class GroupCommit:
    """Appends that arrive together share one transaction, one statement and one commit (DESIGN.md).

    A command that finds nothing running is sent at once, as its own one-statement transaction:
    an idle store waits for nothing. While a batch runs, arrivals queue; a second batch starts
    beside it once `beside` commands wait (up to `max_in_flight` side by side), and when the
    database answers one, everything queued (up to `max_batch`, one command per stream and per
    idempotency key) goes as the next batch. Each command stays atomic and is
    answered as if alone: a command the batch's statement skipped (a stale version, a foreign
    stream, a used key) is settled alone afterwards, a unique conflict sends the whole batch
    alone, and only a command whose events committed is answered with them.
    """

    def __init__(self, store: EventStore, *, max_batch: int = 256, max_in_flight: int = 2, beside: int = 8) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.beside = beside
        self.queue: collections.deque[_Waiting] = collections.deque()
        self.in_flight = 0
        self.batches = 0  # batches of more than one command committed (the tests look)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._waking = False  # a batch's answers were just handed out, in this turn of the loop

    async def submit(self, prepared: Prepared) -> Appended:
        if not self.queue and self._may_start(1):
            return await self._lead(prepared)
        prepared = await self.store.placed(prepared)
        waiting = _Waiting(prepared, asyncio.get_running_loop().create_future())
        self.queue.append(waiting)
        if self._may_start(len(self.queue)):
            self._start()
        return await self._answer(waiting)

    def _may_start(self, commands: int) -> bool:
        """Whether a batch of `commands` may start now: with a slot free, at once when nothing
        runs (the idle path), and beside a running batch only once `beside` commands are waiting.
        Below that they wait for the running batch to end (about a millisecond) and go together:
        a batch's fixed cost (a round trip, a commit, a WAL flush: about 0.35 ms of the
        database's) is then shared by many, instead of spent on one."""
        return self.in_flight < self.max_in_flight and (self.in_flight == 0 or commands >= self.beside)

    async def _answer(self, waiting: _Waiting) -> Appended:
        try:
            return await waiting.future
        except asyncio.CancelledError:
            # A caller that gives up while queued is taken out; once its batch runs (in a task of
            # its own), the batch goes on for its other commands and only this answer is dropped.
            with contextlib.suppress(ValueError):
                self.queue.remove(waiting)
            raise

    async def _lead(self, prepared: Prepared) -> Appended:
        """A free slot and nothing queued: this command takes the slot. If a batch has just
        handed out its answers, it yields once, so that the callers woken with it can queue
        behind it, and they go as one batch. Alone, it goes at once in its own task: the idle
        path creates no task and no future, and waits for nothing."""
        self.in_flight += 1
        self._idle.clear()
        if self._waking:  # answers of a batch are being handed out: their callers may come back now
            try:
                await asyncio.sleep(0)
            except BaseException:
                self._done()
                raise
        if self.queue:
            try:
                prepared = await self.store.placed(prepared)
            except BaseException:
                self._done()
                raise
            waiting = _Waiting(prepared, asyncio.get_running_loop().create_future())
            self.queue.appendleft(waiting)
            self._launch(self._take())
            return await self._answer(waiting)
        try:
            async with self.store.pool.acquire() as conn:
                result = await append_prepared(conn, prepared, heads=self.store.heads)
            if not result.replayed:
                self.store.appended(len(result.positions))
            return result
        finally:
            self._done()

    def _woken(self) -> None:
        self._waking = False

    def _done(self) -> None:
        """A batch ended (or has its answer): the next one takes everything queued meanwhile."""
        self.in_flight -= 1
        if self.queue:
            if self._may_start(len(self.queue)):
                self._start()
        elif self.in_flight == 0:
            self._idle.set()

    def _start(self) -> None:
        batch = self._take()
        if batch:
            self.in_flight += 1
            self._idle.clear()
            self._launch(batch)

    def _take(self) -> list[_Waiting]:
        """The next batch from the queue, in order: up to `max_batch`, one command per stream and
        per idempotency key, all on the first one's shard on Citus, so that its transaction commits
        on one worker, in one phase (the others stay queued for the next batch, in their order)."""
        batch: list[_Waiting] = []
        streams: set[int] = set()
        keys: set[tuple[str, str]] = set()
        later: list[_Waiting] = []
        shard = self.queue[0].prepared.shard if self.queue else None
        while self.queue and len(batch) < self.max_batch:
            waiting = self.queue.popleft()
            p = waiting.prepared
            stream, key = p.stream_id.int, (p.user_id, p.idempotency_key or "")
            if stream in streams or (p.idempotency_key is not None and key in keys) or p.shard != shard:
                later.append(waiting)
            else:
                streams.add(stream)
                keys.add(key)
                batch.append(waiting)
        self.queue.extendleft(reversed(later))
        return batch

    def _launch(self, batch: list[_Waiting]) -> None:
        """Run `batch` in a task of its own, in a slot already taken."""
        task = asyncio.get_running_loop().create_task(self._run(batch), name="group-commit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._done()

        try:
            if len(batch) == 1:
                await self._alone(batch[0], in_doubt=False)
            else:
                await self._together(batch, release)
        finally:
            release()

    async def _alone(self, waiting: _Waiting, *, in_doubt: bool) -> None:
        """One command in its own transaction(s), as `append_prepared` runs it."""
        try:
            async with self.store.pool.acquire() as conn:
                landed = await landed_before(conn, waiting.prepared) if in_doubt else None
                result = landed or await append_prepared(conn, waiting.prepared, heads=self.store.heads)
        except BaseException as exc:
            _settle(waiting, exc=exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not result.replayed:
            self.store.appended(len(result.positions))
        _settle(waiting, result)

    async def _together(self, batch: list[_Waiting], release: Callable[[], None]) -> None:
        """The batch as one statement; `release` frees its slot as soon as the database has answered,
        so that the next batch is on its way while this one's answers are handed out."""
        heads = self.store.heads
        commands: list[tuple[Prepared, int | None]] = []
        for waiting in batch:
            p = waiting.prepared
            at: int | None = None
            known = heads.get(p.stream_id)
            if known is not None and known[0] == p.user_id and p.expected_version in (None, known[1]):
                at = known[1]
            commands.append((p, at))
        arguments = _rows(commands)
        inserted: dict[uuid.UUID, Any] = {}
        try:
            async with self.store.pool.acquire() as conn:
                inserted = {row[0]: row for row in await _insert(conn, arguments)}
        except DATABASE_UNAVAILABLE:
            # The connection was lost (or the database went away) mid-batch: committed or not is
            # unknown. Each command looks for its own events (their ids were chosen before the
            # first try), then goes alone.
            await asyncio.gather(*(self._alone(w, in_doubt=True) for w in batch))
            return
        except Exception:
            # A unique conflict, a deadlock, anything else: nothing of the batch committed; each
            # command goes alone, so that only one at fault fails.
            log.debug("a batch of %d appends fell back to appending one by one", len(batch), exc_info=True)
            await asyncio.gather(*(self._alone(w, in_doubt=False) for w in batch))
            return
        release()
        self.batches += 1
        leftover: list[_Waiting] = []
        count = 0
        for waiting in batch:
            p = waiting.prepared
            rows = [inserted[event_id] for event_id in p.event_ids if event_id in inserted]
            if not rows:
                heads.forget(p.stream_id)
                leftover.append(waiting)
                continue
            rows.sort(key=lambda r: r[1])
            heads.remember(p.stream_id, p.user_id, rows[-1][2])
            count += len(rows)
            _settle(
                waiting,
                Appended(
                    stream_id=p.stream_id,
                    positions=tuple(r[1] for r in rows),
                    versions=tuple(r[2] for r in rows),
                    recorded_at=rows[0][3],
                ),
            )
        if count:
            self.store.appended(count)
            self._waking = True
            asyncio.get_running_loop().call_soon(self._woken)  # runs after the callers it woke
        if leftover:  # each skipped command, alone: its own answer (replay, 404, 409) or a retry
            await asyncio.gather(*(self._alone(w, in_doubt=False) for w in leftover))

    async def drain(self) -> None:
        """Wait until every submitted command has been answered."""
        await self._idle.wait()


def _settle(waiting: _Waiting, result: Appended | None = None, *, exc: BaseException | None = None) -> None:
    if waiting.future.done():
        return
    if exc is not None:
        waiting.future.set_exception(exc)
    else:
        waiting.future.set_result(result)  # type: ignore[arg-type]


class EventStore:
    """Appends on a connection pool and wakes listeners after commit.

    The NOTIFY is sent after the append has committed, from a separate statement, coalesced and
    at most once per `notify_interval`: a NOTIFY inside the appending transaction would take
    PostgreSQL's global notify lock until the commit record is flushed, serializing every
    appending commit. Workers also poll, so a lost wake-up only delays them.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        keyring: Keyring,
        *,
        notify_interval: float = 0.005,
        group_commit: bool = True,
        batches_in_flight: int = 2,
    ) -> None:
        self.pool = pool
        self.keyring = keyring
        self.notify_interval = notify_interval
        self._notify_due = False
        self._notifier: asyncio.Task[None] | None = None
        self._local_listeners: list[Callable[[], None]] = []
        self.heads = StreamHeads()
        self.appended_events = 0
        self._appending = 0  # appends between their call and their answer
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.group = GroupCommit(self, max_in_flight=batches_in_flight) if group_commit else None
        self.distributed: bool | None = None  # Citus? Asked at the first append.
        self._shards: dict[str, int] = {}

    async def append(
        self,
        user_id: str,
        stream_id: uuid.UUID,
        events: Sequence[Event],
        **options: Any,
    ) -> Appended:
        """Append one command (see the module function `append` for the options), acknowledged
        once committed; with group commit, in a transaction shared with the commands that
        arrive together."""
        draft = prepare(user_id, stream_id, events, **options)
        new_stream = starts_stream(draft)
        self._appending += 1
        self._quiet.clear()
        try:
            for _ in range(MAX_APPEND_ATTEMPTS):
                data_key, new_key = await self._data_key(stream_id, new_stream=new_stream)
                prepared = draft.sealed_with(data_key, new_key)
                try:
                    result = await (self.group.submit(prepared) if self.group is not None else self._alone(prepared))
                except NewStreamRefused:  # someone started the stream first: seal under its key
                    new_stream = False
                    continue
                if not result.replayed:
                    self.keyring.remember_writing_key(stream_id, data_key)
                return result
            raise RuntimeError(f"append to stream {stream_id} lost {MAX_APPEND_ATTEMPTS} races in a row")
        finally:
            self._appending -= 1
            if not self._appending:
                self._quiet.set()

    async def placed(self, prepared: Prepared) -> Prepared:
        """The command with its user's Citus shard, for a group commit batch to keep to one (on one
        server, as it is). Asked only of commands that queue: a lone append waits for nothing."""
        if self.distributed is None:
            async with self.pool.acquire() as conn:
                self.distributed = await is_distributed(conn)
            if self.distributed and self.group is not None:
                # A batch keeps to one shard: batches of different shards go side by side.
                self.group.max_in_flight = max(self.group.max_in_flight, CITUS_BATCHES_IN_FLIGHT)
                self.group.beside = 1  # a batch per shard: another shard's commands cannot wait to join one
        if not self.distributed or prepared.shard is not None:
            return prepared
        user_id = prepared.user_id
        shard = self._shards.get(user_id)  # remembered: shards split only by an operator
        if shard is None:
            async with self.pool.acquire() as conn:
                shard = int(await conn.fetchval(_SHARD_OF, user_id))
            if len(self._shards) >= 65_536:
                self._shards.clear()
            self._shards[user_id] = shard
        return msgspec.structs.replace(prepared, shard=shard)

    async def _alone(self, prepared: Prepared) -> Appended:
        async with self.pool.acquire() as conn:
            result = await append_prepared(conn, prepared, heads=self.heads)
        if not result.replayed:
            self.appended(len(result.positions))
        return result

    async def _data_key(self, stream_id: uuid.UUID, *, new_stream: bool) -> tuple[AESGCM, tuple[bytes, str] | None]:
        """`data_key`, with the keys of streams this process appended to remembered (and no
        connection taken for a new stream: an idle store sends a lone append at once)."""
        if new_stream:
            return self.keyring.new_stream_key(stream_id)
        remembered = self.keyring.writing_key(stream_id)
        if remembered is not None:
            return remembered, None
        async with self.pool.acquire() as conn:
            aead, new_key = await data_key(conn, self.keyring, stream_id, new_stream=new_stream)
        if new_key is None:
            self.keyring.remember_writing_key(stream_id, aead)
        return aead, new_key

    def forget(self, stream_id: uuid.UUID) -> None:
        """Forget what this process remembers of a stream (its head, its key): it is being erased."""
        self.heads.forget(stream_id)
        self.keyring.forget_writing_key(stream_id)

    def appended(self, count: int) -> None:
        """`count` events committed: count them and wake the listeners."""
        self.appended_events += count
        self.wake_listeners()

    def on_append(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every append of this process (in-process workers use it)."""
        self._local_listeners.append(listener)

    def wake_listeners(self) -> None:
        for listener in self._local_listeners:
            listener()
        self._notify_due = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._send_notifies())

    async def _send_notifies(self) -> None:
        while self._notify_due:
            self._notify_due = False
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            except DATABASE_UNAVAILABLE as exc:  # an outage: the API and the workers say so once
                log.debug("NOTIFY %s failed (%s); listeners will poll", NOTIFY_CHANNEL, exc)
                return
            except Exception:
                log.warning("NOTIFY %s failed; listeners will poll", NOTIFY_CHANNEL, exc_info=True)
                return
            await asyncio.sleep(self.notify_interval)

    async def aclose(self) -> None:
        """Answer every append in flight, then send the last NOTIFY."""
        await self._quiet.wait()
        if self.group is not None:
            await self.group.drain()
        if self._notifier is not None:
            await self._notifier
