"""The conversations projection: conversations and their messages, folded from the log.

An erased event (its conversation's key destroyed) folds to nothing: its conversation was
deleted in the same transaction, so the stream ends in a deletion that removes whatever rows
its earlier events made.

One projection owns both tables: a message row references its conversation, and a deletion
removes both in the same transaction, so the two must move together.

A batch is folded in memory and written with a few set-based statements: the touched
conversations are loaded once, events change them in order, then one DELETE, one upsert and one
multi-row INSERT write the result. Events of a deleted conversation that come after its deletion
change nothing (deletion is final); any other event that does not fit — a message for a
conversation that never started, a second start — is a `ProjectionError`.

Folding an event twice changes nothing: an event whose `stream_version` is at or below the
conversation row's `version` is skipped (every event that changes a conversation sets it, in
stream order, which is log order). A change of the slice layout (projections/slices.py) folds
some events a second time. One gap remains: a conversation deleted by an event of the re-folded
stretch reappears from its re-folded start until the batch that folds its deletion again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from projections.base import ProjectionError
from service.citus import is_distributed
from service.events import (
    BranchSelected,
    ConversationDeleted,
    ConversationForked,
    ConversationStarted,
    ConversationUpdated,
    MessageAppended,
    upcast_parent,
)
from service.eventstore import RecordedEvent
from service.settings import Settings

PREVIEW_CHARS: Final = 200
# How many conversations' last placed message a projection remembers (see `_placed`).
REMEMBERED_PLACES: Final = 20_000

_encode = msgspec.json.Encoder().encode


class Conversation(msgspec.Struct):
    id: uuid.UUID
    user_id: str
    title: str
    metadata: str  # JSON text, as stored
    created_at: datetime
    updated_at: datetime
    message_count: int
    last_message_preview: str | None
    version: int
    last_position: int
    active_leaf_id: uuid.UUID | None = None  # the last message of the active branch
    last_message_id: uuid.UUID | None = None  # the message appended last (a version-1 message's parent)
    forked_from_conversation: uuid.UUID | None = None
    forked_from_message: uuid.UUID | None = None


_CONVERSATION_COLUMNS = (
    "id, user_id, title, metadata::text, created_at, updated_at, message_count, "
    "last_message_preview, version, last_position, active_leaf_id, last_message_id, "
    "forked_from_conversation, forked_from_message"
)


class ConversationsProjection:
    """`search_config` is the text-search configuration of each message's `search` vector."""

    name = "conversations"
    tables: tuple[str, ...] = ("conversations", "messages")

    def __init__(self, *, search_config: str) -> None:
        self.search_config = search_config
        # conversation -> (its last message placed by this process, that message's run and depth)
        self._last_placed: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, int]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversationsProjection:
        return cls(search_config=settings.search_config)

    async def apply(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent], names: Mapping[str, str]) -> None:
        conversations, messages = names["conversations"], names["messages"]
        touched = list({e.stream_id for e in events})
        rows = await conn.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM {conversations} WHERE id = ANY($1::uuid[])", touched
        )
        state: dict[uuid.UUID, Conversation | None] = {r[0]: Conversation(*r) for r in rows}
        stored = set(state)
        live = messages == "messages"  # not a replay's shadow tables
        last_placed = self._remembered(state) if live else {}
        deleted_before = await self._deleted_before(conn, events, state)
        dirty: set[uuid.UUID] = set()
        new_messages: list[tuple[Any, ...]] = []

        for e in events:
            sid = e.stream_id
            if sid not in state and sid in deleted_before:
                continue  # deletion is final: later events of the stream change nothing
            if (conv := state.get(sid)) is not None and e.stream_version <= conv.version:
                continue  # folded before (a new slice layout starts at the old slices' oldest checkpoint)
            after, message = fold(state.get(sid), e, deleted=sid in state and state[sid] is None)
            if after is _UNCHANGED:
                continue
            state[sid] = after
            if after is None:
                dirty.discard(sid)  # a tombstone for the rest of the batch
            else:
                dirty.add(sid)
            if message is not None:
                new_messages.append(message)

        gone = [sid for sid, conv in state.items() if conv is None and sid in stored]
        if gone:
            await conn.execute(f"DELETE FROM {messages} WHERE conversation_id = ANY($1::uuid[])", gone)
            await conn.execute(f"DELETE FROM {conversations} WHERE id = ANY($1::uuid[])", gone)
        changed = [c for sid in dirty if (c := state[sid]) is not None]
        if changed:
            await conn.execute(_upsert(conversations, await is_distributed(conn)), _encode(changed).decode())
        placed = await _placed(conn, messages, new_messages, last_placed)
        kept = [m for m in placed if state[m[1]] is not None]
        if kept:
            await conn.execute(_insert_messages(messages), _message_rows(kept), self.search_config)
        if live:
            self._remember(kept, gone)

    def _remembered(self, stored: Mapping[uuid.UUID, Conversation | None]) -> dict[uuid.UUID, tuple[uuid.UUID, int]]:
        """The remembered places (message id -> run, depth) of the stored conversations' last
        messages, where the row agrees (another process may have folded the conversation since)."""
        known: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
        for sid, conv in stored.items():
            entry = self._last_placed.get(sid)
            if entry is not None and conv is not None and conv.last_message_id == entry[0]:
                known[entry[0]] = (entry[1], entry[2])
        return known

    def _remember(self, placed: Sequence[tuple[Any, ...]], gone: Sequence[uuid.UUID]) -> None:
        for m in placed:  # in order: each conversation's last one stays
            self._last_placed.pop(m[1], None)
            self._last_placed[m[1]] = (m[0], m[-1], m[-2])
        for sid in gone:
            self._last_placed.pop(sid, None)
        while len(self._last_placed) > REMEMBERED_PLACES:  # the least recently placed go first
            del self._last_placed[next(iter(self._last_placed))]

    async def erase(self, conn: asyncpg.Connection, names: Mapping[str, str]) -> None:
        await erase_rows(conn, names, None)

    async def _deleted_before(
        self,
        conn: asyncpg.Connection,
        events: Sequence[RecordedEvent],
        state: Mapping[uuid.UUID, Conversation | None],
    ) -> set[uuid.UUID]:
        """Streams without a row that were deleted before this batch (their later events are no-ops)."""
        started = {e.stream_id for e in events if isinstance(e.event, ConversationStarted | ConversationForked)}
        unknown = list({e.stream_id for e in events} - set(state) - started)
        if not unknown:
            return set()
        first = events[0]
        rows = await conn.fetch(
            "SELECT DISTINCT stream_id FROM events WHERE stream_id = ANY($1::uuid[]) "
            "AND type = 'conversation.deleted' AND (tx_id, position) < ($2::xid8, $3::bigint)",
            unknown,
            first.tx_id,
            first.position,
        )
        return {r[0] for r in rows}


