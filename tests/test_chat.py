"""POST /v1/chat over HTTP: the echo assistant end to end, and the OpenAI-compatible assistant
against a fake Chat Completions server on loopback (real HTTP, streaming and not; slow, failing
and malformed answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import Databases
from tests.fake_openai import FakeOpenAI
from tests.keys import opened_events
from tests.support import Api, assert_problem, auth, fake_model, new_user, serve_api


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
async def llm(databases: Databases, tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> AsyncIterator[Api]:
    """`chatlog serve` with the openai assistant pointed at the fake, a 1 s read timeout and a
    history of at most 5 messages."""
    async for client in serve_api(
        databases,
        tmp_path_factory,
        **fake_model(fake.base_url),
        CHATLOG_OPENAI_READ_TIMEOUT="1",
        CHATLOG_CHAT_HISTORY_MESSAGES="5",
    ):
        yield client


async def chat(api: Api, user: str, message: str, **body: Any) -> httpx.Response:
    headers = auth(user) | body.pop("headers", {})
    return await api.client.post("/v1/chat", json={"message": message, **body}, headers=headers)


def sse(text: str) -> list[tuple[str, Any]]:
    """The (event, decoded data) pairs of a text/event-stream body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def stored(api: Api, user: str) -> list[tuple[str, dict[str, Any]]]:
    """The user's events straight from the log: (type, data) in log order."""
    dsn = make_url(api.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    events = sorted((e for e in await opened_events(dsn) if e.user_id == user), key=lambda e: e.position)
    return [(e.type, msgspec.to_builtins(e.event)) for e in events]


def message_texts(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(d["role"], d["content"]) for t, d in events if t == "message.appended"]


# -- the echo assistant (the default), end to end --------------------------------------------


async def test_the_prompt_is_the_full_history_by_default(api: Api) -> None:
    """The contract: the prompt is the conversation's full history (caps are opt-in settings)."""
    user = new_user()
    c = await api.create(user)
    for i in range(120):
        await api.say(user, c["id"], f"note {i} " + "x" * 1000)
    r = await chat(api, user, "how much do you see?", conversation_id=c["id"])
    assert r.status_code == 200, r.text
    assert "holds 121 messages (I was shown the newest 121)" in r.json()["messages"][1]["content"]


async def test_echo_chat_starts_a_conversation_and_answers_from_its_history(api: Api) -> None:
    user = new_user()
    r = await chat(api, user, "Which museums are in Oslo?\nAnd which are free?")
    assert r.status_code == 200, r.text
    first = r.json()
    conversation, (asked, answered) = first["conversation"], first["messages"]
    assert conversation["title"] == "Which museums are in Oslo?"
    assert conversation["message_count"] == 2 and conversation["version"] == 3
    assert (asked["seq"], asked["role"]) == (1, "user")
    assert asked["content"] == "Which museums are in Oslo?\nAnd which are free?"
    assert (answered["seq"], answered["role"]) == (2, "assistant")
    assert '"Which museums are in Oslo?' in answered["content"] and "holds 1 message " in answered["content"]
    assert first["position"] == answered["position"] > asked["position"]
    assert conversation["last_message_preview"] == answered["content"][:200]

    r = await chat(api, user, "Thanks!", conversation_id=conversation["id"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert [m["seq"] for m in second["messages"]] == [3, 4]
    assert "holds 3 messages" in second["messages"][1]["content"]  # it saw the whole history
    assert second["conversation"]["id"] == conversation["id"] and second["conversation"]["version"] == 5

    r = await api.client.get(
        f"/v1/conversations/{conversation['id']}/messages",
        params={"min_position": second["position"]},
        headers=auth(user),
    )
    assert [(m["seq"], m["role"]) for m in r.json()["data"]] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]


async def test_echo_chat_streams_deltas_then_the_stored_message(api: Api) -> None:
    user = new_user()
    r = await chat(api, user, "Tell me about fjords", stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    names = [name for name, _ in events]
    assert names[-1] == "message" and set(names[:-1]) == {"delta"} and len(names) > 3
    message = events[-1][1]
    assert "".join(d["content"] for name, d in events if name == "delta") == message["content"]
    assert (message["object"], message["role"], message["seq"]) == ("message", "assistant", 2)
    expected = [("user", "Tell me about fjords"), ("assistant", message["content"])]
    assert message_texts(await stored(api, user)) == expected


async def test_chat_in_another_users_conversation_is_not_found_and_stores_nothing(api: Api) -> None:
    owner, intruder = new_user(), new_user()
    conversation = (await chat(api, owner, "mine")).json()["conversation"]
    for stream in (False, True):
        r = await chat(api, intruder, "let me in", conversation_id=conversation["id"], stream=stream)
        assert_problem(r, 404, "not_found")
    assert await stored(api, intruder) == []
    assert len(message_texts(await stored(api, owner))) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"message": ""},
        {"message": "a\u0000b"},
        {"message": "x" * 32_769},
        {"message": 5},
        {"message": "hi", "stream": "yes"},
        {"message": "hi", "conversation_id": "not-a-uuid"},
        {"message": "hi", "conversation_id": 7},
        {"message": "hi", "model": "gpt-5"},
        {},
    ],
)
async def test_bad_chat_bodies_are_422_and_store_nothing(api: Api, body: dict[str, Any]) -> None:
    user = new_user()
    r = await api.client.post("/v1/chat", json=body, headers=auth(user))
    assert_problem(r, 422, "validation_error")
    assert await stored(api, user) == []


