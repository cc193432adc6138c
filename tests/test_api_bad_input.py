"""Bad input: every case answers a 4xx problem document, never a 500, and stores nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.support import Api, assert_problem, auth, new_user

NUL, SURROGATE = "\u0000", "\ud800"
BIG = 1024 * 1024 + 1
DEEP = 100_000  # levels of nesting: far past any recursive JSON decoder's stack


def _json(raw: str) -> bytes:
    """A JSON text as bytes, keeping escapes such as \\ud800 that Python cannot encode itself."""
    return raw.encode()


CONVERSATION_BODIES: dict[str, bytes] = {
    "nul in title": _json('{"title": "a\\u0000b"}'),
    "lone surrogate in title": _json('{"title": "a\\ud800b"}'),
    "low surrogate alone in title": _json('{"title": "\\udc00"}'),
    "nul in metadata key": _json('{"metadata": {"a\\u0000": "v"}}'),
    "surrogate in metadata key": _json('{"metadata": {"\\ud83d": "v"}}'),
    "nul in metadata value": _json('{"metadata": {"k": "\\u0000"}}'),
    "surrogate in metadata value": _json('{"metadata": {"k": "x\\udfff"}}'),
    "title too long": _json('{"title": "' + "t" * 201 + '"}'),
    "metadata key too long": _json('{"metadata": {"' + "k" * 65 + '": "v"}}'),
    "metadata key empty": _json('{"metadata": {"": "v"}}'),
    "metadata value too long": _json('{"metadata": {"k": "' + "v" * 513 + '"}}'),
    "17 metadata keys": _json('{"metadata": {' + ", ".join(f'"k{i}": "v"' for i in range(17)) + "}}"),
    "metadata value a number": _json('{"metadata": {"k": 1}}'),
    "metadata a list": _json('{"metadata": ["k"]}'),
    "title a number": _json('{"title": 5}'),
    "title null": _json('{"title": null}'),
    "unknown field": _json('{"title": "t", "owner": "bob"}'),
    "id not a uuid": _json('{"id": "not-a-uuid"}'),
    "id a number": _json('{"id": 12}'),
    "body an array": _json("[]"),
    "body a string": _json('"title"'),
    "malformed json": _json('{"title": '),
    "invalid utf-8": b'{"title": "\xff\xfe"}',
    "nul byte raw": b'{"title": "a\x00b"}',
    "empty body": b"",
    "deeply nested metadata": _json('{"metadata": ' + "[" * DEEP + "]" * DEEP + "}"),
    "deeply nested body": _json("[" * DEEP),
}

MESSAGE_BODIES: dict[str, bytes] = {
    "no role": _json('{"content": "x"}'),
    "no content": _json('{"role": "user"}'),
    "unknown role": _json('{"role": "wizard", "content": "x"}'),
    "role null": _json('{"role": null, "content": "x"}'),
    "empty content": _json('{"role": "user", "content": ""}'),
    "content too long": _json('{"role": "user", "content": "' + "x" * 32_769 + '"}'),
    "nul in content": _json('{"role": "user", "content": "a\\u0000"}'),
    "surrogate in content": _json('{"role": "user", "content": "\\ud800\\ud800"}'),
    "content a number": _json('{"role": "user", "content": 42}'),
    "content an object": _json('{"role": "user", "content": {"text": "x"}}'),
    "nul in metadata": _json('{"role": "user", "content": "x", "metadata": {"k": "\\u0000"}}'),
    "17 metadata keys": _json(
        '{"role": "user", "content": "x", "metadata": {' + ", ".join(f'"k{i}": "v"' for i in range(17)) + "}}"
    ),
    "expected_version negative": _json('{"role": "user", "content": "x", "expected_version": -1}'),
    "expected_version a string": _json('{"role": "user", "content": "x", "expected_version": "1"}'),
    "expected_version huge": _json('{"role": "user", "content": "x", "expected_version": 99999999999}'),
    "unknown field": _json('{"role": "user", "content": "x", "seq": 7}'),
    "malformed json": _json('{"role": "user", "content": "x"'),
    "deeply nested metadata": _json('{"role": "user", "content": "x", "metadata": ' + "[" * DEEP + "]" * DEEP + "}"),
    "deeply nested objects": _json(
        '{"role": "user", "content": "x", "metadata": ' + '{"a":' * DEEP + "1" + "}" * DEEP + "}"
    ),
}

PATCH_BODIES: dict[str, bytes] = {
    "nothing to change": _json("{}"),
    "nul in title": _json('{"title": "\\u0000"}'),
    "title too long": _json('{"title": "' + "t" * 201 + '"}'),
    "17 metadata keys": _json('{"metadata": {' + ", ".join(f'"k{i}": "v"' for i in range(17)) + "}}"),
    "unknown field": _json('{"message_count": 0}'),
    "expected_version a float": _json('{"title": "x", "expected_version": 1.5}'),
    "deeply nested metadata": _json('{"metadata": ' + "[" * DEEP + "]" * DEEP + "}"),
}


@pytest.fixture
async def user_events(api: Api) -> AsyncIterator[tuple[str, Any]]:
    """A user, and a function counting that user's events in the log."""
    user = new_user()
    dsn = make_url(api.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)

    async def count() -> int:
        return int(await conn.fetchval("SELECT count(*) FROM events WHERE user_id = $1", user))

    yield user, count
    await conn.close()


