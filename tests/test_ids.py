"""Ids are UUIDv7: time-ordered, random in the rest, never repeated (also across a fork)."""

from __future__ import annotations

import os
import time
import uuid

from service.ids import uuid7


def test_ids_are_version_7_in_time_order_and_unique() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(20_000)]
    after = time.time_ns() // 1_000_000
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    stamps = [u.int >> 80 for u in ids]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= after
    assert len(set(ids)) == len(ids)
    assert len({u.int & ((1 << 62) - 1) for u in ids}) == len(ids), "the random bits differ"


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    uuid7()  # the parent has a buffer of random bits when it forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next ids and leave without running the test session's exit
        os.write(write, b"".join(uuid7().bytes for _ in range(50)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    child = {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}
    parent = {uuid7() for _ in range(50)}
    assert len(child) == 50 and not child & parent
    assert {u.int & ((1 << 62) - 1) for u in child}.isdisjoint({u.int & ((1 << 62) - 1) for u in parent})