async def test_lone_surrogates_and_malformed_json_are_422(api: Api) -> None:
    user = new_user()
    for raw in (b'{"message": "\\ud800"}', b'{"message": "hi"', b"[]"):
        r = await api.client.post("/v1/chat", content=raw, headers=auth(user) | {"Content-Type": "application/json"})
        assert_problem(r, 422, "validation_error")
    assert await stored(api, user) == []


async def test_chat_needs_a_token(api: Api) -> None:
    r = await api.client.post("/v1/chat", json={"message": "hi"})
    assert_problem(r, 401, "unauthorized")


# -- an OpenAI-compatible server ---------------------------------------------------------------


async def test_openai_chat_sends_the_history_from_the_log_and_stores_the_reply(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    conversation = await llm.create(user, title="capped")
    cid = conversation["id"]
    r = await llm.client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "system", "content": "You are terse."},
        headers=auth(user),
    )
    assert r.status_code == 201
    for i in range(6):
        await llm.say(user, cid, f"note {i}")
    r = await chat(llm, user, "what did I say?", conversation_id=cid)
    assert r.status_code == 200, r.text
    sent = next(req for req in reversed(fake.requests) if req["messages"][-1]["content"] == "what did I say?")
    assert sent["model"] == "fake-model" and not sent.get("stream")
    # The cap of 5 keeps the system message and the 4 newest others, oldest first.
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "You are terse."),
        ("user", "note 3"),
        ("user", "note 4"),
        ("user", "note 5"),
        ("user", "what did I say?"),
    ]
    reply = r.json()["messages"][1]
    assert reply["content"].endswith("to: what did I say?") and reply["seq"] == 9
    assert message_texts(await stored(llm, user))[-1] == ("assistant", reply["content"])