async def erase_rows(
    conn: asyncpg.Connection,
    names: Mapping[str, str],
    stream_ids: Sequence[uuid.UUID] | None,
    user_id: str | None = None,
) -> None:
    """Delete the rows (search vectors with them) of these conversations of `user_id`, or, for
    None, of every conversation in the erasure ledger."""
    messages, conversations = names["messages"], names["conversations"]
    if stream_ids is None:
        await conn.execute(
            f"DELETE FROM {messages} WHERE (user_id, conversation_id) IN (SELECT user_id, stream_id FROM erasures)"
        )
        await conn.execute(
            f"DELETE FROM {conversations} WHERE (user_id, id) IN (SELECT user_id, stream_id FROM erasures)"
        )
    else:
        ids = list(stream_ids)
        await conn.execute(
            f"DELETE FROM {messages} WHERE user_id = $2 AND conversation_id = ANY($1::uuid[])", ids, user_id
        )
        await conn.execute(f"DELETE FROM {conversations} WHERE user_id = $2 AND id = ANY($1::uuid[])", ids, user_id)


async def _placed(
    conn: asyncpg.Connection,
    table: str,
    new: list[tuple[Any, ...]],
    last_placed: Mapping[uuid.UUID, tuple[uuid.UUID, int]],
) -> list[tuple[Any, ...]]:
    """The new message rows with their place in the conversation's tree: `depth` (1 for a first
    message) and `run`, the first message of the chain it continues. A message continues its
    parent's run when it is the parent's first child, and starts a run of its own otherwise, so
    that a branch (the path from a first message to a leaf) is a few runs, each a range of depths
    on one index (`messages_run_depth`), however deep the tree.

    A parent is looked up in `table` unless it is in `last_placed` (id -> run, depth):
    stored conversations' last messages, as this process placed them. A conversation's last
    message has no child yet, and a row's run and depth never change, so most messages (those
    that follow the last one) need no lookup."""
    if not new:
        return new
    ids = {m[0] for m in new}
    known: dict[uuid.UUID, list[Any]] = {  # id -> [run, depth, has a child]
        message_id: [run, depth, False] for message_id, (run, depth) in last_placed.items()
    }
    parents = list({m[9] for m in new if m[9] is not None and m[9] not in ids and m[9] not in known})
    if parents:
        rows = await conn.fetch(
            # A first child always continues its parent's run: "has a child" is a probe of the
            # unique messages_run_depth (which a replay's shadow tables keep too).
            f"SELECT p.id, p.run, p.depth, "
            f"EXISTS (SELECT FROM {table} AS c "
            f"WHERE c.user_id = p.user_id AND c.run = p.run AND c.depth = p.depth + 1) "
            f"FROM {table} AS p WHERE p.id = ANY($1::uuid[])",
            parents,
        )
        known.update((r[0], [r[1], r[2], r[3]]) for r in rows)
    placed = []
    for m in new:
        message_id, parent_id = m[0], m[9]
        if parent_id is None:
            run, depth = message_id, 1
        else:
            parent = known.get(parent_id)
            if parent is None:
                raise ProjectionError(
                    m[8], f"message {message_id} follows {parent_id}, which is not in its conversation"
                )
            run = message_id if parent[2] else parent[0]
            depth = parent[1] + 1
            parent[2] = True
        known[message_id] = [run, depth, False]
        placed.append((*m, depth, run))
    return placed


