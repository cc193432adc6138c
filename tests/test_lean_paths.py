"""The append's lean path (service/api/lean.py) answers exactly as the Litestar route does.

Two users with identical histories: each request is sent once through the app as served (the
lean path in front of the route) to the first, and once to the Litestar route alone to the
second; the answers must be the same, ids, times and positions aside. Well-formed requests must
be answered by the lean path itself, never handed on.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.api.lean import lean_paths
from service.app import create_app
from tests.support import SECRET, token
from tests.test_api_bad_input import DEEP, MESSAGE_BODIES
from tests.test_operations import settings_for

VARYING = re.compile(
    r'"(id|conversation_id|parent_id|created_at|position|next_cursor)":("[^"]*"|\d+)'  # ids, times, positions, cursors
)
OTHER = "00000000-0000-7000-8000-000000000001"


class Pair:
    """The app with its lean path, the route alone, and two users' mirrored conversations."""

    def __init__(self, app: Litestar, client: AsyncTestClient[Litestar]) -> None:
        self.app, self.client = app, client
        self.served = app.asgi_handler
        self.route = self.served.__wrapped__.__wrapped__  # type: ignore[attr-defined]  # inside request ids, lean path
        self.handed_on = 0

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/messages"):
                self.handed_on += 1
            await self.route(scope, receive, send)

        self.counted = counted

    async def ask(self, lean: bool, method: str, url: str, *, user: str | None, **kw: Any) -> httpx.Response:
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        if user is not None:
            headers["authorization"] = f"Bearer {token(user)}"
        # the lean path (in front of the route, counting what it hands on), or the route alone
        self.app.asgi_handler = lean_paths(self.app)(self.counted) if lean else self.route
        try:
            return await self.client.request(method, url, headers=headers, **kw)
        finally:
            self.app.asgi_handler = self.served


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    app = create_app(msgspec.structs.replace(settings_for(db_url, tmp_path), jwt_secret=SECRET))
    async with AsyncTestClient(app=app) as client:
        yield Pair(app, client)


def plain(r: httpx.Response) -> tuple[int, str, dict[str, str]]:
    """An answer without what differs between the two users: its status, its body with ids,
    times and positions blanked, and the headers a client reads."""
    assert r.headers.get("content-length") in (None, str(len(r.content)))
    headers = {k: v for k, v in r.headers.items() if k in ("content-type", "idempotent-replayed", "www-authenticate")}
    return r.status_code, VARYING.sub(r'"\1":_', r.text), headers


