"""The MCP server: a user's conversation history as tools for AI agents.

One `MCPServer` (the official `mcp` SDK) with four tools that call the same commands and queries
as the HTTP routes, so limits, idempotency and isolation are the API's own. It is served two ways:

- Streamable HTTP at `/mcp` in the Litestar app (`mount`), stateless, behind the same bearer
  tokens: a request without a valid token is answered 401 before it reaches the SDK, and each
  tool call reads its user from its own request's token again.
- stdio, for local agents, as one fixed user (`chatlog mcp --user USER`).

Results are compact JSON for a model's context: a page stays within `CHATLOG_MCP_RESULT_CHARS`.
Long texts are cut to fit (a cut one says so and how long it is); when the items still do not
fit, the page holds fewer of them and its cursor goes on from there. Errors are tool errors
whose text is the problem document the HTTP API would answer (`code`, `status`, `detail`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from litestar.datastructures import Headers
from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, InputRequiredResult, TextContent
from pydantic import Field, ValidationError

from service import commands, queries
from service import search as searching
from service.api import schemas
from service.api.cursors import Cursors
from service.api.problems import answer_for, problem
from service.api.routes import parse_uuid
from service.auth import TokenError, TokenVerifier
from service.connections import ConnectionPool
from service.errors import BadRequest
from service.eventstore import EventStore
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


class Tools:
    """What the tools need: the app's store, pool and signers, and who the caller is."""

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        store: EventStore,
        heads: commands.ConversationHeads,
        cursors: Cursors,
        user_of: Callable[[Context], Awaitable[str]],
    ) -> None:
        self.settings, self.pool, self.store, self.heads, self.cursors = settings, pool, store, heads, cursors
        self.user_of = user_of


class _Server(MCPServer):
    """The SDK's server, with arguments that break a tool's JSON schema answered like every other
    bad input: a tool error holding the 422 `validation_error` problem document, naming each field
    (the SDK's own message is pydantic's text); an unknown tool is a 404 `not_found` one."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context | None = None
    ) -> CallToolResult | InputRequiredResult:
        if self._tool_manager.get_tool(name) is None:
            raise ToolError(problem(404, f"Unknown tool: {name}").content.decode())
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError) or isinstance(exc, UnexpectedToolError):
                raise
            errors = [
                {"key": ".".join(str(part) for part in e["loc"]) or "arguments", "message": e["msg"]}
                for e in exc.__cause__.errors(include_url=False, include_input=False)
            ]
            detail = "; ".join(f"{e['key']}: {e['message']}" for e in errors)
            raise ToolError(problem(422, detail, errors=errors).content.decode()) from exc


def build_server(tools: Tools) -> MCPServer:
    server = _Server(name="chatlog", instructions=INSTRUCTIONS, log_level="WARNING")
    budget = tools.settings.mcp_result_chars

    async def run(ctx: Context, call: Callable[[str], Awaitable[dict[str, Any]]]) -> CallToolResult:
        """A tool's body, for the caller, as compact JSON text (and the same as structured
        content); any error as the HTTP API's problem document."""
        try:
            result = await call(await tools.user_of(ctx))
            text = msgspec.json.encode(result).decode()
            return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result)
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(answer_for(None, exc).content.decode()) from exc

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
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            scope = "conversations:desc"  # the HTTP list's own cursors work here, and back
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[schemas.Conversation], list[Any] | None]:
                async with tools.pool.acquire() as conn:
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
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            cid = parse_uuid(conversation_id)
            scope = f"messages:{cid}:{order}"
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[schemas.Message], list[Any] | None]:
                async with tools.pool.acquire() as conn:
                    return await queries.list_messages(conn, user, cid, count, order == "desc", after)

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
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            _clean("query", query)
            cid = parse_uuid(conversation_id) if conversation_id is not None else None
            scope = searching.cursor_scope(query, cid, role)
            after = tools.cursors.decode(cursor, scope, user) if cursor is not None else None

            async def fetch(count: int) -> tuple[list[searching.SearchResult], list[Any] | None]:
                async with tools.pool.acquire() as conn:
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
            "its seq and position. Give an idempotency_key to make a retry safe: the same key "
            "and content store the message once."
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
    ) -> CallToolResult:
        async def call(user: str) -> dict[str, Any]:
            cid = parse_uuid(conversation_id)
            body = schemas.MessageCreate(role=role, content=content)
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


def _message(m: schemas.Message, chars: int) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(m.id), "conversation_id": str(m.conversation_id), "seq": m.seq, "role": m.role}
    out["content"] = m.content
    if m.metadata:
        out["metadata"] = m.metadata
    return _fit(out | {"created_at": m.created_at, "position": m.position}, "content", chars)


def _conversation(c: schemas.Conversation, chars: int) -> dict[str, Any]:
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
        "conversation_id": str(m.conversation_id),
        "conversation_title": r.conversation_title,
        "seq": m.seq,
        "role": m.role,
        "snippet": r.snippet,
        "rank": round(r.rank, 4),
        "created_at": m.created_at,
    }
    return _fit(item, "snippet", chars)


def _clean(name: str, value: str) -> None:
    if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
        raise BadRequest(f"{name} contains a NUL character or a lone surrogate", field=name)


# -- Streamable HTTP in the Litestar app --------------------------------------------------------


def http_user(verifier: TokenVerifier) -> Callable[[Context], Awaitable[str]]:
    async def user_of(ctx: Context) -> str:
        headers = ctx.headers
        try:
            return await verifier.user_of(headers.get("authorization") if headers is not None else None)
        except TokenError as exc:
            raise ToolError(problem(401, str(exc)).content.decode()) from None

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
    """/mcp: the bearer token is checked here (401 without a valid one), then the SDK answers."""
    state = scope["litestar_app"].state
    verifier: TokenVerifier = state.verifier
    try:
        await verifier.user_of(Headers.from_scope(scope).get("authorization"))
    except TokenError as exc:
        answer = problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
        await answer.to_asgi_response(app=None, request=None)(scope, receive, send)  # type: ignore[arg-type]
        return
    manager: StreamableHTTPSessionManager = state.mcp
    await manager.handle_request(scope, receive, send)  # type: ignore[arg-type]


# -- stdio, for one local user ---------------------------------------------------------------------


async def serve_stdio(settings: Settings, user: str) -> None:
    """The MCP server on stdin/stdout for `user`, until the client closes the pipe. Runs the
    projection workers too unless `settings.run_workers` is off (they stand by while another
    process holds their lock), so that what an agent appends shows up in its next read."""
    from service.app import start_workers
    from service.auth import jwt_secret

    assert settings.database_url
    pool = ConnectionPool(settings.database_url, size=4)
    store = EventStore(pool)
    workers = start_workers(settings, store) if settings.run_workers else {}

    async def fixed_user(ctx: Context) -> str:
        return user

    cursors = Cursors(settings.cursor_secret or jwt_secret(settings))
    tools = Tools(settings, pool, store, commands.ConversationHeads(), cursors, fixed_user)
    try:
        await build_server(tools).run_stdio_async()
    finally:
        for worker, task in workers.items():
            worker.stop()
            await asyncio.gather(task, return_exceptions=True)
        await store.aclose()
        await pool.close()