_UNCHANGED: Final = object()


def fold(conv: Conversation | None, e: RecordedEvent, *, deleted: bool = False) -> tuple[Any, tuple[Any, ...] | None]:
    """One event applied to its conversation's state (None: none yet, or `deleted`).

    Returns the new state (None once deleted, or `_UNCHANGED` for an event after the deletion)
    and, for a message, the message row. Changes `conv` in place. The projection and the write
    side (which answers from the log, not the read tables) both fold with it.
    """
    event, sid = e.event, e.stream_id
    if deleted or event is None:
        return _UNCHANGED, None  # deletion is final; an erased event folds to nothing
    if conv is None and isinstance(event, ConversationDeleted):
        return None, None  # an erased conversation's deletion (its start folded to nothing)
    if isinstance(event, ConversationStarted | ConversationForked):
        if conv is not None:
            raise ProjectionError(e.position, f"conversation {sid} started twice")
        source = event if isinstance(event, ConversationForked) else None
        return Conversation(
            id=sid,
            user_id=e.user_id,
            title=event.title,
            metadata=_encode(event.metadata).decode(),
            created_at=e.recorded_at,
            updated_at=e.recorded_at,
            message_count=0,
            last_message_preview=None,
            version=e.stream_version,
            last_position=e.position,
            forked_from_conversation=source.source_conversation_id if source else None,
            forked_from_message=source.source_message_id if source else None,
        ), None
    if conv is None:
        raise ProjectionError(e.position, f"{e.type} for conversation {sid}, which never started")
    message = None
    if isinstance(event, MessageAppended):
        conv.message_count += 1
        if event.seq is not None and event.seq != conv.message_count:
            raise ProjectionError(
                e.position, f"message seq {event.seq} in conversation {sid}, expected {conv.message_count}"
            )
        conv.last_message_preview = event.content[:PREVIEW_CHARS]
        parent = upcast_parent(event, e.schema_version, conv.last_message_id)
        conv.last_message_id = conv.active_leaf_id = event.message_id
        message = (
            event.message_id,
            sid,
            e.user_id,
            conv.message_count,
            event.role,
            event.content,
            _encode(event.metadata).decode(),
            e.recorded_at,
            e.position,
            parent,
        )
    elif isinstance(event, BranchSelected):
        conv.active_leaf_id = event.leaf_id
    elif isinstance(event, ConversationUpdated):
        if event.title is not None:
            conv.title = event.title
        if event.metadata is not None:
            conv.metadata = _encode(event.metadata).decode()
    elif isinstance(event, ConversationDeleted):
        return None, None
    conv.updated_at = e.recorded_at
    conv.version = e.stream_version
    conv.last_position = e.position
    return conv, message


def parents_of(events: Sequence[RecordedEvent]) -> dict[uuid.UUID, tuple[RecordedEvent, uuid.UUID | None]]:
    """Each message of a stream's events, with its parent (a version-1 message follows the message
    appended before it)."""
    parents: dict[uuid.UUID, tuple[RecordedEvent, uuid.UUID | None]] = {}
    previous: uuid.UUID | None = None
    for e in events:
        if isinstance(e.event, MessageAppended):
            parents[e.event.message_id] = (e, upcast_parent(e.event, e.schema_version, previous))
            previous = e.event.message_id
    return parents


def branch(
    events: Sequence[RecordedEvent],
    leaf: uuid.UUID,
    parents: dict[uuid.UUID, tuple[RecordedEvent, uuid.UUID | None]] | None = None,
) -> list[RecordedEvent]:
    """The messages of the branch that ends at `leaf`, first message first, from a stream's events
    (or their `parents_of`, when the caller has it); empty if `leaf` is none of its messages."""
    parents = parents_of(events) if parents is None else parents
    path: list[RecordedEvent] = []
    at: uuid.UUID | None = leaf
    while at is not None and at in parents:
        e, at = parents[at]
        path.append(e)
    return path[::-1]


def fold_stream(events: Sequence[RecordedEvent]) -> Conversation | None:
    """A conversation's state from its whole stream (None if deleted or never started)."""
    conv: Conversation | None = None
    deleted = False
    for e in events:
        after, _ = fold(conv, e, deleted=deleted)
        if after is _UNCHANGED:
            continue
        conv, deleted = after, after is None
    return conv


