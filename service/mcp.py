"""The MCP server: a user's conversation history as tools for AI agents.

One `MCPServer` (the official `mcp` SDK) with four tools that call the same commands and queries
as the HTTP routes, so limits, idempotency and isolation are the API's own. It is served two ways:

- Streamable HTTP at `/mcp` in the Litestar app (`mount`), stateless, behind the same bearer
  tokens and body limit: a request without a valid token (401), with a body over the limit (413)
  or by another method than POST (405) is answered before it reaches the SDK, and each tool call
  reads its user from its own request's token again.
- stdio, for local agents, as one fixed user (`chatlog mcp --user USER`).

Arguments are validated strictly against each tool's advertised JSON schema. Results are compact
JSON for a model's context: a page stays within `CHATLOG_MCP_RESULT_CHARS`. Long texts are cut to
fit (a cut one says so and how long it is); when the items still do not fit, the page holds fewer
of them and its cursor goes on from there. Errors are tool errors whose text is exactly the
problem document the HTTP API would answer (`code`, `status`, `detail`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, TypeVar, cast

import msgspec
from litestar import Response
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.handlers import asgi
from litestar.types import HTTPReceiveMessage, Receive, ReceiveMessage, Scope, Send
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, InputRequiredResult, TextContent
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from service import commands, queries, shapes
from service import search as searching
from service.auth import TokenError, TokenVerifier
from service.connections import ConnectionPool
from service.cursors import Cursors, messages_scope
from service.errors import Unauthorized
from service.eventstore import EventStore
from service.ids import parse_uuid
from service.problems import answer_for, problem, send_problem
from service.sealing import Keyring
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_OVERHEAD: Final = 600  # a page's own JSON around its items: the key, brackets, next_cursor
INSTRUCTIONS: Final = (
    "The user's saved conversations with AI assistants (chatlog). Use search_messages to find what "
    "was said about a topic, list_conversations to browse, get_messages to read a conversation in "
    "order, and append_message to add to one. Lists are paged: pass next_cursor back as cursor."
)

Role = Literal["user", "assistant", "system", "tool"]
ConversationId = Annotated[str, Field(description="a conversation id (UUID), as listed by list_conversations")]
Cursor = Annotated[str | None, Field(description="next_cursor of the previous page; omit for the first page")]
MinPosition = Annotated[
    int | None,
    Field(
        ge=1,
        le=9_223_372_036_854_775_807,
        description="read your writes: answer once this position (an append's) is readable (waits seconds at most)",
    ),
]


class Tools:
    """What the tools need: the app's store, pools and signers, and who the caller is. The reads
    read from `replica` when there is one, as the HTTP reads do."""

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        store: EventStore,
        heads: commands.ConversationHeads,
        cursors: Cursors,
        user_of: Callable[[Context], Awaitable[str]],
        replica: ConnectionPool | None = None,
    ) -> None:
        self.settings, self.pool, self.store, self.heads, self.cursors = settings, pool, store, heads, cursors
        self.user_of = user_of
        self.replica = replica
        self.reads = replica or pool


_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


class _StrictArguments(BaseModel):
    """Mixed into each tool's argument model: the arguments are taken as the advertised JSON
    schema says (it says so too, `additionalProperties: false`): JSON types exactly (no "5",
    5.0 or true for an integer), no unknown names; and, as everywhere in the API, no string
    with a NUL character or a lone surrogate (which the /mcp endpoint turns into NULs)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        if isinstance(value, str) and _UNSTORABLE.search(value):
            raise PydanticCustomError("string_unstorable", "contains a NUL character or a lone surrogate")
        return value


class _StrictMetadata(FuncMetadata):
    """The SDK's argument handling, minus its leniency: it would parse a string argument as JSON
    first (so that a cursor "null" became no cursor) and coerce types."""

    def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
        return self.arg_model.model_validate(arguments_to_validate).model_dump_one_level()


