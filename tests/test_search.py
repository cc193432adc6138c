"""GET /v1/search over HTTP: matching, ranking, filters, pages, isolation, deletion, bad queries."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.support import Api, assert_problem, auth, new_user


async def search(api: Api, user: str, **params: Any) -> httpx.Response:
    return await api.client.get("/v1/search", params=params, headers=auth(user))


async def found(api: Api, user: str, **params: Any) -> list[dict[str, Any]]:
    r = await search(api, user, **params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and isinstance(body["has_more"], bool)
    return list(body["data"])


async def written(api: Api, user: str, cid: str, *contents: str, role: str = "user") -> int:
    """Append messages; the position of the last (to pass as min_position)."""
    position = 0
    for content in contents:
        r = await api.client.post(
            f"/v1/conversations/{cid}/messages", json={"role": role, "content": content}, headers=auth(user)
        )
        assert r.status_code == 201, r.text
        position = r.json()["position"]
    return position


async def test_search_finds_the_users_messages_with_marked_snippets(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user, title="Trip to Oslo")
    last = await written(api, user, conversation["id"], "Which museums in Oslo are free?", "Book a table for two")
    results = await found(api, user, q="museums", min_position=last)
    assert len(results) == 1
    result = results[0]
    assert result["object"] == "search_result" and result["conversation_title"] == "Trip to Oslo"
    message = result["message"]
    assert message["object"] == "message" and message["content"] == "Which museums in Oslo are free?"
    assert (message["seq"], message["role"], message["conversation_id"]) == (1, "user", conversation["id"])
    assert "<mark>museums</mark>" in result["snippet"]
    assert isinstance(result["rank"], float) and result["rank"] > 0


async def test_snippets_are_escaped_and_keep_the_whole_text(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], "Use List<String> & <b>generics</b> here")
    (result,) = await found(api, user, q="generics", min_position=last)
    assert result["snippet"] == "Use List&lt;String&gt; &amp; &lt;b&gt;<mark>generics</mark>&lt;/b&gt; here"


async def test_results_are_ranked_then_newest_first(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(
        api, user, conversation["id"], "kayak once", "kayak kayak kayak, all about kayak", "kayak again", "no match"
    )
    results = await found(api, user, q="kayak", min_position=last)
    assert [r["message"]["content"] for r in results] == [
        "kayak kayak kayak, all about kayak",
        "kayak again",  # equal rank: the newer first
        "kayak once",
    ]
    ranks = [r["rank"] for r in results]
    assert ranks[0] > ranks[1] == ranks[2]


async def test_web_search_syntax(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], "red apple pie", "apple red wine", "green apple", "blue sky")

    async def contents(q: str) -> set[str]:
        return {r["message"]["content"] for r in await found(api, user, q=q, min_position=last)}

    assert await contents('"red apple"') == {"red apple pie"}
    assert await contents("apple -red") == {"green apple"}
    assert await contents("sky or pie") == {"blue sky", "red apple pie"}
    assert await contents("apple red") == {"red apple pie", "apple red wine"}


async def test_filters_by_conversation_and_role(api: Api) -> None:
    user = new_user()
    first, second = await api.create(user), await api.create(user)
    await written(api, user, first["id"], "tide table question")
    await written(api, user, first["id"], "tide table answer", role="assistant")
    last = await written(api, user, second["id"], "tide table elsewhere")
    everywhere = await found(api, user, q="tide", min_position=last)
    assert len(everywhere) == 3
    in_first = await found(api, user, q="tide", conversation_id=first["id"])
    assert {r["message"]["content"] for r in in_first} == {"tide table question", "tide table answer"}
    answers = await found(api, user, q="tide", role="assistant")
    assert [r["message"]["content"] for r in answers] == ["tide table answer"]
    assert await found(api, user, q="tide", conversation_id=first["id"], role="system") == []


async def test_another_users_messages_are_never_found(api: Api) -> None:
    owner, other = new_user(), new_user()
    conversation = await api.create(owner)
    last = await written(api, owner, conversation["id"], "zebra crossing secret")
    assert len(await found(api, owner, q="zebra", min_position=last)) == 1
    assert await found(api, other, q="zebra", min_position=last) == []
    assert await found(api, other, q="zebra", conversation_id=conversation["id"]) == []


async def test_a_deleted_conversation_is_never_found(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], "ephemeral walrus")
    assert len(await found(api, user, q="walrus", min_position=last)) == 1
    r = await api.client.delete(f"/v1/conversations/{conversation['id']}", headers=auth(user))
    assert r.status_code == 204
    for _ in range(100):  # a deletion answers 204 without a position: wait for the projection
        results = await found(api, user, q="walrus")
        if not results:
            break
        await asyncio.sleep(0.05)
    assert results == []


async def test_walking_the_pages_returns_each_hit_once_while_more_arrive(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], *(f"lantern number {i}" for i in range(7)))
    seen: list[str] = []
    cursor = None
    for page in range(10):
        params: dict[str, Any] = {"q": "lantern", "limit": 2, "min_position": last}
        if cursor:
            params["cursor"] = cursor
        r = await search(api, user, **params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [item["message"]["content"] for item in body["data"]]
        await written(api, user, conversation["id"], f"lantern arrived during page {page}")
        cursor = body["next_cursor"]
        assert body["has_more"] is (cursor is not None)
        if cursor is None:
            break
    originals = [s for s in seen if s.startswith("lantern number")]
    assert sorted(originals) == [f"lantern number {i}" for i in range(7)]
    assert len(seen) == len(set(seen))


async def test_a_cursor_works_only_for_its_own_query_and_user(api: Api) -> None:
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], "otter one", "otter two", "otter three")
    r = await search(api, user, q="otter", limit=1, min_position=last)
    cursor = r.json()["next_cursor"]
    assert cursor
    assert_problem(await search(api, user, q="other", cursor=cursor), 422, "validation_error")
    assert_problem(await search(api, user, q="otter", role="user", cursor=cursor), 422, "validation_error")
    assert_problem(await search(api, new_user(), q="otter", cursor=cursor), 422, "validation_error")
    tampered = cursor[:-3] + ("AAA" if cursor[-3:] != "AAA" else "BBB")
    assert_problem(await search(api, user, q="otter", cursor=tampered), 422, "validation_error")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": ""},
        {"q": "x" * 501},
        {"q": "a\u0000b"},
        {"q": "ok", "limit": 0},
        {"q": "ok", "limit": 101},
        {"q": "ok", "conversation_id": "not-a-uuid"},
        {"q": "ok", "role": "wizard"},
        {"q": "ok", "cursor": "garbage"},
        {"q": "ok", "min_position": 0},
    ],
)
async def test_bad_search_queries_are_422(api: Api, params: dict[str, Any]) -> None:
    assert_problem(await search(api, new_user(), **params), 422, "validation_error")


@pytest.mark.parametrize("q", ["!!!", '"', "-", "or", "the", "'; DROP TABLE messages; --", "\ud7ff", "a" * 500])
async def test_odd_queries_answer_a_list_never_an_error(api: Api, q: str) -> None:
    """Also a query without a searchable word finds nothing (not every message of the user)."""
    user = new_user()
    conversation = await api.create(user)
    last = await written(api, user, conversation["id"], "hello there")
    r = await search(api, user, q=q, min_position=last)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


async def test_search_needs_a_token(api: Api) -> None:
    assert_problem(await api.client.get("/v1/search", params={"q": "x"}), 401, "unauthorized")