async def test_the_lean_path_answers_every_append_as_the_route_does(pair: Pair) -> None:
    sides = {True: "lean-side", False: "route-side"}
    conversations: dict[bool, str] = {}
    for lean, user in sides.items():
        r = await pair.client.post(
            "/v1/conversations", json={"title": "t"}, headers={"authorization": f"Bearer {token(user)}"}
        )
        assert r.status_code == 201
        conversations[lean] = r.json()["id"]
    foreign = (
        await pair.client.post("/v1/conversations", json={}, headers={"authorization": f"Bearer {token('owner')}"})
    ).json()["id"]

    ok = b'{"role": "user", "content": "hello"}'
    cases: list[tuple[str, str, bytes, dict[str, str], str | None, bool | None]] = [
        # (name, url suffix, body, headers, user, answered by the lean path)
        ("an append", "", ok, {}, "me", True),
        ("with metadata", "", b'{"role": "assistant", "content": "x", "metadata": {"k": "v"}}', {}, "me", True),
        ("a fresh expected_version", "", b'{"role": "user", "content": "x", "expected_version": 3}', {}, "me", True),
        ("a stale expected_version", "", b'{"role": "user", "content": "x", "expected_version": 1}', {}, "me", True),
        (
            "a parent of another conversation",
            "",
            b'{"role": "user", "content": "x", "parent_id": "' + OTHER.encode() + b'"}',
            {},
            "me",
            True,
        ),
        ("a first message again", "", b'{"role": "user", "content": "edit", "parent_id": null}', {}, "me", True),
        ("an idempotency key", "", ok, {"idempotency-key": "k-1"}, "me", True),
        ("its retry", "", ok, {"idempotency-key": "k-1"}, "me", True),
        (
            "the key for another body",
            "",
            b'{"role": "user", "content": "other"}',
            {"idempotency-key": "k-1"},
            "me",
            True,
        ),
        ("nul in content, escaped", "", MESSAGE_BODIES["nul in content"], {}, "me", False),
        ("an idempotency key too long", "", ok, {"idempotency-key": "k" * 256}, "me", False),
        ("no token", "", ok, {}, None, False),
        ("a bad token", "", ok, {"authorization": "Bearer nope"}, None, False),
        ("a text body", "", ok, {"content-type": "text/plain"}, "me", False),
        ("a host header that is not one", "", ok, {"host": "a b"}, "me", False),
        ("a body over the limit", "", b'{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}', {}, "me", False),
        ("an empty body", "", b"", {}, "me", False),
        (
            "deep nesting",
            "",
            b'{"role": "user", "content": "x", "metadata": ' + b"[" * DEEP + b"]" * DEEP + b"}",
            {},
            "me",
            False,
        ),
        ("a lone surrogate", "", MESSAGE_BODIES["surrogate in content"], {}, "me", False),
        ("not UTF-8", "", b'{"role": "user", "content": "\xff"}', {}, "me", False),
        *((name, "", body, {}, "me", None) for name, body in MESSAGE_BODIES.items()),  # either
    ]
    for name, _, body, headers, who, by_lean in cases:
        answers = []
        for lean, user in sides.items():
            before = pair.handed_on
            r = await pair.ask(
                lean, "POST", f"/v1/conversations/{conversations[lean]}/messages", user=user if who else None,
                content=body, headers=headers,
            )  # fmt: skip
            if lean and by_lean is not None:
                assert (pair.handed_on == before) == by_lean, (
                    f"{name}: lean path {'declined' if by_lean else 'took'} it"
                )
            answers.append(plain(r))
        assert answers[0] == answers[1], name
    for name, url, lean_url in (
        ("another user's conversation", f"/v1/conversations/{foreign}/messages", None),
        ("an unknown conversation", f"/v1/conversations/{OTHER}/messages", None),
        ("a malformed id", "/v1/conversations/not-a-uuid/messages", None),
        ("an id too long", "/v1/conversations/" + "a" * 65 + "/messages", None),
    ):
        answers = [
            plain(await pair.ask(lean, "POST", lean_url or url, user=user, content=ok)) for lean, user in sides.items()
        ]
        assert answers[0] == answers[1], name
    statuses = {}
    for lean, user in sides.items():
        page = await pair.client.get(
            f"/v1/conversations/{conversations[lean]}/messages?limit=100&tree=true",
            headers={"authorization": f"Bearer {token(user)}"},
        )
        statuses[lean] = [(m["seq"], m["role"], m["content"]) for m in page.json()["data"]]
    assert (
        statuses[True] == statuses[False] and len(statuses[True]) == 6
    )  # the same messages stored, once each (a text/plain body is JSON all the same)
    for body in (ok, b"{}"):  # as served: the lean path answers the first, the route the second
        mine = {"authorization": f"Bearer {token(sides[True])}", "content-type": "application/json"}
        await pair.client.post(f"/v1/conversations/{conversations[True]}/messages", content=body, headers=mine)
    metrics = (await pair.client.get("/metrics")).text
    route = 'method="POST",route="/v1/conversations/{conversation_id}/messages"'
    assert f'{route},status="201"' in metrics and f'{route},status="422"' in metrics  # one series, either path
    assert ":str}" not in metrics


