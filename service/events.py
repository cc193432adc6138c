"""The domain events: one msgspec tagged union, validated before any SQL, upcast on read.

Every string an event carries is free of NUL characters and lone surrogates (PostgreSQL's
jsonb refuses both, so they must be stopped here, as a validation error, not at the database).
The limits here are the log's own ceilings; the HTTP API enforces its configured limits, which
may be lower, before it builds an event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

import msgspec

CLEAN_TEXT: Final = r"^[^\x00\ud800-\udfff]*$"  # escapes, so that the OpenAPI document can carry it
MAX_CONTENT: Final = 32_768
MAX_TITLE: Final = 200
MAX_METADATA_KEYS: Final = 16
MAX_METADATA_KEY: Final = 64
MAX_METADATA_VALUE: Final = 512

Title = Annotated[str, msgspec.Meta(max_length=MAX_TITLE, pattern=CLEAN_TEXT)]
Content = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CONTENT, pattern=CLEAN_TEXT)]
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METADATA_KEY, pattern=CLEAN_TEXT)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=MAX_METADATA_VALUE, pattern=CLEAN_TEXT)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=MAX_METADATA_KEYS)]
Role = Literal["user", "assistant", "system", "tool"]


class EventValidationError(ValueError):
    """An event that must not enter the log; raised before any SQL is sent."""


class Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of every event. Its type's schema version is stored in the event's metadata."""


class ConversationStarted(Event, tag="conversation.started", frozen=True):
    title: Title = ""
    metadata: Metadata = msgspec.field(default_factory=dict)


class MessageAppended(Event, tag="message.appended", frozen=True):
    message_id: uuid.UUID
    role: Role
    content: Content
    metadata: Metadata = msgspec.field(default_factory=dict)
    # The message's number in its conversation (1, 2, ...), as the command that appended it
    # decided; the fold checks it. Absent, it is the count of the conversation's messages so far.
    seq: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # The message it follows (None: a first message). Schema version 2; a version-1 event has
    # none, and its parent is the message appended before it (see `upcast_parent`).
    parent_id: uuid.UUID | None = None


class BranchSelected(Event, tag="branch.selected", frozen=True):
    """The conversation's active branch now ends at this message."""

    leaf_id: uuid.UUID


class ConversationForked(Event, tag="conversation.forked", frozen=True):
    """A conversation's first event when it is a fork: copies of the branch follow it."""

    source_conversation_id: uuid.UUID
    source_message_id: uuid.UUID
    title: Title = ""
    metadata: Metadata = msgspec.field(default_factory=dict)


class ConversationUpdated(Event, tag="conversation.updated", frozen=True):
    title: Title | None = None
    metadata: Metadata | None = None


class ConversationDeleted(Event, tag="conversation.deleted", frozen=True):
    pass


DomainEvent = (
    ConversationStarted
    | MessageAppended
    | ConversationUpdated
    | ConversationDeleted
    | BranchSelected
    | ConversationForked
)
EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        ConversationStarted,
        MessageAppended,
        ConversationUpdated,
        ConversationDeleted,
        BranchSelected,
        ConversationForked,
    )
}

# What of an event stays in clear in the log: its ids and numbers, which queries use. The rest
# (titles, metadata, contents, roles) is sealed under its stream's data key (service/sealing.py);
# an event type without fields has nothing to seal.
STRUCTURE: Final = ("message_id", "seq", "parent_id", "leaf_id")
CONTENT_FREE: Final = frozenset(tag for tag, cls in EVENT_TYPES.items() if not cls.__struct_fields__)
STARTS_STREAM: Final = frozenset(
    {"conversation.started", "conversation.forked"}
)  # an append that begins with it makes a new stream

# The current schema version of each event type. An upcaster turns the data of version n of
# a type into version n + 1; stored events are never rewritten.
SCHEMA_VERSIONS: Final[dict[str, int]] = {**dict.fromkeys(EVENT_TYPES, 1), "message.appended": 2}
# message.appended 1 -> 2 adds `parent_id`. The data alone cannot say which message came before,
# so the upcast leaves it None and marks the event; whoever folds the stream (which knows the
# previous message) gives it its parent: `upcast_parent`.
UPCASTERS: Final[dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    ("message.appended", 1): lambda raw: {**raw, "parent_id": None},
}


def upcast_parent(event: MessageAppended, schema_version: int, previous: uuid.UUID | None) -> uuid.UUID | None:
    """A message's parent: its own, or, for a version-1 event, the message appended before it."""
    return previous if schema_version < 2 else event.parent_id


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[DomainEvent] = msgspec.json.Decoder(DomainEvent)


_TAGS: Final[dict[type, str]] = {cls: tag for tag, cls in EVENT_TYPES.items()}
_VALIDATORS: Final[dict[type, msgspec.json.Decoder[Any]]] = {cls: msgspec.json.Decoder(cls) for cls in _TAGS}


def event_type(event: Event) -> str:
    return _TAGS[type(event)]


def encode_validated(event: object) -> bytes:
    """The event's JSON, after checking it against its type's constraints.

    msgspec checks constraints only when decoding, so the encoded form is decoded once more.
    """
    validator = _VALIDATORS.get(type(event))
    if validator is None:
        raise EventValidationError(f"unknown event type: {type(event).__name__}")
    try:
        data = _encoder.encode(event)
        validator.decode(data)
    except UnicodeEncodeError as exc:
        raise EventValidationError(f"{_TAGS[type(event)]}: text contains a lone surrogate") from exc
    except (msgspec.ValidationError, msgspec.EncodeError) as exc:
        raise EventValidationError(f"{_TAGS[type(event)]}: {exc}") from exc
    return data


def decode_event(type_: str, data: str | bytes, schema_version: int = 1) -> DomainEvent:
    """Decode stored event data, upcasting older schema versions to the current one."""
    current = SCHEMA_VERSIONS.get(type_)
    if current is None:
        raise EventValidationError(f"unknown event type in the log: {type_}")
    if schema_version == current:
        return _decoder.decode(data)
    raw: dict[str, Any] = msgspec.json.decode(data)
    for version in range(schema_version, current):
        raw = UPCASTERS[(type_, version)](raw)
    upcast: DomainEvent = msgspec.convert(raw, DomainEvent)
    return upcast
