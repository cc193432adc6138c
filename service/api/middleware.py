"""Request ids, one structured log line per request, and request metrics (plain ASGI)."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Send
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.ids import uuid7

log = logging.getLogger("chatlog.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


def request_context(metrics: RequestMetrics) -> Any:
    """A middleware factory: assigns X-Request-ID (or keeps a well-formed one from the client)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
            request_id = given if _REQUEST_ID.match(given) else str(uuid7())
            scope.setdefault("state", {})["request_id"] = request_id
            status = 500
            started = time.perf_counter()

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                seconds = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                method = scope["method"]
                metrics.requests.labels(method, route, str(status)).inc()
                metrics.latency.labels(method, route).observe(seconds)
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        json.dumps(
                            {
                                "request_id": request_id,
                                "method": method,
                                "path": scope["path"],
                                "route": route,
                                "status": status,
                                "ms": round(seconds * 1000, 2),
                            }
                        )
                    )

        return middleware

    return factory