async def test_openai_chat_streams_the_models_pieces(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    r = await chat(llm, user, "stream it", stream=True)
    assert r.status_code == 200, r.text
    events = sse(r.text)
    deltas = [d["content"] for name, d in events if name == "delta"]
    assert len(deltas) > 5  # the model's pieces, passed on as they came
    assert events[-1][0] == "message" and "".join(deltas) == events[-1][1]["content"]
    assert events[-1][1]["content"].endswith("to: stream it")
    assert fake.calls_with("stream it") == 1 and fake.requests[-1]["stream"] is True


@pytest.mark.parametrize("word", ["#fail", "#slow", "#malformed", "#empty"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_assistant_answers_502_and_keeps_only_the_users_message(
    llm: Api, word: str, stream: bool
) -> None:
    user = new_user()
    r = await chat(llm, user, f"please {word}", stream=stream)
    problem = assert_problem(r, 502, "assistant_error")
    assert "Traceback" not in r.text and "127.0.0.1" not in r.text
    events = await stored(llm, user)
    assert message_texts(events) == [("user", f"please {word}")]
    assert problem["conversation_id"] == await _stream_of(llm, user)  # where the message stays
    assert problem["position"] == await _last_position(llm, user)  # and its position, to read it back at once
    r = await llm.client.get(
        f"/v1/conversations/{problem['conversation_id']}/messages?min_position={problem['position']}",
        headers=auth(user),
    )
    assert [m["content"] for m in r.json()["data"]] == [f"please {word}"]


async def _last_position(api: Api, user: str) -> int:
    return int(await _from_log(api, "SELECT max(position) FROM events WHERE user_id = $1", user))


async def _stream_of(api: Api, user: str) -> str:
    return str(await _from_log(api, "SELECT stream_id FROM events WHERE user_id = $1 LIMIT 1", user))


async def _from_log(api: Api, sql: str, user: str) -> Any:
    dsn = make_url(api.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, user)
    finally:
        await conn.close()


async def test_an_assistant_failing_mid_stream_sends_an_error_event_and_stores_no_reply(llm: Api) -> None:
    user = new_user()
    r = await chat(llm, user, "go #cut", stream=True)
    assert r.status_code == 200  # the stream had begun
    events = sse(r.text)
    assert [name for name, _ in events[:2]] == ["delta", "delta"]
    name, problem = events[-1]
    assert name == "error" and problem["status"] == 502 and problem["code"] == "assistant_error"
    assert message_texts(await stored(llm, user)) == [("user", "go #cut")]


async def test_a_client_gone_mid_stream_leaves_its_message_and_no_partial_reply(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    async with llm.client.stream(
        "POST", "/v1/chat", json={"message": "slowly #drip", "stream": True}, headers=auth(user)
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                break  # one delta seen: hang up
    await asyncio.sleep(4)  # longer than the whole reply would take
    assert message_texts(await stored(llm, user)) == [("user", "slowly #drip")]
    assert fake.calls_with("slowly #drip") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_an_idempotent_retry_returns_the_stored_turn_without_asking_again(
    llm: Api, fake: FakeOpenAI, stream: bool
) -> None:
    user = new_user()
    key = {"Idempotency-Key": f"turn-{stream}"}
    first = await chat(llm, user, f"once only {stream}", stream=stream, headers=key)
    again = await chat(llm, user, f"once only {stream}", stream=stream, headers=key)
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    if stream:
        assert sse(first.text)[-1] == sse(again.text)[-1]
        assert "".join(d["content"] for n, d in sse(again.text) if n == "delta") == sse(again.text)[-1][1]["content"]
    else:
        assert first.json() == again.json()
    assert fake.calls_with(f"once only {stream}") == 1
    assert len(message_texts(await stored(llm, user))) == 2


async def test_concurrent_retries_of_a_turn_store_it_once_and_ask_once(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    key = {"Idempotency-Key": "burst"}
    answers = await asyncio.gather(*(chat(llm, user, "ten at once", headers=key) for _ in range(10)))
    assert {r.status_code for r in answers} == {200}
    assert len({json.dumps(r.json(), sort_keys=True) for r in answers}) == 1
    assert fake.calls_with("ten at once") == 1
    reply = answers[0].json()["messages"][1]["content"]
    assert message_texts(await stored(llm, user)) == [("user", "ten at once"), ("assistant", reply)]


async def test_a_retry_after_a_failed_turn_asks_again_and_keeps_one_user_message(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    key = {"Idempotency-Key": "after-failure"}
    fake.fail_next = 1
    failed = await chat(llm, user, "try twice", headers=key)
    assert_problem(failed, 502, "assistant_error")
    retried = await chat(llm, user, "try twice", headers=key)
    assert retried.status_code == 200, retried.text
    assert message_texts(await stored(llm, user)) == [
        ("user", "try twice"),
        ("assistant", retried.json()["messages"][1]["content"]),
    ]
    assert fake.calls_with("try twice") == 2


async def test_the_same_key_with_another_message_is_an_idempotency_mismatch(llm: Api) -> None:
    user = new_user()
    key = {"Idempotency-Key": "reused"}
    assert (await chat(llm, user, "first", headers=key)).status_code == 200
    r = await chat(llm, user, "second", headers=key)
    assert_problem(r, 422, "idempotency_mismatch")
    assert [c for _, c in message_texts(await stored(llm, user))].count("second") == 0


async def test_two_chats_on_one_conversation_take_turns(llm: Api, fake: FakeOpenAI) -> None:
    user = new_user()
    conversation = (await chat(llm, user, "start")).json()["conversation"]
    cid = conversation["id"]
    answers = await asyncio.gather(
        chat(llm, user, "first #drip", conversation_id=cid, stream=True),
        chat(llm, user, "second #drip", conversation_id=cid),
        chat(llm, user, "third", conversation_id=cid),
    )
    assert [r.status_code for r in answers] == [200, 200, 200]
    texts = message_texts(await stored(llm, user))
    assert len(texts) == 8
    assert [role for role, _ in texts] == ["user", "assistant"] * 4  # never interleaved
    for (_, asked), (_, answered) in zip(texts[::2], texts[1::2], strict=True):
        assert answered.endswith(f"to: {asked}")  # each reply follows its own message
    last = max(position_of(r) for r in answers)
    r = await llm.client.get(f"/v1/conversations/{cid}/messages", params={"min_position": last}, headers=auth(user))
    assert [m["seq"] for m in r.json()["data"]] == list(range(1, 9))
    # Whichever turn went last was asked with the earlier turns' replies in its prompt.
    asked = [q for q in fake.requests if q["messages"][-1]["content"] in {"first #drip", "second #drip", "third"}]
    assert len(asked) == 3 and [m["role"] for m in asked[-1]["messages"]][-2:] == ["assistant", "user"]
    assert asked[-1]["messages"][-2]["content"].endswith(f"to: {asked[-2]['messages'][-1]['content']}")


def position_of(r: httpx.Response) -> int:
    """The position a chat answer (JSON or a stream) ends at."""
    if r.headers["content-type"].startswith("text/event-stream"):
        return int(sse(r.text)[-1][1]["position"])
    return int(r.json()["position"])