def post(api: Api, url: str, body: bytes, user: str, **headers: str) -> Any:
    return api.client.post(url, content=body, headers=auth(user) | {"content-type": "application/json", **headers})


@pytest.mark.parametrize("case", CONVERSATION_BODIES)
async def test_bad_conversation_bodies_are_422_and_store_nothing(
    api: Api, user_events: tuple[str, Any], case: str
) -> None:
    user, count = user_events
    r = await post(api, "/v1/conversations", CONVERSATION_BODIES[case], user)
    assert_problem(r, 422, "validation_error")
    assert await count() == 0


@pytest.mark.parametrize("case", MESSAGE_BODIES)
async def test_bad_message_bodies_are_422_and_store_nothing(api: Api, user_events: tuple[str, Any], case: str) -> None:
    user, count = user_events
    c = await api.create(user)
    r = await post(api, f"/v1/conversations/{c['id']}/messages", MESSAGE_BODIES[case], user)
    assert_problem(r, 422, "validation_error")
    assert await count() == 1


@pytest.mark.parametrize("case", PATCH_BODIES)
async def test_bad_patch_bodies_are_422_and_store_nothing(api: Api, user_events: tuple[str, Any], case: str) -> None:
    user, count = user_events
    c = await api.create(user)
    r = await api.client.patch(
        f"/v1/conversations/{c['id']}",
        content=PATCH_BODIES[case],
        headers=auth(user) | {"content-type": "application/json"},
    )
    assert_problem(r, 422, "validation_error")
    assert await count() == 1


async def test_deeply_nested_json_is_422_on_the_chat_route_too(api: Api, user_events: tuple[str, Any]) -> None:
    user, count = user_events
    c = await api.create(user)
    for body in (
        _json('{"message": "x", "conversation_id": "' + c["id"] + '", "x": ' + "[" * DEEP + "]" * DEEP + "}"),
        _json("{" + '"a": {' * DEEP),
    ):
        detail = assert_problem(await post(api, "/v1/chat", body, user), 422, "validation_error")["detail"]
        assert "nested too deeply" in detail or "not valid JSON" in detail, detail
    assert await count() == 1


async def test_bad_bodies_are_explained(api: Api, user_events: tuple[str, Any]) -> None:
    user, _ = user_events
    for body, words in (
        (b"", "the body is empty"),
        (_json('{"title": "a\\ud800b"}'), "lone surrogate"),
        (_json('{"title": '), "not valid JSON"),
    ):
        detail = assert_problem(await post(api, "/v1/conversations", body, user), 422, "validation_error")["detail"]
        assert words in detail, detail


