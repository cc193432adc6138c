"""The HTTP contract of shared/API.md, exercised over HTTP against `chatlog serve` and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest

from tests.support import SECRET, TIMESTAMP, Api, assert_problem, auth, new_user

# --- shapes -----------------------------------------------------------------------------


async def test_a_new_conversation_has_the_documented_shape(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="Trip to Oslo", metadata={"topic": "travel"})
    assert set(c) == {
        "id", "object", "title", "metadata", "created_at", "updated_at",
        "message_count", "last_message_preview", "version", "position", "active_leaf_id", "forked_from",
    }  # fmt: skip
    assert c["active_leaf_id"] is None and c["forked_from"] is None
    assert c["object"] == "conversation" and uuid.UUID(c["id"]).version == 7 and c["id"] == c["id"].lower()
    assert (c["title"], c["metadata"], c["message_count"], c["last_message_preview"], c["version"]) == (
        "Trip to Oslo", {"topic": "travel"}, 0, None, 1,
    )  # fmt: skip
    assert TIMESTAMP.match(c["created_at"]) and c["created_at"] == c["updated_at"]
    assert isinstance(c["position"], int) and c["position"] >= 1

    r = await api.client.get(f"/v1/conversations/{c['id']}?min_position={c['position']}", headers=auth(user))
    got = r.json()
    assert r.status_code == 200 and "position" not in got
    assert {k: v for k, v in c.items() if k != "position"} == got


async def test_a_message_has_the_documented_shape_and_moves_its_conversation(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="t")
    m = await api.say(user, c["id"], "x" * 300, metadata={"source": "web"})
    assert set(m) == {
        "id", "object", "conversation_id", "seq", "role", "content", "metadata", "created_at", "position", "parent_id",
    }  # fmt: skip
    assert m["parent_id"] is None
    assert (m["object"], m["conversation_id"], m["seq"], m["role"], m["metadata"]) == (
        "message", c["id"], 1, "user", {"source": "web"},
    )  # fmt: skip
    assert TIMESTAMP.match(m["created_at"]) and m["position"] > c["position"]
    got = (await api.client.get(f"/v1/conversations/{c['id']}?min_position={m['position']}", headers=auth(user))).json()
    assert got["message_count"] == 1 and got["last_message_preview"] == "x" * 200
    assert got["version"] == 2 and got["updated_at"] == m["created_at"]


async def test_a_client_supplied_id_is_kept_and_a_taken_one_is_409_for_anyone(api: Api) -> None:
    alice, bob = new_user(), new_user()
    wanted = str(uuid.uuid4())
    c = await api.create(alice, id=wanted)
    assert c["id"] == wanted
    for user in (alice, bob):
        r = await api.client.post("/v1/conversations", json={"id": wanted}, headers=auth(user))
        body = assert_problem(r, 409, "version_conflict")
        assert "current_version" not in body


async def test_patch_changes_title_and_metadata_and_answers_the_whole_conversation(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="old", metadata={"a": "1"})
    await api.say(user, c["id"])
    r = await api.client.patch(f"/v1/conversations/{c['id']}", json={"title": "new"}, headers=auth(user))
    assert r.status_code == 200, r.text
    p = r.json()
    assert (p["title"], p["metadata"], p["message_count"], p["version"]) == ("new", {"a": "1"}, 1, 3)
    r = await api.client.patch(f"/v1/conversations/{c['id']}", json={"metadata": {"b": "2"}}, headers=auth(user))
    assert r.json()["metadata"] == {"b": "2"} and r.json()["title"] == "new"


# --- versions and concurrency -------------------------------------------------------------


async def test_a_stale_expected_version_is_409_with_the_current_version_and_stores_nothing(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    one = await api.say(user, c["id"], "one", expected_version=1)
    for method, url, body in (
        ("POST", f"/v1/conversations/{c['id']}/messages", {"role": "user", "content": "late", "expected_version": 1}),
        ("PATCH", f"/v1/conversations/{c['id']}", {"title": "late", "expected_version": 1}),
        ("DELETE", f"/v1/conversations/{c['id']}?expected_version=1", None),
    ):
        r = await api.client.request(method, url, json=body, headers=auth(user))
        assert assert_problem(r, 409, "version_conflict")["current_version"] == 2
    msgs = (
        await api.client.get(f"/v1/conversations/{c['id']}/messages?min_position={one['position']}", headers=auth(user))
    ).json()
    assert [m["content"] for m in msgs["data"]] == ["one"]


async def test_50_concurrent_appends_get_seq_1_to_50(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    results = await asyncio.gather(*(api.say(user, c["id"], f"m{i}") for i in range(50)))
    assert sorted(m["seq"] for m in results) == list(range(1, 51))
    last = max(m["position"] for m in results)
    page = await api.client.get(
        f"/v1/conversations/{c['id']}/messages?limit=100&min_position={last}", headers=auth(user)
    )
    assert [m["seq"] for m in page.json()["data"]] == list(range(1, 51))
    assert sorted(m["content"] for m in page.json()["data"]) == sorted(f"m{i}" for i in range(50))


# --- idempotency ------------------------------------------------------------------------


async def test_an_idempotent_retry_returns_the_first_answer_and_appends_nothing(api: Api) -> None:
    user = new_user()
    headers = auth(user) | {"Idempotency-Key": "create-1"}
    first = await api.client.post("/v1/conversations", json={"title": "once"}, headers=headers)
    again = await api.client.post("/v1/conversations", json={"title": "once"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    cid = first.json()["id"]
    m_headers = auth(user) | {"Idempotency-Key": "msg-1"}
    body = {"role": "user", "content": "once"}
    answers = await asyncio.gather(
        *(api.client.post(f"/v1/conversations/{cid}/messages", json=body, headers=m_headers) for _ in range(10))
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.text for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 9
    page = await api.client.get(
        f"/v1/conversations/{cid}/messages?min_position={answers[0].json()['position']}", headers=auth(user)
    )
    assert [m["content"] for m in page.json()["data"]] == ["once"]


async def test_a_reused_key_with_another_body_is_422_idempotency_mismatch(api: Api) -> None:
    user = new_user()
    headers = auth(user) | {"Idempotency-Key": "k"}
    assert (await api.client.post("/v1/conversations", json={"title": "a"}, headers=headers)).status_code == 201
    r = await api.client.post("/v1/conversations", json={"title": "b"}, headers=headers)
    assert_problem(r, 422, "idempotency_mismatch")
    other = new_user()  # keys are per user
    assert (
        await api.client.post("/v1/conversations", json={"title": "b"}, headers=auth(other) | {"Idempotency-Key": "k"})
    ).status_code == 201


# --- isolation --------------------------------------------------------------------------


async def test_another_users_conversation_is_404_on_every_route(api: Api) -> None:
    alice, bob = new_user(), new_user()
    c = await api.create(alice, title="private")
    m = await api.say(alice, c["id"], "secret")
    cid = c["id"]
    for method, url, body in (
        ("GET", f"/v1/conversations/{cid}", None),
        ("GET", f"/v1/conversations/{cid}?min_position={m['position']}", None),
        ("PATCH", f"/v1/conversations/{cid}", {"title": "mine"}),
        ("DELETE", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}/messages", {"role": "user", "content": "intrusion"}),
        ("GET", f"/v1/conversations/{cid}/messages?min_position={m['position']}", None),
    ):
        r = await api.client.request(method, url, json=body, headers=auth(bob))
        assert_problem(r, 404, "not_found")
    listed = (await api.client.get(f"/v1/conversations?min_position={m['position']}", headers=auth(bob))).json()
    assert listed["data"] == []
    feed = (await api.client.get("/v1/events", headers=auth(bob))).json()
    assert feed["data"] == []
    r = await api.client.get(f"/v1/events?after={m['position'] - 1}", headers=auth(bob))
    assert r.status_code == 200 and r.json()["data"] == []
    mine = (
        await api.client.get(f"/v1/conversations/{cid}/messages?min_position={m['position']}", headers=auth(alice))
    ).json()
    assert [x["content"] for x in mine["data"]] == ["secret"]


# --- pagination -------------------------------------------------------------------------


async def walk(api: Api, user: str, url: str, *, during: Any = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        sep = "&" if "?" in url else "?"
        r = await api.client.get(url + (f"{sep}cursor={cursor}" if cursor else ""), headers=auth(user))
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["object"] == "list" and isinstance(page["has_more"], bool)
        items += page["data"]
        if during is not None:
            await during()
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return items
        cursor = page["next_cursor"]


async def test_walking_conversation_pages_returns_each_once_even_while_new_ones_arrive(api: Api) -> None:
    user = new_user()
    made = [await api.create(user, title=f"c{i}") for i in range(23)]
    last = made[-1]["position"]
    url = f"/v1/conversations?limit=5&min_position={last}"
    desc = await walk(api, user, url)
    assert [c["id"] for c in desc] == [c["id"] for c in reversed(made)]
    asc = await walk(api, user, url + "&order=asc")
    assert [c["id"] for c in asc] == [c["id"] for c in made]

    async def another() -> None:
        await api.create(user, title="arrived during the walk")

    during = await walk(api, user, url, during=another)
    ids = [c["id"] for c in during]
    assert len(ids) == len(set(ids))
    assert [i for i in ids if i in {c["id"] for c in made}] == [c["id"] for c in reversed(made)]


async def test_walking_message_pages_in_both_orders(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    last = [await api.say(user, c["id"], f"m{i}") for i in range(12)][-1]["position"]
    url = f"/v1/conversations/{c['id']}/messages?limit=5&min_position={last}"
    assert [m["seq"] for m in await walk(api, user, url)] == list(range(1, 13))
    assert [m["seq"] for m in await walk(api, user, url + "&order=desc")] == list(range(12, 0, -1))
    default = (await api.client.get(f"/v1/conversations/{c['id']}/messages", headers=auth(user))).json()
    assert len(default["data"]) == 12  # default limit 50


async def test_tampered_and_foreign_cursors_are_422(api: Api) -> None:
    alice, bob = new_user(), new_user()
    made = [await api.create(alice) for _ in range(3)]
    page = (
        await api.client.get(f"/v1/conversations?limit=1&min_position={made[-1]['position']}", headers=auth(alice))
    ).json()
    cursor = page["next_cursor"]
    payload, mac = cursor.split(".")
    raw = base64.urlsafe_b64decode(payload + "==")
    forged = base64.urlsafe_b64encode(raw.replace(b'"conversations', b'"Conversations')).rstrip(b"=").decode()
    flipped = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")  # always a different signature
    for bad in (f"{forged}.{mac}", flipped, "garbage", "a.b.c", "%00", cursor + "x" * 3000):
        r = await api.client.get("/v1/conversations", params={"cursor": bad}, headers=auth(alice))
        assert_problem(r, 422, "validation_error")
    assert_problem(
        await api.client.get("/v1/conversations", params={"cursor": cursor}, headers=auth(bob)), 422, "validation_error"
    )
    r = await api.client.get("/v1/conversations", params={"cursor": cursor, "order": "asc"}, headers=auth(alice))
    assert_problem(r, 422, "validation_error")


# --- read-your-writes -------------------------------------------------------------------


async def test_min_position_waits_for_the_read_models_and_gives_up_with_503(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    r = await api.client.get(f"/v1/conversations/{c['id']}?min_position={c['position']}", headers=auth(user))
    assert r.status_code == 200
    started = time.monotonic()
    r = await api.client.get("/v1/conversations?min_position=999999999", headers=auth(user))
    body = assert_problem(r, 503, "not_ready")
    assert r.headers["retry-after"].isdigit() and 0.9 < time.monotonic() - started < 5
    assert "999999999" in body["detail"]


# --- deletion ---------------------------------------------------------------------------


async def test_a_deleted_conversation_vanishes_from_every_read_but_its_events_stay(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="doomed")
    await api.say(user, c["id"], "bye")
    r = await api.client.delete(f"/v1/conversations/{c['id']}", headers=auth(user))
    assert r.status_code == 204 and r.content == b""
    deleted_at = int(r.headers["chatlog-position"])  # a 204 has no body: the position is a header
    listed = await api.client.get(f"/v1/conversations?min_position={deleted_at}", headers=auth(user))
    assert listed.json()["data"] == []  # read-your-writes at once
    feed = await feed_of(api, user, 3)
    assert [e["type"] for e in feed] == ["conversation.started", "message.appended", "conversation.deleted"]
    assert feed[-1]["position"] == deleted_at
    for url in (f"/v1/conversations/{c['id']}?min_position={deleted_at}", f"/v1/conversations/{c['id']}/messages"):
        assert_problem(await api.client.get(url, headers=auth(user)), 404, "not_found")
    assert (await api.client.get(f"/v1/conversations?min_position={deleted_at}", headers=auth(user))).json()[
        "data"
    ] == []
    for method, url, body in (
        ("DELETE", f"/v1/conversations/{c['id']}", None),
        ("PATCH", f"/v1/conversations/{c['id']}", {"title": "x"}),
        ("POST", f"/v1/conversations/{c['id']}/messages", {"role": "user", "content": "x"}),
    ):
        assert_problem(await api.client.request(method, url, json=body, headers=auth(user)), 404, "not_found")


# --- the event feed ---------------------------------------------------------------------


async def feed_of(api: Api, user: str, count: int) -> list[dict[str, Any]]:
    """The user's feed once it lists `count` events. The feed shows an event only when every
    older transaction has ended (the projection worker's batches hold one for milliseconds)."""
    deadline = time.monotonic() + 5
    while True:
        data: list[dict[str, Any]] = (await api.client.get("/v1/events", headers=auth(user))).json()["data"]
        if len(data) >= count or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.01)


