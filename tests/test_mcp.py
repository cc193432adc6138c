"""The MCP server through the SDK's own client, over both transports against real processes:
Streamable HTTP at /mcp of `chatlog serve`, and `chatlog mcp --user` over stdio."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.support import SECRET, Api, assert_problem, auth, new_user, token

TOOLS = {"list_conversations", "get_messages", "search_messages", "append_message"}


@asynccontextmanager
async def over_http(api: Api, user: str) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token(user)}"}, timeout=30)
    async with http, Client(streamable_http_client(f"{api.base_url}/mcp", http_client=http)) as client:
        yield client


@asynccontextmanager
async def over_stdio(api: Api, user: str) -> AsyncIterator[Client]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(CHATLOG_DATABASE_URL=api.db_url, CHATLOG_JWT_SECRET=SECRET, CHATLOG_LOG_LEVEL="WARNING")
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "service.cli", "mcp", "--user", user, "--no-workers"], env=env
    )
    async with Client(params) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    text = result.content[0].text  # type: ignore[union-attr]
    assert json.loads(text) == result.structured_content  # compact JSON text, the same data
    return dict(result.structured_content or {})


async def failure(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.content
    return str(result.content[0].text)  # type: ignore[union-attr]


def problem_code(text: str) -> str:
    """The `code` of the problem document a tool error carries."""
    return str(json.loads(text[text.index("{") :])["code"])


async def seeded(api: Api, user: str, *contents: str) -> tuple[str, int]:
    conversation = await api.create(user, title="Seeded")
    position = 0
    for content in contents:
        position = (await api.say(user, conversation["id"], content))["position"]
    return conversation["id"], position


async def caught_up(api: Api, user: str, position: int) -> None:
    r = await api.client.get("/v1/conversations", params={"min_position": position}, headers=auth(user))
    assert r.status_code == 200, r.text


async def test_mcp_over_http_needs_a_valid_token(api: Api) -> None:
    r = await api.client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert_problem(r, 401, "unauthorized")
    r = await api.client.post(
        "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": "Bearer not.a.token"},
    )
    assert_problem(r, 401, "unauthorized")


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_the_four_tools_have_schemas_and_descriptions(api: Api, transport: str) -> None:
    connect = over_http if transport == "http" else over_stdio
    async with connect(api, new_user()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.input_schema["type"] == "object"
    append = tools["append_message"].input_schema
    assert set(append["required"]) == {"conversation_id", "content"}
    assert append["properties"]["role"]["enum"] == ["user", "assistant", "system", "tool"]
    limit = tools["list_conversations"].input_schema["properties"]["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 100)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_every_tool_over_each_transport(api: Api, transport: str) -> None:
    user = new_user()
    cid, position = await seeded(api, user, "pack the blue tent", "book the ferry", "tent pegs too")
    await caught_up(api, user, position)
    connect = over_http if transport == "http" else over_stdio
    async with connect(api, user) as client:
        listed = await call(client, "list_conversations")
        assert [c["id"] for c in listed["conversations"]] == [cid] and listed["next_cursor"] is None
        assert listed["conversations"][0]["message_count"] == 3

        first = await call(client, "get_messages", conversation_id=cid, limit=2)
        assert [m["content"] for m in first["messages"]] == ["pack the blue tent", "book the ferry"]
        rest = await call(client, "get_messages", conversation_id=cid, limit=2, cursor=first["next_cursor"])
        assert [m["seq"] for m in rest["messages"]] == [3] and rest["next_cursor"] is None

        hits = await call(client, "search_messages", query="tent")
        assert {h["seq"] for h in hits["results"]} == {1, 3}
        assert all("<mark>tent</mark>" in h["snippet"] and h["conversation_id"] == cid for h in hits["results"])
        only_first = await call(client, "search_messages", query="tent", limit=1)
        assert len(only_first["results"]) == 1 and only_first["next_cursor"]
        assert only_first["results"][0]["seq"] == 3  # equal rank: the newer first
        second = await call(client, "search_messages", query="tent", limit=1, cursor=only_first["next_cursor"])
        assert [h["seq"] for h in second["results"]] == [1] and second["next_cursor"] is None
        assert (await call(client, "search_messages", query="tent", role="assistant"))["results"] == []
        here = await call(client, "search_messages", query="ferry", conversation_id=cid, role="user")
        assert [h["seq"] for h in here["results"]] == [2]

        added = await call(client, "append_message", conversation_id=cid, content=f"via {transport}", role="user")
        assert added["seq"] == 4 and added["content"] == f"via {transport}"
    # ... and the HTTP API sees it.
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages", params={"min_position": added["position"]}, headers=auth(user)
    )
    assert [m["content"] for m in r.json()["data"]][-1] == f"via {transport}"


async def test_http_and_mcp_see_each_others_appends(api: Api) -> None:
    user = new_user()
    cid, _ = await seeded(api, user)
    async with over_http(api, user) as client:
        position = (await api.say(user, cid, "written over HTTP"))["position"]
        await caught_up(api, user, position)
        seen = await call(client, "get_messages", conversation_id=cid)
        assert [m["content"] for m in seen["messages"]] == ["written over HTTP"]
        added = await call(client, "append_message", conversation_id=cid, content="written over MCP")
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages", params={"min_position": added["position"]}, headers=auth(user)
    )
    assert [m["content"] for m in r.json()["data"]] == ["written over HTTP", "written over MCP"]


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_one_user_never_sees_or_touches_anothers_history(api: Api, transport: str) -> None:
    owner, intruder = new_user(), new_user()
    cid, position = await seeded(api, owner, "the owner's private walnut", "another walnut")
    await caught_up(api, owner, position)
    async with over_http(api, owner) as mine:
        owners_cursor = (await call(mine, "search_messages", query="walnut", limit=1))["next_cursor"]
        assert owners_cursor
    connect = over_http if transport == "http" else over_stdio
    async with connect(api, intruder) as client:
        assert (await call(client, "list_conversations"))["conversations"] == []
        assert problem_code(await failure(client, "get_messages", conversation_id=cid)) == "not_found"
        assert (await call(client, "search_messages", query="walnut"))["results"] == []
        assert (await call(client, "search_messages", query="walnut", conversation_id=cid))["results"] == []
        text = await failure(client, "search_messages", query="walnut", limit=1, cursor=owners_cursor)
        assert problem_code(text) == "validation_error"
        text = await failure(client, "append_message", conversation_id=cid, content="intrusion")
        assert problem_code(text) == "not_found"
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages", params={"min_position": position}, headers=auth(owner)
    )
    assert [m["content"] for m in r.json()["data"]] == ["the owner's private walnut", "another walnut"]


async def test_bad_arguments_are_tool_errors_and_the_server_carries_on(api: Api) -> None:
    user = new_user()
    cid, _ = await seeded(api, user, "hello")
    async with over_http(api, user) as client:
        validation = [
            ("get_messages", {"conversation_id": "not-a-uuid"}),
            ("append_message", {"conversation_id": cid, "content": "nul \u0000 here"}),
            ("search_messages", {"query": "a\u0000b"}),
            ("get_messages", {"conversation_id": cid, "cursor": "forged.cursor"}),
            ("append_message", {"conversation_id": cid, "content": "x", "idempotency_key": "bad\u00e9key"}),
        ]
        for tool, arguments in validation:
            text = await failure(client, tool, **arguments)
            assert problem_code(text) == "validation_error", (tool, text)
        schema = [  # arguments that break the tool's JSON schema: the same problem, naming the field
            ("list_conversations", {"limit": 0}, "limit"),
            ("list_conversations", {"limit": "many"}, "limit"),
            ("get_messages", {}, "conversation_id"),
            ("append_message", {"conversation_id": cid, "content": ""}, "content"),
            ("append_message", {"conversation_id": cid, "content": "x" * 32_769}, "content"),
            ("append_message", {"conversation_id": cid, "content": "x", "role": "wizard"}, "role"),
            ("search_messages", {"query": "q" * 501}, "query"),
            ("search_messages", {"query": ["not", "a", "string"]}, "query"),
        ]
        for tool, arguments, field in schema:
            text = await failure(client, tool, **arguments)
            assert "Traceback" not in text and "SELECT" not in text
            assert problem_code(text) == "validation_error", (tool, text)
            assert field in {e["key"] for e in json.loads(text[text.index("{") :])["errors"]}, (tool, text)
        unknown = await failure(client, "drop_everything")
        assert "Unknown tool" in unknown and problem_code(unknown) == "not_found"
        # A lone surrogate cannot even be sent by the SDK's client; raw, it is refused as JSON.
        r = await api.client.post(
            "/mcp",
            content=b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "append_message", '
            b'"arguments": {"conversation_id": "' + cid.encode() + b'", "content": "lone \\ud800"}}}',
            headers=auth(user) | {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
        )
        assert r.status_code < 500 and r.json()["error"]["code"] == -32700
        still = await call(client, "get_messages", conversation_id=cid)
        assert [m["content"] for m in still["messages"]] == ["hello"]


async def test_append_message_is_idempotent_with_a_key_and_shares_keys_with_http(api: Api) -> None:
    user = new_user()
    cid, _ = await seeded(api, user)
    async with over_http(api, user) as client:
        first = await call(client, "append_message", conversation_id=cid, content="once", idempotency_key="k-1")
        again = await call(client, "append_message", conversation_id=cid, content="once", idempotency_key="k-1")
        assert again == first
        mismatch = await failure(client, "append_message", conversation_id=cid, content="twice", idempotency_key="k-1")
        assert problem_code(mismatch) == "idempotency_mismatch"
    r = await api.client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "user", "content": "once"},
        headers=auth(user) | {"Idempotency-Key": "k-1"},
    )
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"
    assert r.json()["id"] == first["id"]


async def test_long_messages_are_cut_to_the_result_cap(api: Api) -> None:
    user = new_user()
    cid, position = await seeded(api, user, "word " * 6000)
    await caught_up(api, user, position)
    async with over_http(api, user) as client:
        result = await client.call_tool("get_messages", {"conversation_id": cid})
    text = result.content[0].text  # type: ignore[union-attr]
    assert len(text) <= 20_000  # CHATLOG_MCP_RESULT_CHARS
    (message,) = json.loads(text)["messages"]
    assert message["truncated"] is True and message["content_chars"] == 30_000


async def test_many_long_messages_share_the_cap_on_one_page(api: Api) -> None:
    user = new_user()
    cid, position = await seeded(api, user, *(f"{n:02} " + "x" * 2_000 for n in range(20)))
    await caught_up(api, user, position)
    async with over_http(api, user) as client:
        result = await client.call_tool("get_messages", {"conversation_id": cid, "limit": 20})
    text = result.content[0].text  # type: ignore[union-attr]
    assert len(text) <= 20_000  # CHATLOG_MCP_RESULT_CHARS
    page = json.loads(text)
    assert [m["content"][:2] for m in page["messages"]] == [f"{n:02}" for n in range(20)]  # all of them, cut
    assert all(m["truncated"] and m["content_chars"] == 2_003 for m in page["messages"])
    assert len(text) > 18_000, "the cut leaves the items most of the cap, not a fraction of it"


async def walk(client: Client, tool: str, key: str, **arguments: Any) -> list[dict[str, Any]]:
    """Every page of a listing tool, each within the result cap; the items in order."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        result = await client.call_tool(tool, arguments | ({"cursor": cursor} if cursor else {}))
        assert not result.is_error, result.content
        text = result.content[0].text  # type: ignore[union-attr]
        assert len(text) <= 20_000  # CHATLOG_MCP_RESULT_CHARS
        page = json.loads(text)
        assert page[key], "every page gives at least one item"
        items += page[key]
        if (cursor := page["next_cursor"]) is None:
            return items
    raise AssertionError("the walk did not end")