async def test_the_lean_path_answers_every_history_page_as_the_route_does(pair: Pair) -> None:
    sides = {True: "lean-reader", False: "route-reader"}
    conversations: dict[bool, str] = {}
    for lean, user in sides.items():
        auth = {"authorization": f"Bearer {token(user)}"}
        cid = (await pair.client.post("/v1/conversations", json={"title": "t"}, headers=auth)).json()["id"]
        conversations[lean] = cid
        first = None
        for n in range(5):
            r = await pair.client.post(
                f"/v1/conversations/{cid}/messages", json={"role": "user", "content": f"m{n} <b>&"}, headers=auth
            )
            first = first or r.json()["id"]
        # an edit of the second message: the active branch is then m0, the edit
        r = await pair.client.post(
            f"/v1/conversations/{cid}/messages", json={"role": "user", "content": "edit", "parent_id": first},
            headers=auth,
        )  # fmt: skip
        assert r.status_code == 201
    foreign = (
        await pair.client.post("/v1/conversations", json={}, headers={"authorization": f"Bearer {token('owner')}"})
    ).json()["id"]
    # each side's own cursor to page two (it names its user and its leaf)
    cursors = {}
    for lean, user in sides.items():
        page = await pair.client.get(
            f"/v1/conversations/{conversations[lean]}/messages?limit=1",
            headers={"authorization": f"Bearer {token(user)}"},
        )
        assert page.json()["has_more"] is True
        cursors[lean] = page.json()["next_cursor"]

    cases: list[tuple[str, str, dict[str, str], bool, bool | None]] = [
        # (name, query, headers, with a token, answered by the lean path)
        ("the first page", "", {}, True, True),
        ("one message", "?limit=1", {}, True, True),
        ("a hundred", "?limit=100", {}, True, True),
        ("newest first", "?order=desc&limit=1", {}, True, True),
        ("oldest first, said", "?order=asc", {}, True, True),
        ("page two", "?limit=1&cursor={cursor}", {}, True, True),
        ("page two in the other order", "?order=desc&limit=1&cursor={cursor}", {}, True, True),
        ("a tampered cursor", "?limit=1&cursor={cursor}x", {}, True, True),
        ("a cursor of nothing", "?cursor=abc.def", {}, True, True),
        ("an idempotency key, ignored", "", {"idempotency-key": "k"}, True, True),
        ("limit 0", "?limit=0", {}, True, False),
        ("limit 101", "?limit=101", {}, True, False),
        ("limit 007", "?limit=007", {}, True, False),
        ("limit not a number", "?limit=ten", {}, True, False),
        ("limit twice", "?limit=1&limit=2", {}, True, False),
        ("an order that is not one", "?order=up", {}, True, False),
        ("a percent-encoded cursor", "?cursor=%41", {}, True, False),
        ("an empty cursor", "?cursor=", {}, True, False),
        ("the whole tree", "?tree=true", {}, True, False),
        ("min_position", "?min_position=1", {}, True, False),
        ("as_of", "?as_of=0", {}, True, False),
        ("a leaf", f"?leaf_id={OTHER}", {}, True, False),
        ("an unknown parameter", "?colour=red", {}, True, False),
        ("a bare name", "?limit", {}, True, False),
        ("no token", "", {}, False, False),
        ("a bad token", "", {"authorization": "Bearer nope"}, False, False),
        ("two tokens", "", {"authorization": f"Bearer {token('x')}"}, True, None),
        ("a host header that is not one", "", {"host": "a b"}, True, False),
    ]
    for name, query, headers, with_token, by_lean in cases:
        answers = []
        for lean, user in sides.items():
            before = pair.handed_on
            url = f"/v1/conversations/{conversations[lean]}/messages" + query.format(cursor=cursors[lean])
            r = await pair.ask(lean, "GET", url, user=user if with_token else None, headers=headers)
            if lean and by_lean is not None:
                taken = pair.handed_on == before
                assert taken == by_lean, f"{name}: lean path {'declined' if by_lean else 'took'} it"
            answers.append(plain(r))
        assert answers[0] == answers[1], name
        assert answers[0][0] != 500, name
    for name, url, by_lean, status in (
        ("another user's conversation", f"/v1/conversations/{foreign}/messages", True, 404),
        ("an unknown conversation", f"/v1/conversations/{OTHER}/messages", True, 404),
        ("a malformed id", "/v1/conversations/not-a-uuid/messages", False, 422),
    ):
        answers = []
        for lean, user in sides.items():
            before = pair.handed_on
            answers.append(plain(await pair.ask(lean, "GET", url, user=user)))
            if lean:
                assert (pair.handed_on == before) == by_lean, name
        assert answers[0] == answers[1] and answers[0][0] == status, name
    page = await pair.ask(True, "GET", f"/v1/conversations/{conversations[True]}/messages", user=sides[True])
    assert [m["content"] for m in page.json()["data"]] == ["m0 <b>&", "edit"]  # the active branch
    metrics = (await pair.client.get("/metrics")).text
    route = 'method="GET",route="/v1/conversations/{conversation_id}/messages"'
    assert f'{route},status="200"' in metrics and ":str}" not in metrics
