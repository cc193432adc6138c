"""Time travel and forks (API.md): both read a conversation's own stream from the log and fold
it, never the read tables. `as_of` folds it up to a position; a fork copies one of its branches
into a new conversation (new ids, `seq` from 1), started by `conversation.forked`.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

import msgspec

from projections.conversations import Conversation, branch, fold_stream, parents_of
from service import shapes
from service.commands import (
    ConversationHeads,
    Idempotency,
    conversation_view,
    message_view,
    prior_answer,
    stored_events,
)
from service.connections import ConnectionPool
from service.errors import BadRequest
from service.events import ConversationForked, MessageAppended
from service.eventstore import EventStore, NotFound, RecordedEvent, read_stream
from service.ids import uuid7
from service.sealing import Keyring

MAX_FORK_MESSAGES: Final = 10_000


async def _stream(store: EventStore, user_id: str, conversation_id: uuid.UUID) -> list[RecordedEvent]:
    async with store.pool.acquire() as conn:
        return await read_stream(conn, store.keyring, user_id, conversation_id)


_HEAD_TYPE = "SELECT type FROM events WHERE stream_id = $1 AND user_id = $2 ORDER BY stream_version DESC LIMIT 1"


async def _as_of(
    pool: ConnectionPool, keyring: Keyring, user_id: str, conversation_id: uuid.UUID, position: int
) -> tuple[Conversation, list[RecordedEvent]]:
    """The conversation and its events once every event at or before `position` was applied (only
    those are read and opened); 404 if it did not exist yet, or is deleted now (its content erased).
    `pool` is the read routes' (a replica's, README): the caller waited for its own writes there."""
    async with pool.acquire() as conn:
        if await conn.fetchval(_HEAD_TYPE, conversation_id, user_id) in (None, "conversation.deleted"):
            raise NotFound(str(conversation_id))
        upto = await read_stream(conn, keyring, user_id, conversation_id, until_position=position)
    state = fold_stream(upto)
    if state is None:
        raise NotFound(str(conversation_id))
    return state, upto


async def conversation_as_of(
    pool: ConnectionPool, keyring: Keyring, user_id: str, conversation_id: uuid.UUID, position: int
) -> shapes.Conversation:
    state, _ = await _as_of(pool, keyring, user_id, conversation_id, position)
    return conversation_view(state)


async def messages_as_of(
    pool: ConnectionPool,
    keyring: Keyring,
    user_id: str,
    conversation_id: uuid.UUID,
    position: int,
    *,
    limit: int,
    descending: bool,
    leaf_id: uuid.UUID | None,
    tree: bool,
    after: list[Any] | None,
) -> tuple[list[shapes.Message], list[Any] | None]:
    """A page of the conversation's messages as they were at `position`: the branch that was
    active then (or ends at `leaf_id`), or the whole tree; the keyset is the index in that list."""
    state, upto = await _as_of(pool, keyring, user_id, conversation_id, position)
    parents = parents_of(upto)
    if tree:
        listed = [e for e in upto if isinstance(e.event, MessageAppended)]
    else:
        leaf = leaf_id or state.active_leaf_id
        if leaf_id is not None and leaf_id not in parents:
            raise BadRequest("leaf_id is not a message of this conversation at that position", field="leaf_id")
        listed = branch(upto, leaf, parents) if leaf is not None else []
    if descending:
        listed = listed[::-1]
    start = 0
    if after is not None:
        if len(after) != 1 or type(after[0]) is not int or not 0 <= after[0] <= len(listed):
            raise BadRequest("the cursor is not valid", field="cursor")
        start = after[0]
    chosen = listed[start : start + limit]
    page = [
        message_view(e.event, e.stream_id, e.position, e.recorded_at, parents[e.event.message_id][1])
        for e in chosen
        if isinstance(e.event, MessageAppended)
    ]
    return page, ([start + limit] if start + limit < len(listed) else None)


async def fork(
    store: EventStore,
    heads: ConversationHeads,
    user_id: str,
    conversation_id: uuid.UUID,
    body: shapes.ForkCreate,
    idempotency: Idempotency,
) -> tuple[shapes.Conversation, bool]:
    """A new conversation holding copies of the branch that ends at `body.message_id` (default:
    the active leaf); the copies are the fork's own (sealed under its key), so deleting either
    conversation leaves the other whole."""
    replay = await prior_answer(store, user_id, idempotency)
    if replay is None:
        events = await _stream(store, user_id, conversation_id)
        source = fold_stream(events)
        if source is None:
            raise NotFound(str(conversation_id))
        leaf = body.message_id or source.active_leaf_id
        path = branch(events, leaf) if leaf is not None else []
        if not path:
            field = "message_id"
            raise BadRequest(
                "message_id is not a message of this conversation"
                if body.message_id is not None
                else "the conversation has no message to fork from",
                field=field,
            )
        if len(path) > MAX_FORK_MESSAGES:
            raise BadRequest(f"a fork copies at most {MAX_FORK_MESSAGES} messages", field="message_id")
        assert leaf is not None
        copies: list[Any] = [
            ConversationForked(
                source_conversation_id=conversation_id,
                source_message_id=leaf,
                title=source.title if body.title is None else body.title,
                metadata=msgspec.json.decode(source.metadata),
            )
        ]
        parent: uuid.UUID | None = None
        for seq, e in enumerate(path, start=1):
            original = e.event
            assert isinstance(original, MessageAppended)
            copy = MessageAppended(
                message_id=uuid7(),
                role=original.role,
                content=original.content,
                metadata=original.metadata,
                seq=seq,
                parent_id=parent,
            )
            copies.append(copy)
            parent = copy.message_id
        result = await store.append(
            user_id,
            uuid7(),
            copies,
            expected_version=0,
            idempotency_key=idempotency.key,
            fingerprint=idempotency.fingerprint,
        )
        if not result.replayed:  # a concurrent retry's copies are not these
            heads.remember(result.stream_id, user_id, result.version, len(path), parent)
        replay = result, await stored_events(store, user_id, result)
    result, stored = replay
    state = fold_stream(stored)
    if state is None:
        raise NotFound(str(result.stream_id))
    return conversation_view(state, result.position), result.replayed
