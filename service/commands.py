"""Commands: decide which events a request appends, append them, and build the answer.

Decisions read the log itself (the stream's head, its last message's seq), never the read tables,
which may lag. Appends to an existing conversation always carry an expected version (the
client's, or the head just read): a concurrent change makes the append conflict, and without a
client's expected version the command reads the head again and retries. Answers are built from
the stored events, so an idempotent retry answers exactly what the first request did.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg
import msgspec

from projections.conversations import Conversation as ConversationState
from projections.conversations import fold_stream
from service import erasure, shapes
from service.errors import BadRequest, ConversationExists
from service.events import BranchSelected, ConversationStarted, ConversationUpdated, Event, MessageAppended
from service.eventstore import (
    Appended,
    EventStore,
    NotFound,
    RecordedEvent,
    VersionConflict,
    prior_command,
    read_positions,
    read_stream,
)
from service.ids import uuid7

MAX_RETRIES: Final = 50

_STATE = """
SELECT head.stream_version, head.user_id, head.type,
       (SELECT (m.data->>'seq')::integer FROM events AS m
        WHERE m.user_id = $2 AND m.stream_id = $1 AND m.type = 'message.appended'
        ORDER BY m.stream_version DESC LIMIT 1) AS last_seq,
       (SELECT coalesce(l.data->>'leaf_id', l.data->>'message_id')::uuid FROM events AS l
        WHERE l.user_id = $2 AND l.stream_id = $1 AND l.type IN ('message.appended', 'branch.selected')
        ORDER BY l.stream_version DESC LIMIT 1) AS leaf
FROM (SELECT stream_version, user_id, type FROM events WHERE user_id = $2 AND stream_id = $1
      ORDER BY stream_version DESC LIMIT 1) AS head
"""

# Whether a message is one of the stream's (the log's own index of message ids).
_MESSAGE_OF = """
SELECT EXISTS (SELECT 1 FROM events WHERE (data->>'message_id')::uuid = $2 AND type = 'message.appended'
               AND stream_id = $1 AND user_id = $3)
"""


class ConversationHeads:
    """The last committed (owner, version, last message seq, active leaf) of conversations this process wrote.

    A message is appended at the remembered version without reading the log first. Any change
    to a conversation, by any process (a deletion too), moves its version on, so a stale memory
    makes the append conflict; the command then forgets it, reads the log and decides again.
    """

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._heads: dict[uuid.UUID, tuple[str, int, int, uuid.UUID | None]] = {}

    def get(self, conversation_id: uuid.UUID) -> tuple[str, int, int, uuid.UUID | None] | None:
        return self._heads.get(conversation_id)

    def remember(
        self, conversation_id: uuid.UUID, owner: str, version: int, last_seq: int, leaf: uuid.UUID | None
    ) -> None:
        self._heads.pop(conversation_id, None)
        self._heads[conversation_id] = (owner, version, last_seq, leaf)
        if len(self._heads) > self.size:
            del self._heads[next(iter(self._heads))]

    def forget(self, conversation_id: uuid.UUID) -> None:
        self._heads.pop(conversation_id, None)


class Idempotency:
    """The Idempotency-Key of a request and the fingerprint of what it asked."""

    def __init__(self, key: str | None, fingerprint: bytes) -> None:
        self.key = key
        self.fingerprint = fingerprint


def request_fingerprint(method: str, path: str, body: msgspec.Struct) -> bytes:
    """What a request asked, to recognise a reused Idempotency-Key: the method, the path and the
    decoded body (the same JSON spelled differently is the same request). HTTP and MCP share it,
    so one key names one request either way."""
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(msgspec.json.encode(body))
    return digest.digest()


async def _live_head(
    conn: asyncpg.Connection, user_id: str, conversation_id: uuid.UUID
) -> tuple[int, int, uuid.UUID | None]:
    """(version, last message seq, active leaf) of the user's live conversation; NotFound otherwise."""
    row = await conn.fetchrow(_STATE, conversation_id, user_id)
    if row is None or row["user_id"] != user_id or row["type"] == "conversation.deleted":
        raise NotFound(str(conversation_id))
    return row["stream_version"], row["last_seq"] or 0, row["leaf"]


