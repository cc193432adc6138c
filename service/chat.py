"""A chat turn: store the user's message, ask the assistant with the history from the log, store
the reply.

Turns on one conversation run one at a time, across processes: a turn holds a PostgreSQL
advisory lock on its conversation (on a connection of a small pool of its own) from before the
user's message is appended until the reply is. Two chats at once therefore never interleave
(user, user, assistant, assistant) and each prompt holds every earlier turn.

The reply is appended once, complete, after the assistant has finished; an assistant that fails
leaves the user's message stored and nothing else. With an Idempotency-Key the user's message
carries the key, and the reply a key derived from it (`reply_key`), both with the request's
fingerprint, so a retry finds the stored turn and does not call the assistant again; a retry of a
turn whose assistant failed asks the assistant again, once the user's message is found stored.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final

import msgspec

from projections.conversations import branch, fold_stream
from service import commands, shapes
from service.assistants import Assistant, AssistantError, Prompt, PromptMessage
from service.connections import ConnectionPool
from service.errors import BadRequest
from service.events import Content, ConversationStarted, EventValidationError, MessageAppended
from service.eventstore import EventStore, NotFound, RecordedEvent, prior_command, read_stream
from service.ids import uuid7
from service.settings import Settings

TITLE_CHARS: Final = 200
_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    message: Content | None = None  # required, unless regenerate_id is given
    conversation_id: uuid.UUID | None = None
    stream: bool = False
    # An edit: the user's message follows this message (null: none, a first message) instead of
    # the active leaf; the prompt is that new branch.
    parent_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    # Ask again for this assistant reply: the new reply is its sibling (no `message`).
    regenerate_id: uuid.UUID | None = None


class ChatAnswer(msgspec.Struct, kw_only=True):
    conversation: shapes.Conversation
    messages: list[shapes.Message]  # [the user's, the assistant's]
    position: int


class Chat:
    """What a chat turn needs, made once per app."""

    def __init__(self, settings: Settings, store: EventStore, heads: commands.ConversationHeads, assistant: Assistant):
        assert settings.database_url
        self.store, self.heads, self.assistant = store, heads, assistant
        self.max_messages = settings.chat_history_messages or None  # None: no cap
        self.max_chars = settings.chat_history_chars or None
        self.locks = ConnectionPool(settings.database_url, size=settings.chat_concurrency)

    async def aclose(self) -> None:
        await self.locks.close()
        await self.assistant.aclose()

    @asynccontextmanager
    async def turn_lock(self, conversation_id: uuid.UUID) -> AsyncIterator[None]:
        """This conversation's turn, across processes. A connection lost or a task cancelled while
        holding it is closed by the pool, which ends the lock with the session."""
        key = f"chat:{conversation_id}"
        async with self.locks.acquire() as conn:
            await conn.execute(_LOCK, key)
            try:
                yield
            finally:
                await conn.execute(_UNLOCK, key)


def reply_key(key: str) -> str:
    """The Idempotency-Key of a turn's reply: printable ASCII, as any key, within 255 characters."""
    return "chat-reply:" + hashlib.sha256(key.encode()).hexdigest()


