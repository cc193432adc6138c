"""Errors the API's commands and queries raise; `service.api.problems` maps them to HTTP."""

from __future__ import annotations


class BadRequest(Exception):
    """Input the API refuses (422 validation_error), with the offending field if known."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.field = field


class NotReady(Exception):
    """The read models have not caught up with the asked position in time (503)."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unauthorized(Exception):
    """No valid bearer token (401)."""


class ConversationExists(Exception):
    """A client-supplied conversation id that is taken, by anyone (409)."""