_CONVERSATION_RECORD = (
    "id uuid, user_id text, title text, metadata text, created_at timestamptz, updated_at timestamptz, "
    "message_count integer, last_message_preview text, version integer, last_position bigint, "
    "active_leaf_id uuid, last_message_id uuid, forked_from_conversation uuid, forked_from_message uuid"
)


def _upsert(table: str, distributed: bool) -> str:
    """The upsert of conversation rows, given as one JSON array of `Conversation` objects; on
    Citus their key includes `user_id` (service/citus.py).

    The rows of a batch's statements go as one JSON text, not as an array per column: the client
    encodes them in one call (msgspec) instead of element by element (see _insert_messages)."""
    key = "user_id, id" if distributed else "id"
    return f"""
    INSERT INTO {table} (id, user_id, title, metadata, created_at, updated_at, message_count,
                         last_message_preview, version, last_position, active_leaf_id, last_message_id,
                         forked_from_conversation, forked_from_message)
    SELECT id, user_id, title, metadata::jsonb, created_at, updated_at, message_count,
           last_message_preview, version, last_position, active_leaf_id, last_message_id,
           forked_from_conversation, forked_from_message
    FROM json_to_recordset($1::json) AS c({_CONVERSATION_RECORD})
    ON CONFLICT ({key}) DO UPDATE SET
        title = excluded.title, metadata = excluded.metadata, updated_at = excluded.updated_at,
        message_count = excluded.message_count, last_message_preview = excluded.last_message_preview,
        version = excluded.version, last_position = excluded.last_position,
        active_leaf_id = excluded.active_leaf_id, last_message_id = excluded.last_message_id
    """


def owner_lexeme(user_id_sql: str) -> str:
    """SQL for the lexeme that marks a message's owner in its search vector.

    A search then asks the text index for (query AND owner) in one scan, and PostgreSQL's GIN
    fast scan walks the owner's entries and skips through a common word's long posting list,
    instead of reading a word found in a third of all users' messages in full. A leading space
    keeps it apart from every word the parser can produce; the id in hex needs no quoting and
    two ids never share a lexeme (the search still checks `user_id` itself as well).
    """
    return f"' u:' || encode(convert_to({user_id_sql}, 'UTF8'), 'hex')"


def search_vector(config_sql: str, content_sql: str, user_id_sql: str) -> str:
    """SQL for a message's search vector: its words in `config_sql`, and its owner.

    `<` is read as a space: PostgreSQL's parser takes `<String>` in `Vec<String>`, or `<b>`, for
    an HTML tag and leaves out the word in it, and chat is full of code. (Queries need no such
    care: the query parser does not read tags.)"""
    words = f"to_tsvector({config_sql}, translate({content_sql}, '<', ' '))"
    return f"{words} || array_to_tsvector(ARRAY[{owner_lexeme(user_id_sql)}])"


class _MessageRow(msgspec.Struct):
    """A message row as `_insert_messages` reads it (its search vector is computed there)."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    user_id: str
    seq: int
    role: str
    content: str
    metadata: msgspec.Raw  # JSON text, as it goes into the jsonb column
    created_at: datetime
    position: int
    parent_id: uuid.UUID | None
    depth: int
    run: uuid.UUID


def _message_rows(placed: Sequence[tuple[Any, ...]]) -> str:
    """`_insert_messages`' rows: the placed message tuples as one JSON array of objects."""
    return _encode(
        [
            _MessageRow(m[0], m[1], m[2], m[3], m[4], m[5], msgspec.Raw(m[6]), m[7], m[8], m[9], m[10], m[11])
            for m in placed
        ]
    ).decode()


def _insert_messages(table: str) -> str:
    """The insert of a batch's message rows, given as one JSON array (`_message_rows`).

    Measured beside one array per column (12 columns, 170 rows a statement, as under load): the
    client spent 2.3 instead of 8 us per row (asyncpg's per-element encoding, and its check of each
    element against an abstract base class, gone), the server 3 to 4.5 us more (it parses the
    text): less CPU in all, and less of it in the API process, where the projection runs beside
    the requests."""
    return f"""
    INSERT INTO {table} (id, conversation_id, user_id, seq, role, content, metadata, created_at, position,
                         parent_id, depth, run, search)
    SELECT id, conversation_id, user_id, seq, role, content, metadata, created_at, position,
           parent_id, depth, run, {search_vector("$2::regconfig", "content", "user_id")}
    FROM json_to_recordset($1::json)
         AS m(id uuid, conversation_id uuid, user_id text, seq integer, role text, content text, metadata jsonb,
              created_at timestamptz, position bigint, parent_id uuid, depth integer, run uuid)
    """