async def test_the_event_feed_lists_own_events_in_commit_order_by_after_and_cursor(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="feed")
    msgs = [await api.say(user, c["id"], f"m{i}") for i in range(4)]
    await feed_of(api, user, 5)
    everything = await walk(api, user, "/v1/events?limit=2")
    assert [e["position"] for e in everything] == [c["position"]] + [m["position"] for m in msgs]
    first = everything[0]
    assert set(first) == {
        "position",
        "event_id",
        "type",
        "conversation_id",
        "version",
        "data",
        "metadata",
        "recorded_at",
    }
    assert first["data"] == {"title": "feed", "metadata": {}} and first["conversation_id"] == c["id"]
    assert TIMESTAMP.match(first["recorded_at"]) and first["version"] == 1
    after = (await api.client.get(f"/v1/events?after={msgs[1]['position']}", headers=auth(user))).json()
    assert [e["position"] for e in after["data"]] == [msgs[2]["position"], msgs[3]["position"]]
    assert after["data"][0]["data"]["seq"] == 3
    assert (await api.client.get("/v1/events?after=0", headers=auth(user))).json()["data"] == everything


async def test_the_event_feed_takes_any_position_as_after_and_reveals_nothing_by_it(api: Api) -> None:
    """`after` may be any position: another user's, one never used, one beyond the log. It means
    after the caller's last own event at or before it, so the answer tells nothing of others."""
    alice, bob = new_user(), new_user()
    c = await api.create(alice)
    first = await api.say(alice, c["id"], "one")
    other = await api.say(bob, (await api.create(bob))["id"], "bob's")
    last = await api.say(alice, c["id"], "two")
    await feed_of(api, alice, 3)

    async def positions(after: int) -> list[int]:
        r = await api.client.get(f"/v1/events?after={after}", headers=auth(alice))
        assert r.status_code == 200, r.text
        return [e["position"] for e in r.json()["data"]]

    assert await positions(0) == [c["position"], first["position"], last["position"]]
    assert await positions(other["position"]) == [last["position"]]  # bob's event: as after alice's `first`
    assert await positions(other["position"]) == await positions(first["position"])
    assert await positions(last["position"] + 1_000_000) == []
    assert await positions(9_223_372_036_854_775_807) == []
    for bad in ("-1", "9223372036854775808", "x", "1.5"):
        assert_problem(await api.client.get(f"/v1/events?after={bad}", headers=auth(alice)), 422, "validation_error")


