"""Ids: UUID version 7 (RFC 9562), time-ordered, so new rows land at the right end of an index;
and the one parser of ids given as text (paths, MCP arguments, filters).

The random bits come from the operating system's CSPRNG, read 4 KiB at a time: under load a
`getrandom` system call per id cost more than the rest of making it. A forked child drops the
buffer it inherited, so that parent and child never hand out the same bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Final

import msgspec

from service.errors import BadRequest

_VERSION_AND_VARIANT: Final = (0x7 << 76) | (0b10 << 62)
_RANDOM_BITS: Final = (0x0FFF << 64) | 0x3FFF_FFFF_FFFF_FFFF  # rand_a (12 bits), rand_b (62 bits)
_CHUNK: Final = 10  # bytes of randomness per id (74 of their bits are used)
_BUFFER: Final = 4096 // _CHUNK * _CHUNK

_random = b""
_offset = 0
_lock = threading.Lock()  # threads must not take the same bytes


def _drop_buffer() -> None:
    global _random, _offset, _lock
    _random, _offset, _lock = b"", 0, threading.Lock()  # a lock held by another thread at the fork stays held


os.register_at_fork(after_in_child=_drop_buffer)


def uuid7() -> uuid.UUID:
    global _random, _offset
    with _lock:
        if _offset >= len(_random):
            _random, _offset = os.urandom(_BUFFER), 0
        chunk = _random[_offset : _offset + _CHUNK]
        _offset += _CHUNK
    rand = int.from_bytes(chunk, "big")
    ms = time.time_ns() // 1_000_000
    return uuid.UUID(int=((ms & 0xFFFF_FFFF_FFFF) << 80) | (rand & _RANDOM_BITS) | _VERSION_AND_VARIANT)


def parse_uuid(value: str, field: str = "conversation_id") -> uuid.UUID:
    """A malformed id is a validation error (422), not a missing route (404).

    The forms a JSON body's ids take (msgspec's): canonical, in either case, or its 32 hex digits;
    not the braces, `urn:uuid:` or stray hyphens that `uuid.UUID` also lets through."""
    try:
        parsed: uuid.UUID = msgspec.convert(value, uuid.UUID)
    except (msgspec.ValidationError, UnicodeEncodeError):  # the latter: a lone surrogate
        raise BadRequest(f"not a valid {field.replace('_id', '')} id (a UUID)", field=field) from None
    return parsed
