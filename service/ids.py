"""UUID version 7 (RFC 9562): time-ordered ids, so new rows land at the right end of an index."""

from __future__ import annotations

import os
import time
import uuid

_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RANDOM_BITS = (0x0FFF << 64) | 0x3FFF_FFFF_FFFF_FFFF  # rand_a (12 bits), rand_b (62 bits)


def uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (rand & _RANDOM_BITS) | _VERSION_AND_VARIANT
    return uuid.UUID(int=value)