async def check_message_of(
    store: EventStore, user_id: str, conversation_id: uuid.UUID, message_id: uuid.UUID, field: str
) -> None:
    """422 unless `message_id` is a message of the user's conversation (checked in the log)."""
    async with store.pool.acquire() as conn:
        if not await conn.fetchval(_MESSAGE_OF, conversation_id, message_id, user_id):
            raise BadRequest(f"{field} is not a message of this conversation", field=field)


async def prior_answer(
    store: EventStore, user_id: str, idempotency: Idempotency
) -> tuple[Appended, list[RecordedEvent]] | None:
    if idempotency.key is None:
        return None
    async with store.pool.acquire() as conn:
        prior = await prior_command(conn, user_id, idempotency.key, idempotency.fingerprint)
        if prior is None:
            return None
        return prior, await read_positions(conn, store.keyring, user_id, prior.positions)


async def stored_events(store: EventStore, user_id: str, result: Appended) -> list[RecordedEvent]:
    async with store.pool.acquire() as conn:
        return await read_positions(conn, store.keyring, user_id, result.positions)


def conversation_view(
    state: ConversationState, position: int | msgspec.UnsetType = msgspec.UNSET
) -> shapes.Conversation:
    return shapes.Conversation(
        id=state.id,
        title=state.title,
        metadata=msgspec.json.decode(state.metadata),
        created_at=shapes.timestamp(state.created_at),
        updated_at=shapes.timestamp(state.updated_at),
        message_count=state.message_count,
        last_message_preview=state.last_message_preview,
        version=state.version,
        active_leaf_id=state.active_leaf_id,
        forked_from=None
        if state.forked_from_conversation is None or state.forked_from_message is None
        else shapes.ForkedFrom(conversation_id=state.forked_from_conversation, message_id=state.forked_from_message),
        position=position,
    )


def message_view(
    event: Event | None,
    conversation_id: uuid.UUID,
    position: int,
    recorded_at: datetime,
    parent_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET,
) -> shapes.Message:
    """The message a `message.appended` event recorded, at the position it was stored (NotFound
    when it was erased since: its conversation was deleted meanwhile); `parent_id`, when the
    caller knows it better (a version-1 event's, upcast from its stream)."""
    if not isinstance(event, MessageAppended) or event.seq is None:
        raise NotFound(str(conversation_id))
    return shapes.Message(
        id=event.message_id,
        conversation_id=conversation_id,
        seq=event.seq,
        role=event.role,
        content=event.content,
        metadata=event.metadata,
        created_at=shapes.timestamp(recorded_at),
        position=position,
        parent_id=event.parent_id if parent_id is msgspec.UNSET else parent_id,
    )


def stored_message_view(recorded: RecordedEvent) -> shapes.Message:
    return message_view(recorded.event, recorded.stream_id, recorded.position, recorded.recorded_at)


async def create_conversation(
    store: EventStore,
    heads: ConversationHeads,
    user_id: str,
    body: shapes.ConversationCreate,
    idempotency: Idempotency,
) -> tuple[shapes.Conversation, bool]:
    """The new conversation (as of its creation) and whether this answer is a replay."""
    replay = await prior_answer(store, user_id, idempotency)
    if replay is None:
        try:
            result = await store.append(
                user_id,
                body.id or uuid7(),
                [ConversationStarted(title=body.title, metadata=body.metadata)],
                expected_version=0,
                idempotency_key=idempotency.key,
                fingerprint=idempotency.fingerprint,
            )
        except (VersionConflict, NotFound):
            raise ConversationExists(str(body.id)) from None
        heads.remember(result.stream_id, user_id, result.version, 0, None)
        replay = result, await stored_events(store, user_id, result)
    result, events = replay
    state = fold_stream(events)
    if state is None:  # erased since (deleted meanwhile)
        raise NotFound(str(result.stream_id))
    return conversation_view(state, result.position), result.replayed


