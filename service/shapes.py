"""Request and response bodies of the HTTP API (shared/API.md), as msgspec Structs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from service.events import Content, Metadata, Role, Title

T = TypeVar("T")

Version = Annotated[int, msgspec.Meta(ge=0, le=2_147_483_647)]
# RFC 3339, UTC, always with microseconds ("2026-11-24T17:22:34.123456Z"); msgspec would drop a
# zero fraction, so timestamps are rendered by `timestamp()`.
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]


_encode_json = msgspec.json.Encoder().encode


def timestamp(moment: datetime) -> str:
    # This runs for every item of every answer: msgspec's own rendering (a twentieth of
    # isoformat's cost) where it agrees, isoformat where msgspec would drop a zero fraction.
    if moment.microsecond and moment.tzinfo is UTC:
        return _encode_json(moment)[1:-1].decode()
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: Title = ""
    metadata: Metadata = msgspec.field(default_factory=dict)
    id: uuid.UUID | None = None


class ConversationPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: Title | None = None
    metadata: Metadata | None = None
    active_leaf_id: uuid.UUID | None = None  # switch to the branch that ends at this message
    expected_version: Version | None = None


class MessageCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Role
    content: Content
    metadata: Metadata = msgspec.field(default_factory=dict)
    # The message it follows; null: none (a first message, e.g. an edit of the first one);
    # absent: the active leaf.
    parent_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    expected_version: Version | None = None


class ForkedFrom(msgspec.Struct, kw_only=True):
    conversation_id: uuid.UUID
    message_id: uuid.UUID


class ForkCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    message_id: uuid.UUID | None = None  # the branch's last message; default: the active leaf
    title: Title | None = None  # default: the source's title


class Conversation(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    object: Literal["conversation"] = "conversation"
    title: str
    metadata: dict[str, str]
    created_at: Timestamp
    updated_at: Timestamp
    message_count: int
    last_message_preview: str | None
    version: int
    active_leaf_id: uuid.UUID | None = None  # the last message of the active branch
    forked_from: ForkedFrom | None = None
    # Only in the answer to a write: the position of its last event.
    position: int | msgspec.UnsetType = msgspec.UNSET


class Message(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    object: Literal["message"] = "message"
    conversation_id: uuid.UUID
    seq: int
    role: Role
    content: str
    metadata: dict[str, str]
    created_at: Timestamp
    position: int
    parent_id: uuid.UUID | None = None  # the message it follows; None for a first message


class LogEvent(msgspec.Struct, kw_only=True):
    position: int
    event_id: uuid.UUID
    type: str
    conversation_id: uuid.UUID
    version: int
    data: dict[str, Any] | None  # None when erased
    metadata: dict[str, Any] | None  # None when erased
    recorded_at: Timestamp
    # `true` on an erased event (API.md, "Deleting is erasing"); absent on the others, whose
    # shape stays as the contract lists it
    erased: bool | msgspec.UnsetType = msgspec.UNSET


class Page(msgspec.Struct, Generic[T], kw_only=True):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None
    current_version: int | None = None
    conversation_id: uuid.UUID | None = None  # assistant_error: where the user's message is stored
    position: int | None = None  # assistant_error: the user's message's (for min_position)
