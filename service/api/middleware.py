"""Request ids, one structured log line per request, and request metrics (plain ASGI, wrapped
around the app's router by `create_app`, so that every answer has them).

This runs on every request, so it does little: one pass over the headers, label lookups of the
metrics cached by (method, route, status) (prometheus_client's `labels()` costs microseconds),
and the log line built only when INFO is on.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from litestar.types import ASGIApp, Message, Receive, Send
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.ids import uuid7
from service.problems import problem, send_problem

log = logging.getLogger("chatlog.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Any other method is counted as "other": a client must not be able to add label values at will.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "chatlog_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "chatlog_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"  # before the cache, too: it must not grow with made-up methods
        series = self._series.get((method, route, status))
        if series is None:
            series = self.requests.labels(method, route, str(status)), self.latency.labels(method, route)
            self._series[method, route, status] = series
        series[0].inc()
        series[1].observe(seconds)


def request_context(metrics: RequestMetrics) -> Any:
    """A middleware factory: assigns X-Request-ID (or keeps a well-formed one from the client)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            request_id = None
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    given = value.decode("latin-1")
                    request_id = given if _REQUEST_ID.match(given) else None
                    break
            if request_id is None:
                request_id = str(uuid7())
            scope.setdefault("state", {})["request_id"] = request_id
            id_header = (b"x-request-id", request_id.encode())
            status = 500  # if the app fails without answering (the server then answers 500)
            # Litestar would read a query that is not UTF-8 as U+FFFD and answer as if it were text
            handler = app if _query_is_utf8(scope["query_string"]) else _refuse_query
            responded = False

            async def send_with_id(message: Message) -> None:
                nonlocal status, responded
                if message["type"] == "http.response.start":
                    status, responded = message["status"], True
                    message["headers"] = [*message.get("headers", ()), id_header]
                await send(message)

            try:
                await handler(scope, receive, send_with_id)
                if not responded:
                    status = 499  # the client went away before an answer (nginx's "client closed request")
            finally:
                seconds = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                metrics.observe(scope["method"], route, status, seconds)
                if log.isEnabledFor(logging.INFO):
                    line = {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "ms": round(seconds * 1000, 2),
                    }
                    log.info(json.dumps(line))  # ASCII: a path may hold lone surrogates

        middleware.__wrapped__ = app  # type: ignore[attr-defined]  # what it wraps (the tests reach in)
        return middleware

    return factory


def _query_is_utf8(query: bytes) -> bool:
    """Whether the query string, percent-decoded, is UTF-8 (and so holds no lone surrogate)."""
    if b"%" not in query and query.isascii():
        return True
    try:
        unquote_to_bytes(query.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _refuse_query(scope: Any, receive: Receive, send: Send) -> None:
    answer = problem(422, "the query string is not valid UTF-8 (or holds a lone surrogate)")
    await send_problem(answer, scope, receive, send)