# --- authentication ---------------------------------------------------------------------


def _unsigned(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        f"Bearer {jwt.encode({'sub': 'a', 'exp': int(time.time()) - 60}, SECRET, algorithm='HS256')}",
        f"Bearer {jwt.encode({'sub': 'a', 'exp': int(time.time()) + 60}, 'x' + SECRET, algorithm='HS256')}",
        f"Bearer {jwt.encode({'sub': 'a'}, SECRET, algorithm='HS256')}",
        f"Bearer {jwt.encode({'exp': int(time.time()) + 60}, SECRET, algorithm='HS256')}",
        f"Bearer {jwt.encode({'sub': '', 'exp': int(time.time()) + 60}, SECRET, algorithm='HS256')}",
        f"Bearer {jwt.encode({'sub': 'x' * 256, 'exp': int(time.time()) + 60}, SECRET, algorithm='HS256')}",
        "Bearer " + jwt.encode({"sub": "a\x00b", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
        "Bearer " + jwt.encode({"sub": "a\ud800b", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
        f"Bearer {jwt.encode({'sub': 'a', 'exp': int(time.time()) + 60}, SECRET, algorithm='HS512')}",
        f"Bearer {_unsigned({'sub': 'a', 'exp': int(time.time()) + 60})}",
        "Bearer not.a.jwt",
    ],
    ids=[
        "none",
        "empty",
        "basic",
        "expired",
        "forged",
        "no-exp",
        "no-sub",
        "empty-sub",
        "long-sub",
        "nul-sub",
        "surrogate-sub",
        "hs512",
        "alg-none",
        "junk",
    ],
)
async def test_bad_tokens_are_401_on_every_route(api: Api, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    cid = uuid.uuid4()
    for method, url, body in (
        ("GET", "/v1/conversations", None),
        ("POST", "/v1/conversations", {}),
        ("GET", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}/messages", {"role": "user", "content": "x"}),
        ("GET", "/v1/events", None),
        ("GET", "/v1/search?q=x", None),
        ("POST", "/v1/chat", {"message": "x"}),
    ):
        r = await api.client.request(method, url, json=body, headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"


# --- operations and OpenAPI -------------------------------------------------------------


async def test_operations_routes_need_no_token(api: Api) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and "conversations" in ready.json()["projections"]
    await api.create(new_user())
    answer = await api.client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=")
    assert answer.headers["content-type"].count("charset") == 1
    metrics = answer.text
    assert 'chatlog_http_requests_total{method="POST",route="/v1/conversations",status="201"}' in metrics
    assert "chatlog_http_request_duration_seconds_bucket" in metrics
    assert "chatlog_events_appended_total" in metrics and "chatlog_projection_lag_events" in metrics


async def test_every_answer_carries_a_request_id(api: Api) -> None:
    r = await api.client.get("/v1/conversations", headers=auth(new_user()) | {"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await api.client.get("/v1/conversations", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 36


async def test_the_openapi_document_lists_problem_answers_and_no_400(api: Api) -> None:
    doc = (await api.client.get("/schema/openapi.json")).json()
    operations = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items() if p.startswith("/v1/")]
    assert {(p, m) for p, m, _ in operations} == {
        ("/v1/conversations", "post"),
        ("/v1/conversations", "get"),
        ("/v1/conversations/{conversation_id}", "get"),
        ("/v1/conversations/{conversation_id}", "patch"),
        ("/v1/conversations/{conversation_id}", "delete"),
        ("/v1/me", "delete"),
        ("/v1/conversations/{conversation_id}/fork", "post"),
        ("/v1/conversations/{conversation_id}/messages", "post"),
        ("/v1/conversations/{conversation_id}/messages", "get"),
        ("/v1/events", "get"),
        ("/v1/chat", "post"),
        ("/v1/search", "get"),
    }
    for path, method, op in operations:
        responses = op["responses"]
        assert "400" not in responses, (path, method)
        takes_input = path != "/v1/me"  # the token is all it reads: it cannot answer 422
        for status in ("401", "422", "500") if takes_input else ("401", "500"):
            assert "application/problem+json" in responses[status]["content"], (path, method, status)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"200", "503"} <= set(doc["paths"]["/readyz"]["get"]["responses"])