async def test_pages_whose_items_do_not_fit_the_cap_hold_fewer_and_continue(api: Api) -> None:
    """Metadata is not cut, and many items do not fit either: the page is shorter instead."""
    user = new_user()
    heavy = {f"key{i:02}": "v" * 512 for i in range(16)}  # about 8,600 characters of JSON
    conversation = await api.create(user, title="Heavy")
    position = 0
    for n in range(6):
        position = (await api.say(user, conversation["id"], f"message {n}", metadata=heavy))["position"]
    for n in range(40):
        position = (await api.create(user, title=f"{n:03} " + "t" * 190))["position"]
    await caught_up(api, user, position)
    async with over_http(api, user) as client:
        messages = await walk(client, "get_messages", "messages", conversation_id=conversation["id"], limit=100)
        conversations = await walk(client, "list_conversations", "conversations", limit=100)
    assert [m["content"] for m in messages] == [f"message {n}" for n in range(6)]
    assert all(m["metadata"] == heavy for m in messages)
    titles = [c["title"] for c in conversations]
    assert len(titles) == len(set(titles)) == 41  # each once, across pages
    assert titles[:40] == [f"{n:03} " + "t" * 190 for n in reversed(range(40))]


async def test_stdio_needs_a_sane_user(api: Api) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "mcp", "--user", "", stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--user" in err