def title_from(message: str) -> str:
    """A new conversation's title: the message's first non-blank line, cut at a word near 200."""
    line = next((s.strip() for s in message.splitlines() if s.strip()), "")
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[: TITLE_CHARS - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > TITLE_CHARS // 2 else cut).rstrip() + "…"


def prompt_from(events: Sequence[RecordedEvent], max_messages: int | None, max_chars: int | None) -> Prompt:
    """The conversation's messages for the assistant: all of them, or, with caps, every system
    message, then the newest others while both caps allow (the newest one always)."""
    messages = [PromptMessage(e.event.role, e.event.content) for e in events if isinstance(e.event, MessageAppended)]
    if max_messages is None and max_chars is None:
        return Prompt(messages=messages, conversation_messages=len(messages))
    max_messages = len(messages) if max_messages is None else max_messages
    max_chars = sum(len(m.content) for m in messages) if max_chars is None else max_chars
    system = [m for m in messages if m.role == "system"]
    budget_messages = max_messages - len(system)
    budget_chars = max_chars - sum(len(m.content) for m in system)
    newest: list[PromptMessage] = []
    for m in reversed([m for m in messages if m.role != "system"]):
        if newest and (budget_messages < 1 or budget_chars < len(m.content)):
            break
        newest.append(m)
        budget_messages -= 1
        budget_chars -= len(m.content)
    kept = set(map(id, newest)) | set(map(id, system))
    return Prompt(messages=[m for m in messages if id(m) in kept], conversation_messages=len(messages))


async def chat(
    chat: Chat,
    user_id: str,
    body: ChatRequest,
    idempotency: commands.Idempotency,
    on_delta: Callable[[str], None] | None = None,
) -> tuple[ChatAnswer, bool]:
    """One turn; the answer and whether it is a replay of a stored one. With `on_delta` the
    assistant streams and each piece of its reply is passed on as it comes."""
    store, key = chat.store, idempotency.key
    _check(body)
    if body.regenerate_id is not None:
        assert body.conversation_id is not None
        async with chat.turn_lock(body.conversation_id):
            question = await _regenerated(store, user_id, body.conversation_id, body.regenerate_id)
            try:
                return await _reply(chat, user_id, body.conversation_id, question, idempotency, on_delta)
            except AssistantError as exc:
                exc.conversation_id, exc.position = body.conversation_id, question
                raise
    assert body.message is not None
    asked: int | None = None  # the position of the user's message, once stored
    if key is not None:
        async with store.pool.acquire() as conn:
            prior = await prior_command(conn, user_id, key, idempotency.fingerprint)
            if prior is None:  # the key of a regenerate (stored as its reply's only): another body
                await prior_command(conn, user_id, reply_key(key), idempotency.fingerprint)
        if prior is not None:
            asked, conversation_id = prior.position, prior.stream_id
    if asked is None:
        if body.conversation_id is None:
            conversation_id = uuid7()
            result = await store.append(
                user_id,
                conversation_id,
                [
                    ConversationStarted(title=title_from(body.message), metadata={}),
                    MessageAppended(message_id=uuid7(), role="user", content=body.message, metadata={}, seq=1),
                ],
                expected_version=0,
                idempotency_key=key,
                fingerprint=idempotency.fingerprint,
            )
            # Nobody knows the new id yet, so the user's message could go in before the lock is
            # held; a concurrent retry that started the conversation first is joined here.
            asked, conversation_id = result.position, result.stream_id
        else:
            conversation_id = body.conversation_id
    async with chat.turn_lock(conversation_id):
        if asked is None:
            message = shapes.MessageCreate(role="user", content=body.message, parent_id=body.parent_id)
            stored, _ = await commands.append_message(store, chat.heads, user_id, conversation_id, message, idempotency)
            asked = stored.position
        try:
            return await _reply(chat, user_id, conversation_id, asked, idempotency, on_delta)
        except AssistantError as exc:
            exc.conversation_id, exc.position = conversation_id, asked
            raise


def _check(body: ChatRequest) -> None:
    if body.regenerate_id is not None:
        if body.conversation_id is None:
            raise BadRequest("regenerate_id needs the conversation_id", field="conversation_id")
        if body.message is not None or body.parent_id is not msgspec.UNSET:
            raise BadRequest("give a message or regenerate_id, not both", field="regenerate_id")
    elif body.message is None:
        raise BadRequest("give a message (or regenerate_id)", field="message")
    elif body.conversation_id is None and body.parent_id is not msgspec.UNSET:
        raise BadRequest("parent_id needs the conversation_id", field="parent_id")


async def _regenerated(store: EventStore, user_id: str, conversation_id: uuid.UUID, reply_id: uuid.UUID) -> int:
    """The position of the message the reply `reply_id` answered (its parent), read from the log;
    422 unless it names an assistant reply of this conversation that follows a message."""
    async with store.pool.acquire() as conn:
        history = await read_stream(conn, store.keyring, user_id, conversation_id)
    if fold_stream(history) is None:
        raise NotFound(str(conversation_id))
    path = branch(history, reply_id)
    if len(path) < 2 or not isinstance(path[-1].event, MessageAppended) or path[-1].event.role != "assistant":
        raise BadRequest("regenerate_id is not an assistant reply of this conversation", field="regenerate_id")
    return path[-2].position


async def _reply(
    chat: Chat,
    user_id: str,
    conversation_id: uuid.UUID,
    asked: int,
    idempotency: commands.Idempotency,
    on_delta: Callable[[str], None] | None,
) -> tuple[ChatAnswer, bool]:
    """The assistant's reply to the stored message at `asked` (the turn's lock held)."""
    store = chat.store
    answered = commands.Idempotency(
        reply_key(idempotency.key) if idempotency.key is not None else None, idempotency.fingerprint
    )
    async with store.pool.acquire() as conn:
        if answered.key is not None:
            prior = await prior_command(conn, user_id, answered.key, answered.fingerprint)
            if prior is not None:
                return await _answer(store, user_id, conversation_id, asked, prior.position), True
        history = await read_stream(conn, store.keyring, user_id, conversation_id)
    if fold_stream(history) is None:
        raise NotFound(str(conversation_id))  # deleted meanwhile
    question = next(e.event for e in history if e.position == asked)
    assert isinstance(question, MessageAppended)
    # The prompt is the branch that ends at the user's message (API.md: not the whole tree).
    prompt = prompt_from(branch(history, question.message_id), chat.max_messages, chat.max_chars)
    if on_delta is None:
        text = await chat.assistant.complete(prompt)
    else:
        pieces = []
        async for piece in chat.assistant.stream(prompt):
            pieces.append(piece)
            on_delta(piece)
        text = "".join(pieces)
    if not text:
        raise AssistantError("the assistant gave an empty reply")
    reply = shapes.MessageCreate(role="assistant", content=text, parent_id=question.message_id)
    try:
        stored, replayed = await commands.append_message(store, chat.heads, user_id, conversation_id, reply, answered)
    except EventValidationError as exc:
        raise AssistantError(f"the assistant's reply cannot be stored: {exc}") from exc
    return await _answer(store, user_id, conversation_id, asked, stored.position), replayed


async def _answer(store: EventStore, user_id: str, conversation_id: uuid.UUID, asked: int, answered: int) -> ChatAnswer:
    """The turn's answer, from the stored events: the conversation as of the reply."""
    async with store.pool.acquire() as conn:
        events = await read_stream(conn, store.keyring, user_id, conversation_id)
    version = next(e.stream_version for e in events if e.position == answered)
    upto = [e for e in events if e.stream_version <= version]
    state = fold_stream(upto)
    if state is None:
        raise NotFound(str(conversation_id))
    by_position = {e.position: e for e in upto}
    return ChatAnswer(
        conversation=commands.conversation_view(state),
        messages=[commands.stored_message_view(by_position[p]) for p in (asked, answered)],
        position=answered,
    )
