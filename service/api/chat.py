"""POST /v1/chat: one chat turn, answered whole or streamed as server-sent events.

A streamed turn runs as a task of its own that hands the assistant's pieces to the response. The
answer's status is chosen once the first piece (or the end) is known, so an error before the
assistant says anything — an unknown conversation, a bad key, an assistant that cannot be
reached — is a plain problem document with its status (404, 422, 502). Afterwards, an error is
sent as an `error` event holding the problem document. A client that disconnects cancels the
task: its message stays stored and no reply is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from litestar import Litestar, Request, Response, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Schema
from litestar.params import JSONBody
from litestar.response import Stream

from service import chat as chats
from service.api.routes import IdempotencyKey, User, answered, idempotency, problems, strict
from service.commands import Idempotency
from service.problems import answer_for

log = logging.getLogger(__name__)

_END: Final = object()
_STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@post(
    "/v1/chat",
    status_code=200,
    summary="Chat: store a message, ask the assistant, store and answer its reply",
    description=(
        'With `"stream": true` the answer is `text/event-stream`: `delta` events whose data is '
        '`{"content": "<text>"}` as the reply is produced, then one `message` event whose data is '
        "the stored assistant message (or, if the assistant fails after the stream began, one "
        "`error` event whose data is a problem document)."
    ),
    responses={
        200: ResponseSpec(
            data_container=chats.ChatAnswer,
            description="the turn: the conversation as of the reply, [user message, assistant message], position",
        ),
        **problems(404, 409, 422, 502),
    },
)
async def chat(
    state: State,
    request: Request[Any, Any, State],
    data: JSONBody[chats.ChatRequest],
    user: User,
    idempotency_key: IdempotencyKey = None,
) -> Response[Any]:
    data = await strict(request, data)
    asked = idempotency(request, idempotency_key, data)
    if not data.stream:
        answer, replayed = await chats.chat(state.chat, user, data, asked)
        return answered(answer, 200, replayed)
    return await _streamed(request, state.chat, user, data, asked)


async def _streamed(
    request: Request[Any, Any, State], chat: chats.Chat, user: str, body: chats.ChatRequest, asked: Idempotency
) -> Stream:
    pieces: asyncio.Queue[object] = asyncio.Queue()

    async def turn() -> tuple[chats.ChatAnswer, bool]:
        try:
            return await chats.chat(chat, user, body, asked, pieces.put_nowait)
        finally:
            pieces.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(turn(), name="chat-turn")
    task.add_done_callback(_retrieve)
    try:
        first = await pieces.get()
    except BaseException:
        task.cancel()
        raise
    headers = dict(_STREAM_HEADERS)
    if first is _END:
        _, replayed = task.result()  # an error here is answered with its own status
        if replayed:
            headers["Idempotent-Replayed"] = "true"
    return Stream(_events(request, first, pieces, task), media_type="text/event-stream", headers=headers)


async def _events(
    request: Request[Any, Any, State],
    first: object,
    pieces: asyncio.Queue[object],
    task: asyncio.Task[tuple[chats.ChatAnswer, bool]],
) -> AsyncIterator[bytes]:
    try:
        sent, piece = False, first
        while piece is not _END:
            yield _event("delta", msgspec.json.encode({"content": piece}))
            sent, piece = True, await pieces.get()
        try:
            answer, _ = task.result()
        except Exception as exc:
            yield _event("error", answer_for(request, exc).content)
            return
        reply = answer.messages[-1]
        if not sent:  # a replayed turn, or an assistant that gave its reply whole
            yield _event("delta", msgspec.json.encode({"content": reply.content}))
        yield _event("message", msgspec.json.encode(reply))
    finally:
        task.cancel()  # the client is gone (or the turn is done, and this does nothing)


def document_stream(app: Litestar) -> None:
    """OpenAPI: the 200 of /v1/chat is JSON, or server-sent events with `"stream": true`."""
    operation = (app.openapi_schema.paths or {})["/v1/chat"].post
    assert operation is not None and operation.responses is not None
    answer = operation.responses["200"]
    assert isinstance(answer, OpenAPIResponse) and answer.content is not None
    answer.content["text/event-stream"] = OpenAPIMediaType(
        schema=Schema(type=OpenAPIType.STRING, description="delta events, then one message (or error) event")
    )


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A turn whose stream was abandoned may fail unseen: log it, never leave it unretrieved."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("chat turn ended with %r", exc)


ROUTES = [chat]
__all__ = ["ROUTES", "document_stream"]
