"""The append's lean path: `POST /v1/conversations/{id}/messages` served below Litestar's router.

The append is the route a chat app calls most, and Litestar's per-request machinery (routing,
the signature model, dependency resolution, the response object) cost more CPU than the rest of
an append together (issue 13's profile). This path takes a well-formed request that plainly
succeeds or fails in the domain: a JSON body read within the size limit that decodes strictly
as a `MessageCreate`, one Bearer token that verifies, an optional well-formed Idempotency-Key,
an id that parses. It calls the same command as the Litestar route and answers with the same
bytes and headers; the domain's errors (404, 409, 422 from the command) with the same problem
documents (`service.problems`).

Anything else, every malformed request included, goes to the Litestar route unchanged, with the
body read so far handed on as if unread, so each error is answered in exactly one place. The
Litestar route stays the contract's documentation (OpenAPI) and its reference: the test suite
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
from service.auth import TokenVerifier
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


def lean_append(app: Litestar) -> Any:
    """A middleware factory: the append's lean path in front of `app`'s router."""

    def factory(router: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST" or (match := _PATH.match(scope["path"])) is None:
                await router(scope, receive, send)
                return
            read: list[ReceiveMessage] = []
            try:
                user, conversation_id, key = await _request(app, scope, match.group(1))
                data = _decode(await _body(receive, read, app.state.settings.max_body_bytes))
            except _Declined:
                await router(scope, _replaying(read, receive), send)
                return
            scope["path_template"] = ROUTE  # for the request metrics
            fingerprint = b"" if key is None else commands.request_fingerprint("POST", _path(scope), data)
            try:
                message, replayed = await commands.append_message(
                    app.state.store,
                    app.state.heads,
                    user,
                    conversation_id,
                    data,
                    commands.Idempotency(key, fingerprint),
                )
            except Exception as exc:  # every error gets its problem document, as from Litestar
                answer = answer_for(Request(scope, _replaying(read, receive)), exc)
                await send_problem(answer, scope, receive, send)
                return
            encoded = _ENCODER.encode(message)
            headers = [_JSON, (b"content-length", str(len(encoded)).encode())]
            if replayed:
                headers.append(_REPLAYED)
            start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 201, "headers": headers}
            body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": encoded, "more_body": False}
            await send(start)
            await send(body)

        middleware.__wrapped__ = router  # type: ignore[attr-defined]  # the route alone (the tests compare)
        return middleware

    return factory


async def _request(app: Litestar, scope: Scope, conversation_id: str) -> tuple[str, uuid.UUID, str | None]:
    """The caller, the conversation's id and the Idempotency-Key, each read as the route reads
    them; _Declined for anything the route would refuse, or that is not plain."""
    authorization: str | None = None
    key: str | None = None
    for name, value in scope["headers"]:
        if name == b"host" and not is_valid_host(value):
            raise _Declined  # Litestar's router refuses it
        if name == b"content-length" and not (value.isdigit() and int(value) <= app.state.settings.max_body_bytes):
            raise _Declined  # a 413 (or 422) before the body is read, from Litestar
        if name == b"authorization":
            if authorization is not None:
                raise _Declined
            authorization = value.decode("latin-1")
        elif name == b"idempotency-key":
            if key is not None:
                raise _Declined
            key = value.decode("latin-1")
        elif name == b"content-type" and value.split(b";", 1)[0].strip().lower() != b"application/json":
            raise _Declined
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
