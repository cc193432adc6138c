"""The /v1 routes: thin handlers that decode, call one command or query, and encode."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.datastructures import ResponseHeader, State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import Response as LitestarResponse

from service import commands, history, queries, shapes
from service.auth import TokenError, TokenVerifier
from service.cursors import Cursors, messages_scope
from service.errors import BadRequest, Unauthorized
from service.events import EventValidationError
from service.eventstore import Checkpoint, validate_idempotency_key
from service.ids import parse_uuid

_PROBLEM_DESCRIPTIONS = {
    401: "no valid bearer token (code unauthorized)",
    404: "no such conversation for this user (code not_found)",
    409: "version_conflict: a stale expected_version (with current_version), or a taken id",
    413: "the body is over the size limit (code payload_too_large)",
    422: "validation_error, or idempotency_mismatch for a reused Idempotency-Key",
    500: "internal error (code internal)",
    502: "the assistant failed or timed out (code assistant_error); the user's message stays stored",
    503: "not_ready: the read models did not reach min_position in time (Retry-After)",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """The problem documents an operation can answer: these, and 401, 413 and 500 for all."""
    return {
        status: ResponseSpec(
            data_container=shapes.Problem,
            description=_PROBLEM_DESCRIPTIONS[status],
            media_type="application/problem+json",
            generate_examples=False,
        )
        for status in sorted({401, 413, 500, *statuses})
    }


ConversationId = Annotated[str, PathParameter(description="a conversation id (UUID)", max_length=64)]


Limit = Annotated[int, QueryParameter(ge=1, le=100, description="page size (1-100)")]
Cursor = Annotated[str | None, QueryParameter(max_length=2048, description="an opaque cursor from a previous page")]
MinPosition = Annotated[
    int | None,
    QueryParameter(
        ge=1,
        le=9_223_372_036_854_775_807,
        description="answer only once the read models include this position (waits at most 5 s, else 503)",
    ),
]
AsOf = Annotated[
    int | None,
    QueryParameter(
        ge=0,
        le=9_223_372_036_854_775_807,
        description="time travel: as it was once every event at or before this position had been applied",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        max_length=255,
        description="retrying with the same key returns the first answer and appends nothing",
        examples=[Example(value="9f1c2d")],
    ),
]


async def provide_user(request: Request[Any, Any, State]) -> str:
    verifier: TokenVerifier = request.app.state.verifier
    try:
        return await verifier.user_of(request.headers.get("authorization"))
    except TokenError as exc:
        raise Unauthorized(str(exc)) from exc


User = NamedDependency[str]

# The user is the one dependency: Litestar resolves two or more of one level concurrently, in an
# anyio task group of their own (two tasks, cancel scopes) on every request. The store and the
# cursor signer are read from the app's state instead.
DEPENDENCIES = {"user": Provide(provide_user)}


BodyT = TypeVar("BodyT", bound=msgspec.Struct)
PageItem = TypeVar("PageItem")


async def strict(request: Request[Any, Any, State], body: BodyT) -> BodyT:
    """The body decoded once more, strictly: Litestar's decoding turns "1" into 1; the contract
    says a wrong type is a validation error."""
    try:
        return msgspec.json.decode(await request.body(), type=type(body), strict=True)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None


def idempotency(request: Request[Any, Any, State], key: str | None, body: msgspec.Struct) -> commands.Idempotency:
    """The request's key and fingerprint; without a key there is nothing to recognise a retry by,
    and no fingerprint (it is stored only with a key)."""
    if key is None:
        return commands.Idempotency(None, b"")
    try:
        validate_idempotency_key(key)
    except EventValidationError as exc:
        raise BadRequest(str(exc), field="Idempotency-Key") from None
    return commands.Idempotency(key, commands.request_fingerprint(request.method, request.url.path, body))


async def wait(state: State, user: str, min_position: int | None) -> None:
    """Every read waits for the read models to hold the caller's own writes (and `min_position`):
    those it reads, `state.reads` (the replica's, when there is one: README, "Read replicas")."""
    await queries.wait_until_readable(
        state.pool,
        user,
        min_position,
        state.settings.read_wait_seconds,
        state.replica,
        state.settings.projection_slices,
    )


async def branch_page(
    state: State,
    user: str,
    cid: uuid.UUID,
    limit: int,
    descending: bool,
    leaf: uuid.UUID | None,
    after: list[Any] | None,
    min_position: int | None,
) -> tuple[list[shapes.Message], list[Any] | None]:
    """A page of a branch (`queries.list_branch`), once readable as `wait` says."""
    return await queries.read_branch(
        state.pool, state.replica, user, cid, limit, descending, leaf, after,
        min_position=min_position, wait_seconds=state.settings.read_wait_seconds,
        slices=state.settings.projection_slices,
    )  # fmt: skip


def answered(body: Any, status: int, replayed: bool) -> LitestarResponse[Any]:
    return LitestarResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"} if replayed else {})


@post(
    "/v1/conversations",
    status_code=201,
    summary="Start a conversation",
    responses=problems(409, 422),
)
async def create_conversation(
    state: State,
    request: Request[Any, Any, State],
    data: JSONBody[shapes.ConversationCreate],
    user: User,
    idempotency_key: IdempotencyKey = None,
) -> Response[shapes.Conversation]:
    data = await strict(request, data)
    conversation, replayed = await commands.create_conversation(
        state.store, state.heads, user, data, idempotency(request, idempotency_key, data)
    )
    return answered(conversation, 201, replayed)


@get(
    "/v1/conversations",
    summary="List conversations",
    responses=problems(422, 503),
)
async def list_conversations(
    state: State,
    user: User,
    limit: Limit = 20,
    cursor: Cursor = None,
    order: Annotated[Literal["desc", "asc"], QueryParameter()] = "desc",
    min_position: MinPosition = None,
) -> shapes.Page[shapes.Conversation]:
    await wait(state, user, min_position)
    scope = f"conversations:{order}"
    after = state.cursors.decode(cursor, scope, user) if cursor is not None else None
    async with state.reads.acquire() as conn:
        page, next_after = await queries.list_conversations(conn, user, limit, order == "desc", after)
    return page_of(state.cursors, scope, user, page, next_after)


@get(
    "/v1/conversations/{conversation_id:str}",
    summary="Get a conversation",
    responses=problems(404, 422, 503),
)
async def get_conversation(
    state: State, user: User, conversation_id: ConversationId, min_position: MinPosition = None, as_of: AsOf = None
) -> shapes.Conversation:
    """The conversation; with `as_of`, as it was once every event at or before that position had
    been applied (folded from the log)."""
    await wait(state, user, min_position)
    cid = parse_uuid(conversation_id)
    if as_of is not None:
        return await history.conversation_as_of(state.reads, state.store.keyring, user, cid, as_of)
    async with state.reads.acquire() as conn:
        return await queries.get_conversation(conn, user, cid)


@post(
    "/v1/conversations/{conversation_id:str}/fork",
    status_code=201,
    summary="Fork a conversation: a new one holding copies of a branch",
    responses=problems(404, 422),
)
async def fork_conversation(
    state: State,
    request: Request[Any, Any, State],
    data: JSONBody[shapes.ForkCreate],
    user: User,
    conversation_id: ConversationId,
    idempotency_key: IdempotencyKey = None,
) -> LitestarResponse[shapes.Conversation]:
    """A new conversation of the caller holding copies (new ids, seq from 1) of the branch that ends
    at `message_id` (default: the active leaf), titled `title` (default: the source's)."""
    data = await strict(request, data)
    cid = parse_uuid(conversation_id)
    body, replayed = await history.fork(
        state.store, state.heads, user, cid, data, idempotency(request, idempotency_key, data)
    )
    return answered(body, 201, replayed)


@patch(
    "/v1/conversations/{conversation_id:str}",
    summary="Change a conversation's title or metadata",
    responses=problems(404, 409, 422),
)
async def update_conversation(
    state: State,
    request: Request[Any, Any, State],
    data: JSONBody[shapes.ConversationPatch],
    user: User,
    conversation_id: ConversationId,
) -> shapes.Conversation:
    data = await strict(request, data)
    return await commands.update_conversation(state.store, state.heads, user, parse_uuid(conversation_id), data)


@delete(
    "/v1/conversations/{conversation_id:str}",
    status_code=204,
    summary="Delete a conversation",
    responses=problems(404, 409, 422),
    response_headers=[
        ResponseHeader(
            name="Chatlog-Position",
            description="the position of the deletion's event (for min_position)",
            documentation_only=True,
        )
    ],
)
async def delete_conversation(
    state: State,
    user: User,
    conversation_id: ConversationId,
    expected_version: Annotated[int | None, QueryParameter(ge=0, le=2_147_483_647)] = None,
) -> Response[None]:
    """A 204 has no body, so the deletion's position (every write has one) is in a header, for
    `min_position` on the reads that follow."""
    position = await commands.delete_conversation(
        state.store, state.heads, user, parse_uuid(conversation_id), expected_version
    )
    return Response(None, status_code=204, headers={"Chatlog-Position": str(position)})


@delete(
    "/v1/me",
    status_code=204,
    summary="Erase everything of the caller",
    responses=problems(),
    response_headers=[
        ResponseHeader(
            name="Chatlog-Position",
            description="the position of the erasure (for min_position)",
            documentation_only=True,
        )
    ],
)
async def erase_me(state: State, user: User) -> Response[None]:
    """Every conversation and message of the caller, and their idempotency keys, erased
    (API.md, "Deleting is erasing"); the caller may start afresh."""
    position = await commands.erase_user(state.store, user)
    return Response(None, status_code=204, headers={"Chatlog-Position": str(position)})


@post(
    "/v1/conversations/{conversation_id:str}/messages",
    status_code=201,
    summary="Append a message",
    responses=problems(404, 409, 422),
)
async def append_message(
    state: State,
    request: Request[Any, Any, State],
    data: JSONBody[shapes.MessageCreate],
    user: User,
    conversation_id: ConversationId,
    idempotency_key: IdempotencyKey = None,
) -> Response[shapes.Message]:
    data = await strict(request, data)
    message, replayed = await commands.append_message(
        state.store, state.heads, user, parse_uuid(conversation_id), data, idempotency(request, idempotency_key, data)
    )
    return answered(message, 201, replayed)


@get(
    "/v1/conversations/{conversation_id:str}/messages",
    summary="List a conversation's messages",
    responses=problems(404, 422, 503),
)
async def list_messages(
    state: State,
    user: User,
    conversation_id: ConversationId,
    limit: Limit = 50,
    cursor: Cursor = None,
    order: Annotated[Literal["asc", "desc"], QueryParameter()] = "asc",
    leaf_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
    tree: Annotated[bool, QueryParameter()] = False,
    min_position: MinPosition = None,
    as_of: AsOf = None,
) -> shapes.Page[shapes.Message]:
    """The active branch in path order (default), the branch that ends at `leaf_id`, or with
    `tree=true` every message of every branch in `seq` order; with `as_of`, as they were at
    that position (folded from the log)."""
    cid = parse_uuid(conversation_id)
    if tree and leaf_id is not None:
        raise BadRequest("give leaf_id or tree=true, not both", field="leaf_id")
    leaf = parse_uuid(leaf_id, "leaf_id") if leaf_id is not None else None
    scope = messages_scope(cid, order, tree=tree)
    if as_of is not None:  # its keyset is a place in one list: bound to the position and the leaf
        scope += f":as_of:{as_of}:{leaf or ''}"
    after = state.cursors.decode(cursor, scope, user) if cursor is not None else None
    if not tree and as_of is None:  # the history page: the own-writes wait rides in its statement
        page, next_after = await branch_page(state, user, cid, limit, order == "desc", leaf, after, min_position)
        return page_of(state.cursors, scope, user, page, next_after)
    await wait(state, user, min_position)
    if as_of is not None:
        page, next_after = await history.messages_as_of(
            state.reads, state.store.keyring, user, cid, as_of,
            limit=limit, descending=order == "desc", leaf_id=leaf, tree=tree, after=after,
        )  # fmt: skip
        return page_of(state.cursors, scope, user, page, next_after)
    async with state.reads.acquire() as conn:
        page, next_after = await queries.list_messages(conn, user, cid, limit, order == "desc", after)
    return page_of(state.cursors, scope, user, page, next_after)


@get(
    "/v1/events",
    summary="The caller's own events, in commit order",
    responses=problems(422, 503),
)
async def list_events(
    state: State,
    user: User,
    after: Annotated[int | None, QueryParameter(ge=0, le=9_223_372_036_854_775_807)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 100,
    cursor: Cursor = None,
) -> shapes.Page[shapes.LogEvent]:
    if after is not None and cursor is not None:
        raise BadRequest("give either after or cursor, not both", field="after")
    # The caller's answered writes are in the feed, as in every read. The feed reads the log on
    # the primary (gap-safely, below the primary's horizon), so it waits for the primary's checkpoint.
    await queries.wait_until_readable(
        state.pool, user, None, state.settings.read_wait_seconds, slices=state.settings.projection_slices
    )
    async with state.pool.acquire() as conn:
        if cursor is not None:
            tx_id, position = _pair(state.cursors.decode(cursor, "events", user))
            start = Checkpoint(tx_id, position)
        elif after is not None:
            start = await queries.checkpoint_after(conn, user, after)
        else:
            start = Checkpoint()
        page, next_after = await queries.list_events(conn, state.store.keyring, user, start, limit)
    return page_of(state.cursors, "events", user, page, [next_after.tx_id, next_after.position] if next_after else None)


def page_of(
    cursors: Cursors, scope: str, user: str, items: list[PageItem], next_after: list[Any] | None
) -> shapes.Page[PageItem]:
    """A list answer; its cursor (when more follow) resumes after `next_after`, in `scope` only."""
    return shapes.Page(
        data=items,
        has_more=next_after is not None,
        next_cursor=cursors.encode(scope, user, next_after) if next_after is not None else None,
    )


def _pair(values: list[Any]) -> tuple[int, int]:
    if len(values) != 2 or not all(type(v) is int and v >= 0 for v in values):
        raise BadRequest("the cursor is not valid", field="cursor")
    return values[0], values[1]


ROUTES = [
    create_conversation,
    list_conversations,
    get_conversation,
    update_conversation,
    delete_conversation,
    fork_conversation,
    erase_me,
    append_message,
    list_messages,
    list_events,
]

__all__ = ["DEPENDENCIES", "ROUTES"]