async def test_ids_in_the_forms_a_body_takes_are_accepted_in_paths(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    for form in (c["id"], c["id"].upper(), c["id"].replace("-", "")):
        r = await api.client.get(f"/v1/conversations/{form}?min_position={c['position']}", headers=auth(user))
        assert r.status_code == 200 and r.json()["id"] == c["id"]


async def test_a_body_over_1_mib_is_413_whether_announced_or_streamed(api: Api, user_events: tuple[str, Any]) -> None:
    user, count = user_events
    body = b'{"title": "' + b"t" * BIG + b'"}'
    assert_problem(await post(api, "/v1/conversations", body, user), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds on what arrives
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    r = await api.client.post(
        "/v1/conversations", content=chunks(), headers=auth(user) | {"content-type": "application/json"}
    )
    assert_problem(r, 413, "payload_too_large")
    c = await api.create(user)
    message = b'{"role": "user", "content": "' + b"x" * BIG + b'"}'
    assert_problem(await post(api, f"/v1/conversations/{c['id']}/messages", message, user), 413, "payload_too_large")
    assert await count() == 1


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "tab\tkey", "é-accent", "line\nbreak"],
    ids=["empty", "too-long", "tab", "non-ascii", "newline"],
)
async def test_bad_idempotency_keys_are_422(api: Api, user_events: tuple[str, Any], key: str) -> None:
    user, count = user_events
    try:
        r = await post(api, "/v1/conversations", b"{}", user, **{"Idempotency-Key": key})
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # the client itself refuses to send such a header: nothing to check on the server
    assert_problem(r, 422, "validation_error")
    assert await count() == 0


@pytest.mark.parametrize(
    "url",
    [
        "/v1/conversations/not-a-uuid",
        "/v1/conversations/12345",
        "/v1/conversations/" + "a" * 100,
        "/v1/conversations/%00",
        "/v1/conversations/urn:uuid:0193a2b4-0000-7000-8000-000000000000",
        "/v1/conversations/%7B0193a2b4-0000-7000-8000-000000000000%7D",
        "/v1/conversations/0-1-9-3-a-2-b-4-0-0-0-0-7-0-0-0-8-0-0-0-0-0-0-0-0-0-0-0-0-0-0-0",
        "/v1/search?q=hello&conversation_id=urn:uuid:0193a2b4-0000-7000-8000-000000000000",
        "/v1/search?q=%FF",
        "/v1/search?q=lone%ED%A0%80surrogate",
        "/v1/conversations?cursor=%C3",
        "/v1/conversations/not-a-uuid/messages",
        "/v1/conversations?limit=0",
        "/v1/conversations?limit=101",
        "/v1/conversations?limit=ten",
        "/v1/conversations?order=sideways",
        "/v1/conversations?min_position=0",
        "/v1/conversations?min_position=abc",
        "/v1/conversations?min_position=99999999999999999999999",
        "/v1/conversations?cursor=",
        "/v1/conversations?cursor=%00",
        "/v1/conversations?cursor=" + "x" * 3000,
        "/v1/events?after=-5",
        "/v1/events?limit=101",
        "/v1/events?after=1&cursor=abc",
    ],
)
async def test_bad_ids_and_query_values_are_422(api: Api, url: str) -> None:
    r = await api.client.get(url, headers=auth(new_user()))
    assert_problem(r, 422, "validation_error")


async def test_bad_message_list_queries_are_422(api: Api, user_events: tuple[str, Any]) -> None:
    user, _ = user_events
    c = await api.create(user)
    for query in ("limit=0", "limit=101", "order=up", "cursor=zzz", "min_position=-1"):
        r = await api.client.get(f"/v1/conversations/{c['id']}/messages?{query}", headers=auth(user))
        assert_problem(r, 422, "validation_error")


async def test_unknown_routes_and_methods_are_problem_documents(api: Api) -> None:
    user = new_user()
    assert_problem(await api.client.get("/v1/nothing-here", headers=auth(user)), 404, "not_found")
    for method, path in (("PUT", "/v1/conversations"), ("POST", "/v1/events"), ("GET", "/v1/chat")):
        r = await api.client.request(method, path, headers=auth(user))
        # 405 with Allow, and a code from the contract's closed list: there is no such operation
        assert_problem(r, 405, "not_found")
        assert method not in r.headers["allow"]
    c = await api.create(user)
    r = await api.client.delete(f"/v1/conversations/{c['id']}?expected_version=x", headers=auth(user))
    assert_problem(r, 422, "validation_error")
    assert (await api.client.get(f"/v1/conversations/{uuid.uuid4()}", headers=auth(user))).status_code == 404