class _Server(MCPServer):
    """The SDK's server, with every tool's arguments validated strictly against its schema, and
    every failure answered as a tool error whose text is exactly the problem document the HTTP
    API would answer: arguments that break the schema are 422 `validation_error` naming each
    field, an unknown tool 404 `not_found`, a domain error its own, a crash 500 `internal`."""

    def add_tool(self, fn: Callable[..., Any], name: str | None = None, *args: Any, **options: Any) -> None:
        super().add_tool(fn, name, *args, **options)
        tool = self._tool_manager.get_tool(name or fn.__name__)
        assert tool is not None
        loose = tool.fn_metadata
        bases = (loose.arg_model, _StrictArguments)
        model = cast(type[ArgModelBase], type(loose.arg_model.__name__, bases, {"__module__": __name__}))
        tool.fn_metadata = _StrictMetadata(
            arg_model=model,
            output_schema=loose.output_schema,
            output_model=loose.output_model,
            wrap_output=loose.wrap_output,
        )
        tool.parameters = model.model_json_schema(by_alias=True)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context | None = None
    ) -> CallToolResult | InputRequiredResult:
        if self._tool_manager.get_tool(name) is None:
            return _error(problem(404, f"Unknown tool: {name}"))
        try:
            return await super().call_tool(name, arguments, context)
        except MCPError:
            raise
        except ToolError as exc:  # the SDK's wrapper around what validation, or the tool, raised
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            if isinstance(cause, ValidationError) and not isinstance(exc, UnexpectedToolError):
                return _error(_invalid(cause))
            return _error(answer_for(None, cause))


def _invalid(exc: ValidationError) -> Response[bytes]:
    errors = [
        {"key": ".".join(str(part) for part in e["loc"]) or "arguments", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    return problem(422, "; ".join(f"{e['key']}: {e['message']}" for e in errors), errors=errors)


def _error(answer: Response[bytes]) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=answer.content.decode())], is_error=True)


