"""One exception translator: every error becomes an RFC 9457 problem document.

Domain errors are plain exceptions raised where they are found (the store, the commands, the
auth check); this module alone knows their HTTP status and `code`. Nothing of a stack trace or
of SQL reaches a client: an unexpected error is logged with the request id and answered 500.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Receive, Scope, Send

from service.assistants import AssistantError
from service.connections import DATABASE_UNAVAILABLE
from service.errors import BadRequest, ConversationExists, NotReady, Unauthorized
from service.events import EventValidationError
from service.eventstore import IdempotencyMismatch, NotFound, StaleTransaction, VersionConflict
from service.shapes import Problem

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"

_TITLES: Final = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}
_CODES: Final = {
    400: "validation_error",
    401: "unauthorized",
    404: "not_found",
    405: "not_found",  # no such operation; the contract's codes are a closed list without one for 405
    409: "version_conflict",
    413: "payload_too_large",
    415: "validation_error",
    422: "validation_error",
    500: "internal",
    503: "not_ready",
}


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[bytes]:
    if status == 422 and errors is None:
        errors = [{"message": detail}]  # every 422 lists what is wrong, as the contract's example does
    body = Problem(
        type=f"https://chatlog.dev/problems/{(code or _CODES.get(status, 'error')).replace('_', '-')}",
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        code=code or _CODES.get(status, "error"),
        errors=errors,
        **extra,
    )
    return Response(msgspec.json.encode(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers or {})


async def send_problem(answer: Response[bytes], scope: Scope, receive: Receive, send: Send) -> None:
    """Send a `problem` answer from plain ASGI code, below Litestar's handlers (middleware, mounts)."""
    await answer.to_asgi_response(app=None, request=None)(scope, receive, send)  # type: ignore[arg-type]


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    errors = [_plain(e) for e in exc.extra] if isinstance(exc.extra, list) else None
    detail = "; ".join(str(e.get("message", "")) for e in errors or []) or _clean(exc.detail)
    return problem(422, detail or "the request is not valid", errors=errors)


def _plain(error: Any) -> dict[str, Any]:
    if not isinstance(error, dict):
        return {"message": _clean(str(error))}
    plain = {k: (_clean(v) if isinstance(v, str) else v) for k, v in error.items() if k in ("key", "message", "source")}
    if plain.get("message") == f"'{plain.get('key')}'":  # Litestar's KeyError text for a missing value
        key = plain["key"]
        plain["message"] = "the body is empty: a JSON object is expected" if key == "data" else f"{key} is missing"
    return plain


def _clean(text: str) -> str:
    """Litestar's messages can echo parts of the input; keep them short and printable."""
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\u0000")
    return text if len(text) <= 300 else text[:300] + "..."


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status == 400:
        status = 422  # malformed JSON, bad path or query values: the contract says 422
    if isinstance(exc, NotAuthorizedException):
        return problem(401, _clean(exc.detail), headers={"WWW-Authenticate": "Bearer"})
    detail = _clean(exc.detail) if exc.detail else _TITLES.get(status, "Error")
    if exc.status_code == 400 and detail.startswith(_JSON_ERRORS):
        # msgspec's words; a high surrogate escape without its low half reads as "truncated"
        detail = f"the body is not valid JSON, or holds a lone surrogate: {detail}"
    return problem(status, detail, headers=exc.headers)


_JSON_ERRORS: Final = ("Input data was truncated", "JSON is malformed")


def _internal(request: Request[Any, Any, Any] | None, exc: Exception) -> Response[bytes]:
    if request is None:
        log.error("unhandled error in an MCP tool", exc_info=exc)
    else:
        log.error(
            "unhandled error in %s %s (request %s)",
            request.method,
            request.url.path,
            request.scope.get("state", {}).get("request_id"),
            exc_info=exc,
        )
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "an internal error occurred; it has been logged")


_outage_logged_at: float | None = None
OUTAGE_LOG_INTERVAL: Final = 30.0


def _unavailable(request: Request[Any, Any, Any] | None, exc: Exception) -> Response[bytes]:
    """The database cannot be had (down, restarting, failing over): 503 `not_ready`, and one log
    line per outage (again every 30 s while it lasts), not a traceback per request."""
    global _outage_logged_at
    now = time.monotonic()
    if _outage_logged_at is None or now - _outage_logged_at > OUTAGE_LOG_INTERVAL:
        _outage_logged_at = now
        log.warning("the database is unavailable (%s: %s); answering 503 meanwhile", type(exc).__name__, exc)
    return problem(503, "the database is unavailable right now; retry shortly", headers={"Retry-After": "1"})


def _recursion(request: Request[Any, Any, Any] | None, exc: RecursionError) -> Response[bytes]:
    """msgspec decodes nested JSON on the stack: a body nested deeper than it allows is bad input.
    Any other RecursionError is a defect of ours."""
    if "deserializing" in str(exc):
        return problem(422, "the JSON body is nested too deeply")
    return _internal(request, exc)


EXCEPTION_HANDLERS: Final[dict[int | type[Exception], Any]] = {
    ValidationException: _validation,
    HTTPException: _http,
    NotFound: lambda r, e: problem(404, "no such resource for this user"),
    VersionConflict: lambda r, e: problem(
        409, f"expected version {e.expected}, the conversation is at version {e.current}", current_version=e.current
    ),
    StaleTransaction: lambda r, e: problem(409, "the conversation changed meanwhile; retry", code="version_conflict"),
    ConversationExists: lambda r, e: problem(409, "a conversation with this id exists", code="version_conflict"),
    IdempotencyMismatch: lambda r, e: problem(
        422, "this Idempotency-Key was used for a different request", code="idempotency_mismatch"
    ),
    EventValidationError: lambda r, e: problem(422, _clean(str(e))),
    BadRequest: lambda r, e: problem(
        422, _clean(str(e)), errors=[{"key": e.field, "message": _clean(str(e))}] if e.field else None
    ),
    # Litestar meets a body that is not UTF-8 before any handler: bad input, not a server error.
    UnicodeDecodeError: lambda r, e: problem(422, "the body is not valid UTF-8"),
    RecursionError: _recursion,
    **dict.fromkeys(DATABASE_UNAVAILABLE, _unavailable),
    # A serialization failure or deadlock that reached no retry of ours; on a read replica, a
    # read that its replay cancelled ("conflict with recovery", 40001). Retrying it is the answer.
    asyncpg.exceptions.TransactionRollbackError: lambda r, e: problem(
        503, "the read conflicted with concurrent changes; retry shortly", headers={"Retry-After": "1"}
    ),
    Unauthorized: lambda r, e: problem(401, _clean(str(e)), headers={"WWW-Authenticate": "Bearer"}),
    NotReady: lambda r, e: problem(503, str(e), headers={"Retry-After": str(e.retry_after)}),
    AssistantError: lambda r, e: problem(
        502, _clean(str(e)), code="assistant_error", conversation_id=e.conversation_id, position=e.position
    ),
    Exception: _internal,
}


def answer_for(request: Request[Any, Any, Any] | None, exc: Exception) -> Response[bytes]:
    """The problem document for `exc`, for an error met where Litestar cannot translate it (in
    the middle of a streamed answer, in an MCP tool: no request): the handler of its nearest class."""
    for cls in type(exc).__mro__:
        if (handler := EXCEPTION_HANDLERS.get(cls)) is not None:
            answer: Response[bytes] = handler(request, exc)
            return answer
    return _internal(request, exc)


__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_MEDIA_TYPE", "answer_for", "problem", "send_problem"]
