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

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context

from service.commands import ConversationHeads
from service.connections import ConnectionPool
from service.cursors import Cursors
from service.eventstore import EventStore
from service.mcp import Tools, build_server
from service.settings import Settings
from tests.keys import KEYRING, MASTER_KEY
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
    env.update(
        CHATLOG_DATABASE_URL=api.db_url,
        CHATLOG_JWT_SECRET=SECRET,
        CHATLOG_MASTER_KEY=MASTER_KEY,
        CHATLOG_LOG_LEVEL="WARNING",
    )
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
    return str(json.loads(text)["code"])


RPC_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def rpc(api: Api, user: str, body: bytes | AsyncIterator[bytes]) -> httpx.Response:
    """A raw JSON-RPC POST to /mcp, as a client that does not use the SDK sends it."""
    return await api.client.post("/mcp", content=body, headers=auth(user) | RPC_HEADERS)


def tool_call(tool: str, arguments: dict[str, Any], *, raw: dict[str, bytes] | None = None) -> bytes:
    """The JSON-RPC body of a tools/call; each `raw` key's quoted string is swapped for its JSON text."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    ).encode()
    for marker, text in (raw or {}).items():
        body = body.replace(f'"{marker}"'.encode(), b'"' + text + b'"')
    return body


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
        ids = {m["seq"]: m["id"] for m in first["messages"] + rest["messages"]}
        assert all(h["id"] == ids[h["seq"]] for h in hits["results"])  # a hit names its message
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
            assert field in {e["key"] for e in json.loads(text)["errors"]}, (tool, text)
        unknown = await failure(client, "drop_everything")
        assert "Unknown tool" in unknown and problem_code(unknown) == "not_found"
        # Not JSON at all: a JSON-RPC parse error, as the protocol says.
        r = await rpc(api, user, b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": ')
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


async def test_arguments_must_match_the_advertised_schema_exactly(api: Api) -> None:
    """No coercion ("5", 5.0 or true for an integer), no unknown names: the 422 problem, naming
    each field; and a string is taken as given, never parsed as JSON first."""
    user = new_user()
    cid, position = await seeded(api, user, "hello")
    await caught_up(api, user, position)
    async with over_http(api, user) as client:
        schemas = {t.name: t.input_schema for t in (await client.list_tools()).tools}
        assert all(schema["additionalProperties"] is False for schema in schemas.values()), schemas
        wrong = [
            ("get_messages", {"conversation_id": cid, "limit": "5"}, "limit"),
            ("get_messages", {"conversation_id": cid, "limit": 5.0}, "limit"),
            ("get_messages", {"conversation_id": cid, "limit": True}, "limit"),
            ("get_messages", {"conversation_id": cid, "order": 1}, "order"),
            ("get_messages", {"conversation_id": cid, "bogus": 1}, "bogus"),
            ("get_messages", {"conversation_id": cid, "ctx": {}}, "ctx"),
            ("list_conversations", {"limit": 2.0}, "limit"),
            ("list_conversations", {"cursor": 7}, "cursor"),
            ("search_messages", {"query": 5}, "query"),
            ("search_messages", {"query": "hello", "role": True}, "role"),
            ("search_messages", {"query": "hello", "limit": "1"}, "limit"),
            ("append_message", {"conversation_id": cid, "content": 5}, "content"),
            ("append_message", {"conversation_id": cid, "content": "x", "metadata": {"a": "b"}}, "metadata"),
            ("append_message", {"conversation_id": cid, "content": "x", "idempotency_key": 12}, "idempotency_key"),
            ("append_message", {"conversation_id": cid, "content": "x", "bogus": 1, "limit": "5"}, "bogus"),
        ]
        for tool, arguments, field in wrong:
            document = json.loads(await failure(client, tool, **arguments))
            assert (document["status"], document["code"]) == (422, "validation_error"), (tool, arguments, document)
            assert field in {e["key"] for e in document["errors"]}, (tool, arguments, document)
        # A string that happens to be JSON is still that string.
        text = await failure(client, "search_messages", query="hello", conversation_id="null")
        assert problem_code(text) == "validation_error"  # a malformed id, not "every conversation"
        added = await call(client, "append_message", conversation_id=cid, content="keyed", idempotency_key="[1]")
        again = await call(client, "append_message", conversation_id=cid, content="keyed", idempotency_key="[1]")
        assert again == added
        await caught_up(api, user, added["position"])
        seen = await call(client, "get_messages", conversation_id=cid, limit=5, order="desc")
    assert [m["content"] for m in seen["messages"]] == ["keyed", "hello"]


async def test_every_tool_error_text_is_exactly_the_problem_document(api: Api) -> None:
    owner, user = new_user(), new_user()
    foreign, _ = await seeded(api, owner, "not yours")
    cid, _ = await seeded(api, user)
    async with over_http(api, user) as client:
        await call(client, "append_message", conversation_id=cid, content="once", idempotency_key="k-9")
        cases = [
            ("get_messages", {"conversation_id": foreign}, 404, "not_found"),
            ("append_message", {"conversation_id": foreign, "content": "x"}, 404, "not_found"),
            ("get_messages", {"conversation_id": "0193a0b4-0000-7000-8000-000000000000"}, 404, "not_found"),
            ("drop_everything", {}, 404, "not_found"),
            ("get_messages", {"conversation_id": "not-a-uuid"}, 422, "validation_error"),
            ("get_messages", {"conversation_id": cid, "cursor": "forged.cursor"}, 422, "validation_error"),
            ("list_conversations", {"cursor": "forged.cursor"}, 422, "validation_error"),
            ("append_message", {"conversation_id": cid, "content": "nul \u0000"}, 422, "validation_error"),
            (
                "append_message",
                {"conversation_id": cid, "content": "x", "idempotency_key": "é"},
                422,
                "validation_error",
            ),
            ("list_conversations", {"limit": 0}, 422, "validation_error"),
            (
                "append_message",
                {"conversation_id": cid, "content": "twice", "idempotency_key": "k-9"},
                422,
                "idempotency_mismatch",
            ),
        ]
        for tool, arguments, status, code in cases:
            result = await client.call_tool(tool, arguments)
            assert result.is_error, (tool, arguments, result.content)
            text = result.content[0].text  # type: ignore[union-attr]
            document = json.loads(text)  # the text is the problem document, nothing around it
            assert (document["status"], document["code"]) == (status, code), (tool, arguments, document)
            assert isinstance(document["title"], str) and isinstance(document["detail"], str)
            assert document["type"].startswith("https://") and "Error executing" not in text


async def test_an_unexpected_error_in_a_tool_is_the_internal_problem_document(caplog: pytest.LogCaptureFixture) -> None:
    """A crash (here: a closed pool) answers the 500 problem, with nothing of the exception in it."""
    pool = ConnectionPool("postgresql+asyncpg://chatlog@127.0.0.1:1/none", size=1)
    await pool.close()

    async def fixed_user(ctx: Context) -> str:
        return "someone"

    settings = Settings(database_url="postgresql+asyncpg://chatlog@127.0.0.1:1/none", jwt_secret=SECRET)
    tools = Tools(settings, pool, EventStore(pool, KEYRING), ConversationHeads(), Cursors(SECRET), fixed_user)
    async with Client(build_server(tools)) as client:
        result = await client.call_tool("list_conversations", {})
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    document = json.loads(text)
    assert (document["status"], document["code"]) == (500, "internal")
    assert "closed" not in text and "Error executing" not in text
    assert "unhandled error in an MCP tool" in caplog.text


async def test_an_mcp_body_over_the_limit_is_413_whether_announced_or_streamed(api: Api) -> None:
    """1 MiB (CHATLOG_MAX_BODY_BYTES) holds for /mcp too; above it nothing is processed."""
    user = new_user()
    cid, _ = await seeded(api, user)
    limit = 1_048_576

    def padded(content: str, size: int) -> bytes:  # whitespace is valid JSON: only the size is wrong
        body = tool_call("append_message", {"conversation_id": cid, "content": content})
        return body[:-1] + b" " * (size - len(body)) + b"}"

    over = padded("over the limit", limit + 1)
    assert_problem(await rpc(api, user, over), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds on what arrives
        for start in range(0, len(over), 65536):
            yield over[start : start + 65536]

    assert_problem(await rpc(api, user, chunks()), 413, "payload_too_large")
    at_limit = await rpc(api, user, padded("at the limit", limit))
    assert at_limit.status_code == 200 and not at_limit.json()["result"]["isError"], at_limit.text
    position = json.loads(at_limit.json()["result"]["content"][0]["text"])["position"]
    await caught_up(api, user, position)
    async with over_http(api, user) as client:
        seen = await call(client, "get_messages", conversation_id=cid)
    assert [m["content"] for m in seen["messages"]] == ["at the limit"]


async def test_a_lone_surrogate_in_any_string_argument_is_a_422_tool_error(api: Api) -> None:
    user = new_user()
    cid, _ = await seeded(api, user)
    cases = [
        ("append_message", {"conversation_id": cid, "content": "LONE"}, "content"),
        ("append_message", {"conversation_id": cid, "content": "x", "role": "LONE"}, "role"),
        ("append_message", {"conversation_id": cid, "content": "x", "idempotency_key": "LONE"}, "idempotency_key"),
        ("append_message", {"conversation_id": "LONE", "content": "x"}, "conversation_id"),
        ("get_messages", {"conversation_id": cid, "cursor": "LONE"}, "cursor"),
        ("get_messages", {"conversation_id": cid, "order": "LONE"}, "order"),
        ("list_conversations", {"cursor": "LONE"}, "cursor"),
        ("search_messages", {"query": "LONE"}, "query"),
        ("search_messages", {"query": "x", "conversation_id": "LONE"}, "conversation_id"),
        ("search_messages", {"query": "x", "role": "LONE"}, "role"),
    ]
    for escape in (b"a\\ud800b", b"\\uDC00", b"\\udc00\\ud800", b"nul \\u0000"):
        for tool, arguments, field in cases:
            r = await rpc(api, user, tool_call(tool, arguments, raw={"LONE": escape}))
            assert r.status_code == 200, (tool, field, escape, r.text)
            result = r.json()["result"]
            assert result["isError"] is True, (tool, field, escape, result)
            document = json.loads(result["content"][0]["text"])
            assert (document["status"], document["code"]) == (422, "validation_error"), (tool, field, document)
            assert "a NUL character or a lone surrogate" in document["detail"], (tool, field, document)
            assert field in {e["key"] for e in document["errors"]}, (tool, field, document)
    # A surrogate pair is one character, and fine; the body is parsed as JSON, not as text.
    body = tool_call("append_message", {"conversation_id": cid, "content": "PAIR"}, raw={"PAIR": b"\\ud83d\\ude00"})
    r = await rpc(api, user, body)
    assert r.status_code == 200 and not r.json()["result"]["isError"], r.text
    stored = json.loads(r.json()["result"]["content"][0]["text"])
    assert stored["content"] == "\U0001f600" and stored["seq"] == 1  # and nothing before it
    r = await rpc(api, user, b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": "\\ud800')
    assert r.status_code < 500 and r.json()["error"]["code"] == -32700


async def test_malformed_bodies_and_headers_on_mcp_are_never_a_500(api: Api) -> None:
    user = new_user()
    deep = "[" * 5000 + "]" * 5000  # deeper than any JSON parser's recursion limit
    for body in (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_conversations", '
        b'"arguments": {"cursor": "\\ud800"}, "x": ' + deep.encode() + b"}}",
        b'{"a": "\\ud800", "b": ' + deep.encode() + b"}",
    ):
        r = await rpc(api, user, body)
        assert r.status_code < 500, r.text
    # A Content-Length of thousands of digits (a zero-padded 1) is read as 1, not a crash.
    host, port = api.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /mcp HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token(user)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {'0' * 5000}1\r\n\r\n{{".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert int(status.split()[1]) < 500, status
    # Without a token, any method is 401 first.
    assert_problem(await api.client.get("/mcp"), 401, "unauthorized")


async def test_get_on_mcp_is_405_as_there_is_no_stream_to_offer(api: Api) -> None:
    user = new_user()
    code = (await api.client.put("/v1/conversations", headers=auth(user))).json()["code"]  # the API's 405 code
    for method in ("GET", "DELETE", "PUT"):
        headers = auth(user) | {"Accept": "text/event-stream"}
        async with api.client.stream(method, "/mcp", headers=headers, timeout=5) as r:
            await r.aread()
        assert_problem(r, 405, code)
        assert r.headers["allow"] == "POST"
    async with over_http(api, user) as client:  # and the SDK's client, which only POSTs, carries on
        assert (await call(client, "list_conversations"))["conversations"] == []


async def test_reads_take_min_position_to_see_an_append_at_once(api: Api) -> None:
    user = new_user()
    cid, _ = await seeded(api, user)
    async with over_http(api, user) as client:
        for i in range(5):
            added = await call(client, "append_message", conversation_id=cid, content=f"note {i} about quokkas")
            at = added["position"]
            newest = await call(client, "get_messages", conversation_id=cid, order="desc", limit=1, min_position=at)
            assert [m["content"] for m in newest["messages"]] == [f"note {i} about quokkas"]
            listed = await call(client, "list_conversations", min_position=at)
            assert listed["conversations"][0]["message_count"] == i + 1
            found = await call(client, "search_messages", query=f"note {i}", min_position=at)
            assert found["results"] and found["results"][0]["seq"] == i + 1
        text = await failure(client, "get_messages", conversation_id=cid, min_position=at + 1_000_000)
        assert problem_code(text) == "not_ready"
        assert problem_code(await failure(client, "list_conversations", min_position=0)) == "validation_error"