def build_server(tools: Tools) -> MCPServer:
    server = _Server(name="chatlog", instructions=INSTRUCTIONS, log_level="WARNING")
    budget = tools.settings.mcp_result_chars

    async def readable(user: str, min_position: int | None) -> None:
        """As the HTTP reads: the user's own writes (and `min_position`), or 503 `not_ready` in time."""
        await queries.wait_until_readable(
            tools.pool,
            user,
            min_position,
            tools.settings.read_wait_seconds,
            tools.replica,
            tools.settings.projection_slices,
        )

    async def run(ctx: Context, call: Callable[[str], Awaitable[dict[str, Any]]]) -> CallToolResult:
        """A tool's body, for the caller, as compact JSON text (and the same as structured
        content). What it raises, `_Server.call_tool` answers."""
        result = await call(await tools.user_of(ctx))
        text = msgspec.json.encode(result).decode()
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result)

    @server.tool(
        description=(
            "List the user's conversations, most recently active first. Each has id, title, "
            "message_count, updated_at and a preview of its last message."
        )
    )
    async def list_conversations(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=100, description="conversations per page (1-100)")] = 20,
        cursor: Cursor = None,
        min_position: MinPosition = None,
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            await readable(user, min_position)
            scope = "conversations:desc"  # the HTTP list's own cursors work here, and back
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[shapes.Conversation], list[Any] | None]:
                async with tools.reads.acquire() as conn:
                    return await queries.list_conversations(conn, user, count, True, after)

            items, next_after = await _fitted(fetch, limit, _conversation, budget)
            return _page(tools, scope, user, next_after, conversations=items)

        return await run(ctx, call)

    @server.tool(
        description=(
            "Read a conversation's messages in order (seq 1, 2, ...), or newest first with "
            'order="desc". Long messages are cut to fit; a cut one has truncated=true and its full length.'
        )
    )
    async def get_messages(
        ctx: Context,
        conversation_id: ConversationId,
        limit: Annotated[int, Field(ge=1, le=100, description="messages per page (1-100)")] = 20,
        cursor: Cursor = None,
        order: Annotated[Literal["asc", "desc"], Field(description="asc: oldest first; desc: newest first")] = "asc",
        min_position: MinPosition = None,
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            cid = parse_uuid(conversation_id)
            await readable(user, min_position)
            scope = messages_scope(cid, order)
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[shapes.Message], list[Any] | None]:
                async with tools.reads.acquire() as conn:  # the active branch (API.md, MCP)
                    return await queries.list_branch(conn, user, cid, count, order == "desc", None, after)

            items, next_after = await _fitted(fetch, limit, _message, budget)
            return _page(tools, scope, user, next_after, messages=items)

        return await run(ctx, call)

    @server.tool(
        description=(
            "Full-text search over all of the user's messages, best match first, then newest. "
            'Web-search syntax: words, "quoted phrases", -excluded, or. Each hit has the '
            "conversation_id and seq to read around it with get_messages, and a snippet with the "
            "matches in <mark> tags."
        )
    )
    async def search_messages(
        ctx: Context,
        query: Annotated[str, Field(min_length=1, max_length=searching.MAX_QUERY_CHARS, description="what to find")],
        conversation_id: Annotated[str | None, Field(description="only in this conversation")] = None,
        role: Annotated[Role | None, Field(description="only messages of this role")] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="hits per page (1-100)")] = 10,
        cursor: Cursor = None,
        min_position: MinPosition = None,
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            cid = parse_uuid(conversation_id) if conversation_id is not None else None
            await readable(user, min_position)
            scope = searching.cursor_scope(query, cid, role)
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[searching.SearchResult], list[Any] | None]:
                async with tools.reads.acquire() as conn:
                    return await searching.search_messages(
                        conn,
                        user,
                        tools.settings.search_config,
                        query,
                        conversation_id=cid,
                        role=role,
                        limit=count,
                        after=after,
                    )

            items, next_after = await _fitted(fetch, limit, _hit, budget)
            return _page(tools, scope, user, next_after, results=items)

        return await run(ctx, call)

    @server.tool(
        description=(
            "Append a message to one of the user's conversations; answers the stored message with "
            "its seq and position. It follows the conversation's active leaf, or parent_id (any "
            "message of the conversation: an edit or another branch); it becomes the active leaf. "
            "Give an idempotency_key to make a retry safe: the same key and content store the "
            "message once."
        )
    )
    async def append_message(
        ctx: Context,
        conversation_id: ConversationId,
        content: Annotated[str, Field(min_length=1, max_length=32_768, description="the message text")],
        role: Annotated[Role, Field(description="who speaks")] = "user",
        idempotency_key: Annotated[
            str | None, Field(min_length=1, max_length=255, description="1-255 printable ASCII")
        ] = None,
        parent_id: Annotated[
            str | None, Field(max_length=64, description="the message it follows (default: the active leaf)")
        ] = None,
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            cid = parse_uuid(conversation_id)
            if parent_id is None:
                body = shapes.MessageCreate(role=role, content=content)
            else:
                body = shapes.MessageCreate(role=role, content=content, parent_id=parse_uuid(parent_id, "parent_id"))
            fingerprint = commands.request_fingerprint("POST", f"/v1/conversations/{cid}/messages", body)
            asked = commands.Idempotency(idempotency_key, fingerprint)
            message, _ = await commands.append_message(tools.store, tools.heads, user, cid, body, asked)
            return _message(message, budget)

        return await run(ctx, call)

    return server


def _page(tools: Tools, scope: str, user: str, next_after: list[Any] | None, **items: Any) -> dict[str, Any]:
    return {**items, "next_cursor": tools.cursors.encode(scope, user, next_after) if next_after is not None else None}


async def _fitted(
    fetch: Callable[[int], Awaitable[tuple[list[T], list[Any] | None]]],
    limit: int,
    shape: Callable[[T, int], dict[str, Any]],
    budget: int,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """A page of at most `limit` items, shaped for the model, whose JSON fits in `budget`.

    Long texts are cut to an equal share of it. Should the items still not fit (metadata, many
    items), the page is read again with as many as fit (their texts cut to the larger share that
    leaves), so that its cursor continues right after the last one given: nothing is skipped, the
    next page has the rest. One item is always given.
    """
    room = budget - PAGE_OVERHEAD
    page, next_after = await fetch(limit)
    while True:
        items = _shaped(page, shape, room)
        if items is not None:
            return items, next_after
        fitting = next(k for k in range(len(page) - 1, 0, -1) if k == 1 or _shaped(page[:k], shape, room))
        page, next_after = await fetch(fitting)  # usually those same items; if the list moved on, check again


def _shaped(page: list[T], shape: Callable[[T, int], dict[str, Any]], room: int) -> list[dict[str, Any]] | None:
    """The items shaped with texts cut to an equal share of `room` (after the commas between
    them), if together they fit in it; a lone item is given whatever its size."""
    share = (room - len(page)) // max(1, len(page))
    items = [shape(x, share) for x in page]
    if len(items) <= 1 or sum(len(_encode(item)) + 1 for item in items) <= room:
        return items
    return None


def _fit(item: dict[str, Any], field: str, chars: int) -> dict[str, Any]:
    """`item` with its text `field` cut so that the item's JSON is at most `chars` long; a cut
    text ends with "…" and the item says `truncated` and the text's full length."""
    text = item[field]
    if text is None or len(_encode(item)) <= chars:
        return item
    item |= {field: "", "truncated": True, f"{field}_chars": len(text)}
    room = chars - len(_encode(item)) - 1
    while True:  # escapes make the JSON longer than the text: shrink until it fits
        item[field] = text[: max(0, room)] + "…"
        excess = len(_encode(item)) - chars
        if excess <= 0 or room <= 0:
            return item
        room -= excess


def _encode(item: dict[str, Any]) -> str:
    return msgspec.json.encode(item).decode()


def _message(m: shapes.Message, chars: int) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(m.id), "conversation_id": str(m.conversation_id), "seq": m.seq, "role": m.role}
    out["content"] = m.content
    if m.metadata:
        out["metadata"] = m.metadata
    parent = None if m.parent_id is None else str(m.parent_id)
    return _fit(out | {"created_at": m.created_at, "position": m.position, "parent_id": parent}, "content", chars)


def _conversation(c: shapes.Conversation, chars: int) -> dict[str, Any]:
    item = {
        "id": str(c.id),
        "title": c.title,
        "message_count": c.message_count,
        "updated_at": c.updated_at,
        "last_message_preview": c.last_message_preview,
    }
    return _fit(item, "last_message_preview", chars)


def _hit(r: searching.SearchResult, chars: int) -> dict[str, Any]:
    m = r.message
    item = {
        "id": str(m.id),  # the message's: an agent cites it, or reads around it with get_messages
        "conversation_id": str(m.conversation_id),
        "conversation_title": r.conversation_title,
        "seq": m.seq,
        "role": m.role,
        "snippet": r.snippet,
        "rank": round(r.rank, 4),
        "created_at": m.created_at,
    }
    return _fit(item, "snippet", chars)


# -- Streamable HTTP in the Litestar app --------------------------------------------------------


def http_user(verifier: TokenVerifier) -> Callable[[Context], Awaitable[str]]:
    async def user_of(ctx: Context) -> str:
        headers = ctx.headers
        try:
            return await verifier.user_of(headers.get("authorization") if headers is not None else None)
        except TokenError as exc:
            raise Unauthorized(str(exc)) from None

    return user_of


def session_manager(server: MCPServer) -> StreamableHTTPSessionManager:
    """Stateless Streamable HTTP: every request stands alone (any API instance can answer it).
    Host checks against DNS rebinding are off: every request needs a bearer token, which a page
    rebound to this host cannot send."""
    server.streamable_http_app(
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    return server.session_manager


@asgi("/mcp", is_mount=True, copy_scope=True)
async def mount(scope: Scope, receive: Receive, send: Send) -> None:
    """/mcp: the bearer token is checked here (401 without a valid one); POST only (stateless,
    there is no stream to GET); the body is read here, within the API's size limit (413 above it,
    processing nothing); then the SDK answers."""
    state = scope["litestar_app"].state
    verifier: TokenVerifier = state.verifier
    try:
        await verifier.user_of(Headers.from_scope(scope).get("authorization"))
    except TokenError as exc:
        await send_problem(problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"}), scope, receive, send)
        return
    if scope["type"] != ScopeType.HTTP or scope["method"] != "POST":
        detail = "POST JSON-RPC messages here: the endpoint is stateless, with no stream to GET nor session to end"
        await send_problem(problem(405, detail, headers={"Allow": "POST"}), scope, receive, send)
        return
    settings: Settings = state.settings
    try:
        body = await _body(scope, receive, settings.max_body_bytes)
    except _TooLarge:
        await send_problem(problem(413, f"the body is over {settings.max_body_bytes} bytes"), scope, receive, send)
        return
    except _Disconnected:
        return
    manager: StreamableHTTPSessionManager = state.mcp
    await manager.handle_request(scope, _replay(_without_lone_surrogates(body), receive), send)  # type: ignore[arg-type]


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, read no further than `limit` bytes: an announced length over it is
    refused before reading, a streamed one as soon as it goes over."""
    announced = (Headers.from_scope(scope).get("content-length") or "").lstrip("0")
    if announced.isascii() and announced.isdigit() and (len(announced) > 18 or int(announced) > limit):
        raise _TooLarge  # (a length of thousands of digits would be too long for int())
    chunks: list[bytes] = []
    size = 0
    while True:
        message = cast(HTTPReceiveMessage, await receive())
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the SDK: the body read already, then whatever else comes (a disconnect)."""
    pending = True

    async def replayed() -> ReceiveMessage:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(body: bytes) -> bytes:
    """`body` with each lone surrogate in its strings (valid JSON: an escape such as \\ud800
    without its other half) made a NUL, which every tool refuses as 422 naming the argument; the
    SDK's JSON parser would refuse the whole message instead. A body that is not JSON is left for
    the SDK to answer as such."""
    if not _SURROGATE_ESCAPE.search(body):
        return body
    try:
        message = json.loads(body)
        cleaned = _nul_for_lone_surrogates(message)
        if cleaned == message:
            return body
    except (ValueError, RecursionError):  # not JSON, or nested too deep: the SDK refuses it as such
        return body
    # Re-serialised: numbers Python reads differently (1e400 as inf) would then make the SDK
    # refuse the whole message rather than one argument; a NUL-checked string is what matters.
    return json.dumps(cleaned, ensure_ascii=False).encode()


def _nul_for_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\x00", value)
    if isinstance(value, list):
        return [_nul_for_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_nul_for_lone_surrogates(k): _nul_for_lone_surrogates(v) for k, v in value.items()}
    return value


# -- stdio, for one local user ---------------------------------------------------------------------


async def serve_stdio(settings: Settings, user: str) -> None:
    """The MCP server on stdin/stdout for `user`, until the client closes the pipe. Runs the
    projection workers too unless `settings.run_workers` is off (they stand by while another
    process holds their lock), so that what an agent appends shows up in its next read."""
    from service.auth import jwt_secret
    from service.workers import start_workers

    assert settings.database_url
    pool = ConnectionPool(settings.database_url, size=4)
    replica = ConnectionPool(settings.read_database_url, size=4) if settings.read_database_url else None
    keyring = Keyring.from_settings(settings)
    store = EventStore(pool, keyring, group_commit=settings.group_commit)
    workers = start_workers(settings, keyring, store) if settings.run_workers else {}

    async def fixed_user(ctx: Context) -> str:
        return user

    cursors = Cursors(settings.cursor_secret or jwt_secret(settings))
    tools = Tools(settings, pool, store, commands.ConversationHeads(), cursors, fixed_user, replica)
    try:
        await build_server(tools).run_stdio_async()
    finally:
        for worker, task in workers.items():
            worker.stop()
            await asyncio.gather(task, return_exceptions=True)
        await store.aclose()
        await pool.close()
        if replica is not None:
            await replica.close()