async def append_message(
    store: EventStore,
    heads: ConversationHeads,
    user_id: str,
    conversation_id: uuid.UUID,
    body: shapes.MessageCreate,
    idempotency: Idempotency,
) -> tuple[shapes.Message, bool]:
    replay = await prior_answer(store, user_id, idempotency)
    if replay is not None:
        return stored_message_view(replay[1][0]), True
    expected = body.expected_version
    parent_checked = False
    for _ in range(MAX_RETRIES):
        known = heads.get(conversation_id)
        if known is not None and known[0] != user_id:
            raise NotFound(str(conversation_id))  # owners never change
        remembered = known is not None and (expected is None or expected == known[1])
        if known is not None and remembered:
            version, last_seq, leaf = known[1], known[2], known[3]
        else:
            async with store.pool.acquire() as conn:
                version, last_seq, leaf = await _live_head(conn, user_id, conversation_id)
            heads.remember(conversation_id, user_id, version, last_seq, leaf)
            if expected is not None and expected != version:
                raise VersionConflict(expected, version)
        asked = body.parent_id
        if isinstance(asked, uuid.UUID) and asked != leaf and not parent_checked:
            await check_message_of(store, user_id, conversation_id, asked, "parent_id")
            parent_checked = True  # messages are never removed from a live conversation
        parent = leaf if asked is msgspec.UNSET else asked  # without one, it follows the active leaf
        event = MessageAppended(
            message_id=uuid7(),
            role=body.role,
            content=body.content,
            metadata=body.metadata,
            seq=last_seq + 1,
            parent_id=parent,
        )
        try:
            result = await store.append(
                user_id,
                conversation_id,
                [event],
                expected_version=version,
                idempotency_key=idempotency.key,
                fingerprint=idempotency.fingerprint,
            )
        except VersionConflict:
            heads.forget(conversation_id)
            if expected is not None and not remembered:
                raise  # the client's version, checked against the log just now, is stale
            continue  # the remembered head was stale, or another append came first: read the log again
        if result.replayed:  # a concurrent retry with the same key won
            return stored_message_view((await stored_events(store, user_id, result))[0]), True
        heads.remember(conversation_id, user_id, result.version, last_seq + 1, event.message_id)
        return message_view(event, conversation_id, result.position, result.recorded_at), False
    raise VersionConflict(expected or 0, -1)


async def _change(
    store: EventStore,
    heads: ConversationHeads,
    user_id: str,
    conversation_id: uuid.UUID,
    events: Sequence[Event],
    expected: int | None,
) -> Appended:
    """Append a change to the user's live conversation, read from the log (changes are rare)."""
    heads.forget(conversation_id)
    for _ in range(MAX_RETRIES):
        async with store.pool.acquire() as conn:
            version, _, _ = await _live_head(conn, user_id, conversation_id)
        if expected is not None and expected != version:
            raise VersionConflict(expected, version)
        try:
            return await store.append(user_id, conversation_id, events, expected_version=version)
        except VersionConflict:
            if expected is not None:
                raise
    raise VersionConflict(expected or 0, -1)


async def update_conversation(
    store: EventStore,
    heads: ConversationHeads,
    user_id: str,
    conversation_id: uuid.UUID,
    body: shapes.ConversationPatch,
) -> shapes.Conversation:
    if body.title is None and body.metadata is None and body.active_leaf_id is None:
        raise BadRequest("give a title, metadata, active_leaf_id, or several")
    events: list[Event] = []
    if body.title is not None or body.metadata is not None:
        events.append(ConversationUpdated(title=body.title, metadata=body.metadata))
    if body.active_leaf_id is not None:
        async with store.pool.acquire() as conn:
            await _live_head(conn, user_id, conversation_id)  # 404 before 422
        await check_message_of(store, user_id, conversation_id, body.active_leaf_id, "active_leaf_id")
        events.append(BranchSelected(leaf_id=body.active_leaf_id))
    result = await _change(store, heads, user_id, conversation_id, events, body.expected_version)
    async with store.pool.acquire() as conn:
        state = fold_stream(await read_stream(conn, store.keyring, user_id, conversation_id))
    if state is None:  # deleted right after the update
        raise NotFound(str(conversation_id))
    return conversation_view(state, result.position)


async def delete_conversation(
    store: EventStore, heads: ConversationHeads, user_id: str, conversation_id: uuid.UUID, expected_version: int | None
) -> int:
    """Delete and erase the conversation (service/erasure.py); the position of its deletion."""
    heads.forget(conversation_id)
    store.forget(conversation_id)
    async with store.pool.acquire() as conn:
        position = await erasure.erase_conversation(conn, user_id, conversation_id, expected_version)
    store.appended(1)
    return position


async def erase_user(store: EventStore, user_id: str) -> int:
    """Erase everything of the user (DELETE /v1/me); the position of the erasure."""
    erased: list[uuid.UUID] = []
    async with store.pool.acquire() as conn:
        position = await erasure.erase_user(conn, user_id, erased)
    for stream_id in erased:
        store.forget(stream_id)
    store.appended(1)
    return position
