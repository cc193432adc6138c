"""The lean paths of the two routes a chat app calls most, served below Litestar's router:
`POST /v1/conversations/{id}/messages` (the append) and `GET /v1/conversations/{id}/messages`
(the history page).

Litestar's per-request machinery (routing, the signature model, dependency resolution, the
response object) cost more CPU than the rest of an append together (issue 13's profile), and a
fifth of the history page's server CPU. The append's path takes a well-formed request that
plainly succeeds or fails in the domain: a JSON body read within the size limit that decodes
strictly as a `MessageCreate`, one Bearer token that verifies, an optional well-formed
Idempotency-Key, an id that parses. The history page's path takes one Bearer token that verifies,
an id that parses, and a query of nothing but a plain `limit` (1-100), `order` (asc or desc) and
`cursor`, each at most once: the active branch's page, the one without `leaf_id`, `tree`,
`min_position` or `as_of`. Each calls the same code as its Litestar route and answers with the
same bytes and headers; the domain's errors (404, 409, 422, 503) with the same problem documents
(`service.problems`).

Anything else, every malformed request included, goes to the Litestar route unchanged, with the
body read so far handed on as if unread, so each error is answered in exactly one place. The
Litestar routes stay the contract's documentation (OpenAPI) and its reference: the test suite
checks both give the same answers.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

import msgspec
from litestar import Litestar, Request
from litestar._asgi.utils import is_valid_host  # the router's own check, so that both refuse alike
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, ReceiveMessage, Scope, Send

from service import commands, shapes
from service.api.routes import branch_page, page_of
from service.auth import TokenVerifier
from service.cursors import messages_scope
from service.eventstore import validate_idempotency_key
from service.ids import parse_uuid
from service.problems import answer_for, send_problem

ROUTE: Final = "/v1/conversations/{conversation_id}/messages"  # the metrics' route label, as Litestar gives it
_PATH: Final = re.compile(r"^/v1/conversations/([^/]{1,64})/messages$")
_DECODER: Final = msgspec.json.Decoder(shapes.MessageCreate, strict=True)
_ENCODER: Final = msgspec.json.Encoder()
_JSON: Final = (b"content-type", b"application/json")
_REPLAYED: Final = (b"idempotent-replayed", b"true")


class _Declined(Exception):
    """The request is not one the lean path answers: the Litestar route takes it."""


def lean_paths(app: Litestar) -> Any:
    """A middleware factory: the lean paths in front of `app`'s router."""

    def factory(router: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and (match := _PATH.match(scope["path"])) is not None:
                if scope["method"] == "POST":
                    await _append(app, router, match.group(1), scope, receive, send)
                    return
                if scope["method"] == "GET":
                    await _history(app, router, match.group(1), scope, receive, send)
                    return
            await router(scope, receive, send)

        middleware.__wrapped__ = router  # type: ignore[attr-defined]  # the route alone (the tests compare)
        return middleware

    return factory


async def _append(app: Litestar, router: ASGIApp, conversation: str, scope: Any, receive: Receive, send: Send) -> None:
    read: list[ReceiveMessage] = []
    try:
        user, conversation_id, key = await _request(app, scope, conversation)
        data = _decode(await _body(receive, read, app.state.settings.max_body_bytes))
    except _Declined:
        await router(scope, _replaying(read, receive), send)
        return
    scope["path_template"] = ROUTE  # for the request metrics
    fingerprint = b"" if key is None else commands.request_fingerprint("POST", _path(scope), data)
    try:
        message, replayed = await commands.append_message(
            app.state.store, app.state.heads, user, conversation_id, data, commands.Idempotency(key, fingerprint)
        )
    except Exception as exc:  # every error gets its problem document, as from Litestar
        await send_problem(answer_for(Request(scope, _replaying(read, receive)), exc), scope, receive, send)
        return
    await _answer(send, 201, _ENCODER.encode(message), _REPLAYED if replayed else None)


async def _history(app: Litestar, router: ASGIApp, conversation: str, scope: Any, receive: Receive, send: Send) -> None:
    try:
        user = await _caller(app, scope)
        conversation_id = parse_uuid(conversation)
        limit, order, cursor = _page_query(scope["query_string"])
    except Exception:  # _Declined, a refused token, an id that does not parse: the route answers
        await router(scope, receive, send)
        return
    scope["path_template"] = ROUTE
    state = app.state
    try:
        list_scope = messages_scope(conversation_id, order)
        after = state.cursors.decode(cursor, list_scope, user) if cursor is not None else None
        page, next_after = await branch_page(state, user, conversation_id, limit, order == "desc", None, after, None)
    except Exception as exc:
        await send_problem(answer_for(Request(scope, receive), exc), scope, receive, send)
        return
    await _answer(send, 200, _ENCODER.encode(page_of(state.cursors, list_scope, user, page, next_after)))


async def _answer(send: Send, status: int, encoded: bytes, extra: tuple[bytes, bytes] | None = None) -> None:
    headers = [_JSON, (b"content-length", str(len(encoded)).encode())]
    if extra is not None:
        headers.append(extra)
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": headers}
    body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": encoded, "more_body": False}
    await send(start)
    await send(body)


async def _caller(app: Litestar, scope: Scope) -> str:
    """The caller of a request without a body, read as the route reads it; _Declined (or the
    verifier's error) for anything the route would refuse, or that is not plain."""
    authorization, _ = _headers(app, scope, body=False)
    verifier: TokenVerifier = app.state.verifier
    return await verifier.user_of(authorization)


def _headers(app: Litestar, scope: Scope, *, body: bool) -> tuple[str | None, str | None]:
    """The Authorization header and, for a request with a `body`, the Idempotency-Key, in one
    pass over the headers; _Declined for what the route would refuse before reading them, or
    for either given twice: a host Litestar refuses and, with a body, a Content-Length over the
    limit or a Content-Type that is not JSON."""
    authorization: str | None = None
    key: str | None = None
    for name, value in scope["headers"]:
        if name == b"host" and not is_valid_host(value):
            raise _Declined  # Litestar's router refuses it
        if name == b"authorization":
            if authorization is not None:
                raise _Declined
            authorization = value.decode("latin-1")
        elif not body:
            continue
        elif name == b"content-length" and not (value.isdigit() and int(value) <= app.state.settings.max_body_bytes):
            raise _Declined  # a 413 (or 422) before the body is read, from Litestar
        elif name == b"idempotency-key":
            if key is not None:
                raise _Declined
            key = value.decode("latin-1")
        elif name == b"content-type" and value.split(b";", 1)[0].strip().lower() != b"application/json":
            raise _Declined
    return authorization, key


_LIMIT: Final = re.compile(rb"[1-9][0-9]?|100")
_CURSOR: Final = re.compile(rb"[A-Za-z0-9_.-]{1,2048}")  # as `Cursors` spells them: nothing to unquote


def _page_query(query: bytes) -> tuple[int, str, str | None]:
    """The history page's limit, order and cursor from a query of those alone, each once and
    plainly spelled; _Declined for anything else (the route reads it, or refuses it)."""
    limit, order, cursor = 50, "asc", None
    seen: set[bytes] = set()
    for part in query.split(b"&") if query else ():
        name, equals, value = part.partition(b"=")
        if not equals or name in seen:
            raise _Declined
        seen.add(name)
        if name == b"limit" and _LIMIT.fullmatch(value):
            limit = int(value)
        elif name == b"order" and value in (b"asc", b"desc"):
            order = value.decode()
        elif name == b"cursor" and _CURSOR.fullmatch(value):
            cursor = value.decode()
        else:
            raise _Declined
    return limit, order, cursor


async def _request(app: Litestar, scope: Scope, conversation_id: str) -> tuple[str, uuid.UUID, str | None]:
    """The caller, the conversation's id and the Idempotency-Key, each read as the route reads
    them; _Declined for anything the route would refuse, or that is not plain."""
    authorization, key = _headers(app, scope, body=True)
    verifier: TokenVerifier = app.state.verifier
    try:
        user = await verifier.user_of(authorization)
        if key is not None:
            validate_idempotency_key(key)
        return user, parse_uuid(conversation_id), key
    except Exception:  # a refused token, key or id; a JWKS fetch that failed: the route answers
        raise _Declined from None


async def _body(receive: Receive, read: list[ReceiveMessage], limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            raise _Declined  # the client went away: Litestar answers as it does
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Declined  # 413, from Litestar
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _decode(body: bytes) -> shapes.MessageCreate:
    try:
        data: shapes.MessageCreate = _DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise _Declined from None  # the route's 422, worded there
    return data


def _path(scope: Scope) -> str:
    """The request's path as Litestar's `request.url.path` gives it (the idempotency fingerprint's)."""
    return str(scope.get("root_path", "")) + str(scope["path"])


def _replaying(read: list[ReceiveMessage], receive: Receive) -> Receive:
    """`receive` as if `read` had not been taken from it yet."""
    pending = list(read)

    async def replay() -> ReceiveMessage:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
