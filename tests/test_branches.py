"""Branches (API.md, "Branches"): editing a message or appending after an earlier one adds a
sibling, never changes anything; the active branch, any branch by its leaf, and the whole tree
are listed with the same kind of cursor; ids of other conversations answer 422, other users'
conversations 404, and bad input stores nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.clusters import pages
from tests.support import Api, assert_problem, auth, new_user


async def say(api: Api, user: str, cid: str, content: str, **extra: Any) -> dict[str, Any]:
    return await api.say(user, cid, content, **extra)


async def conversation(api: Api, user: str, cid: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/conversations/{cid}", headers=auth(user))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def contents(api: Api, user: str, cid: str, **params: Any) -> list[str]:
    return [m["content"] for m in await pages(api, user, f"/v1/conversations/{cid}/messages", **params)]


async def test_a_linear_conversation_is_one_branch(api: Api) -> None:
    user = new_user()
    c = await api.create(user)
    assert c["active_leaf_id"] is None and c["forked_from"] is None
    said = [await say(api, user, c["id"], f"m{i}") for i in range(3)]
    assert [m["parent_id"] for m in said] == [None, said[0]["id"], said[1]["id"]]
    assert (await conversation(api, user, c["id"]))["active_leaf_id"] == said[-1]["id"]
    expected = ["m0", "m1", "m2"]
    assert await contents(api, user, c["id"]) == expected
    assert await contents(api, user, c["id"], tree="true") == expected
    assert await contents(api, user, c["id"], leaf_id=said[-1]["id"]) == expected
    assert await contents(api, user, c["id"], order="desc") == expected[::-1]


async def test_an_edit_adds_a_branch_and_switching_back_loses_nothing(api: Api) -> None:
    user = new_user()
    cid = (await api.create(user))["id"]
    first = await say(api, user, cid, "question")
    answer = await say(api, user, cid, "answer")
    # An edit of the first message: a sibling of it (the edited message's parent: none).
    better = await say(api, user, cid, "question, better", parent_id=None)
    assert better["parent_id"] is None and better["seq"] == 3
    edited = await say(api, user, cid, "answer to the better question")
    assert edited["parent_id"] == better["id"]
    sibling = await say(api, user, cid, "another answer", parent_id=answer["id"])
    assert sibling["parent_id"] == answer["id"] and sibling["seq"] == 5
    c = await conversation(api, user, cid)
    assert c["active_leaf_id"] == sibling["id"] and c["message_count"] == 5
    assert await contents(api, user, cid) == ["question", "answer", "another answer"]
    # The other branch is still there, by its leaf, and in the tree.
    assert await contents(api, user, cid, leaf_id=edited["id"]) == ["question, better", "answer to the better question"]
    tree = await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")
    assert [m["seq"] for m in tree] == [1, 2, 3, 4, 5]
    # Switch back: PATCH active_leaf_id, and the list follows (a reload finds the same branch).
    r = await api.client.patch(f"/v1/conversations/{cid}", json={"active_leaf_id": edited["id"]}, headers=auth(user))
    assert r.status_code == 200 and r.json()["active_leaf_id"] == edited["id"]
    assert (await contents(api, user, cid))[-1] == "answer to the better question"
    # A branch may end at any message: its path.
    r = await api.client.patch(f"/v1/conversations/{cid}", json={"active_leaf_id": first["id"]}, headers=auth(user))
    assert r.status_code == 200
    assert await contents(api, user, cid) == ["question"]
    # An append without parent_id follows the active leaf.
    follow = await say(api, user, cid, "after the first")
    assert follow["parent_id"] == first["id"]


async def test_bad_branch_ids_are_422_and_store_nothing(api: Api) -> None:
    user, other = new_user(), new_user()
    cid = (await api.create(user))["id"]
    mine = await say(api, user, cid, "mine")
    elsewhere = (await api.create(user))["id"]
    foreign = await say(api, user, elsewhere, "in another conversation")
    theirs_cid = (await api.create(other))["id"]
    theirs = await say(api, other, theirs_cid, "theirs")
    before = await conversation(api, user, cid)
    for parent in (foreign["id"], theirs["id"], "01a2b3c4-0000-7000-8000-000000000000"):
        r = await api.client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": "x", "parent_id": parent},
            headers=auth(user),
        )
        assert_problem(r, 422, "validation_error")
        r = await api.client.patch(f"/v1/conversations/{cid}", json={"active_leaf_id": parent}, headers=auth(user))
        assert_problem(r, 422, "validation_error")
        r = await api.client.get(f"/v1/conversations/{cid}/messages", params={"leaf_id": parent}, headers=auth(user))
        assert_problem(r, 422, "validation_error")
    for bad in ("not-a-uuid", "1" * 70):
        r = await api.client.get(f"/v1/conversations/{cid}/messages", params={"leaf_id": bad}, headers=auth(user))
        assert r.status_code == 422
        r = await api.client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": "x", "parent_id": bad},
            headers=auth(user),
        )
        assert r.status_code == 422
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages", params={"leaf_id": mine["id"], "tree": "true"}, headers=auth(user)
    )
    assert_problem(r, 422, "validation_error")
    assert await conversation(api, user, cid) == before
    # Another user's conversation: 404, whatever the ids.
    r = await api.client.post(
        f"/v1/conversations/{theirs_cid}/messages",
        json={"role": "user", "content": "x", "parent_id": theirs["id"]},
        headers=auth(user),
    )
    assert_problem(r, 404, "not_found")
    r = await api.client.patch(
        f"/v1/conversations/{theirs_cid}", json={"active_leaf_id": theirs["id"]}, headers=auth(user)
    )
    assert_problem(r, 404, "not_found")
    r = await api.client.get(
        f"/v1/conversations/{theirs_cid}/messages", params={"leaf_id": theirs["id"]}, headers=auth(user)
    )
    assert_problem(r, 404, "not_found")


async def test_concurrent_edits_of_one_message_give_distinct_siblings(api: Api) -> None:
    user = new_user()
    cid = (await api.create(user))["id"]
    root = await say(api, user, cid, "root")
    await say(api, user, cid, "reply")
    edits = await asyncio.gather(*(say(api, user, cid, f"edit {i}", parent_id=root["id"]) for i in range(12)))
    assert len({e["id"] for e in edits}) == 12 and all(e["parent_id"] == root["id"] for e in edits)
    tree = await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")
    assert [m["seq"] for m in tree] == list(range(1, 15))
    for e in edits:
        assert await contents(api, user, cid, leaf_id=e["id"]) == ["root", e["content"]]


async def test_a_deep_branch_pages_by_cursor_and_stays_on_its_branch_while_messages_arrive(api: Api) -> None:
    user = new_user()
    cid = (await api.create(user))["id"]
    main = [await say(api, user, cid, f"m{i}") for i in range(70)]
    # Forks along the way: a side branch at every tenth message, each a few messages deep.
    for k in range(0, 70, 10):
        side = await say(api, user, cid, f"side {k}.0", parent_id=main[k]["id"])
        await say(api, user, cid, f"side {k}.1", parent_id=side["id"])
    leaf = main[-1]["id"]
    expected = [f"m{i}" for i in range(70)]
    assert await contents(api, user, cid, leaf_id=leaf, limit=7) == expected
    assert await contents(api, user, cid, leaf_id=leaf, limit=9, order="desc") == expected[::-1]
    side_path = [*expected[:41], "side 40.0", "side 40.1"]
    last_side = (await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true"))[-1]
    assert last_side["content"] == "side 60.1"
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages", params={"leaf_id": leaf, "limit": 20}, headers=auth(user)
    )
    first_page = r.json()
    # The active branch is the last side branch now; walk it with a cursor while it grows and moves.
    r = await api.client.get(f"/v1/conversations/{cid}/messages", params={"limit": 25}, headers=auth(user))
    walked = [m["content"] for m in r.json()["data"]]
    cursor = r.json()["next_cursor"]
    await say(api, user, cid, "late", parent_id=main[5]["id"])  # moves the active leaf elsewhere
    while cursor:
        r = await api.client.get(
            f"/v1/conversations/{cid}/messages", params={"limit": 25, "cursor": cursor}, headers=auth(user)
        )
        assert r.status_code == 200, r.text
        walked += [m["content"] for m in r.json()["data"]]
        cursor = r.json()["next_cursor"]
    assert walked == [*expected[:61], "side 60.0", "side 60.1"]
    assert [m["content"] for m in first_page["data"]] == expected[:20]
    # A cursor of one branch with another leaf_id is refused; a tampered one too.
    r = await api.client.get(
        f"/v1/conversations/{cid}/messages",
        params={"leaf_id": main[3]["id"], "cursor": first_page["next_cursor"]},
        headers=auth(user),
    )
    assert_problem(r, 422, "validation_error")
    assert await contents(api, user, cid, leaf_id=(await say(api, user, cid, "x", parent_id=main[40]["id"]))["id"])
    assert side_path[:41] == expected[:41]


async def test_time_travel_folds_the_log_up_to_a_position(api: Api) -> None:
    user = new_user()
    c = await api.create(user, title="before")
    first = await say(api, user, c["id"], "one")
    second = await say(api, user, c["id"], "two")
    r = await api.client.patch(f"/v1/conversations/{c['id']}", json={"title": "after"}, headers=auth(user))
    renamed = r.json()["position"]
    edit = await say(api, user, c["id"], "two, again", parent_id=first["id"])
    at = f"/v1/conversations/{c['id']}"
    then = (await api.client.get(at, params={"as_of": second["position"]}, headers=auth(user))).json()
    assert then["title"] == "before" and then["message_count"] == 2 and then["active_leaf_id"] == second["id"]
    assert (await api.client.get(at, params={"as_of": renamed}, headers=auth(user))).json()["title"] == "after"
    assert await contents(api, user, c["id"], as_of=first["position"]) == ["one"]
    assert await contents(api, user, c["id"], as_of=second["position"], limit=1) == ["one", "two"]
    assert await contents(api, user, c["id"], as_of=edit["position"]) == ["one", "two, again"]
    assert await contents(api, user, c["id"], as_of=edit["position"], tree="true") == ["one", "two", "two, again"]
    messages = await pages(api, user, f"{at}/messages", as_of=edit["position"], leaf_id=second["id"])
    assert [(m["content"], m["parent_id"]) for m in messages] == [("one", None), ("two", first["id"])]
    r = await api.client.get(
        f"{at}/messages", params={"as_of": edit["position"], "leaf_id": second["id"], "limit": 1}, headers=auth(user)
    )
    r = await api.client.get(
        f"{at}/messages",
        params={"as_of": edit["position"], "leaf_id": edit["id"], "cursor": r.json()["next_cursor"]},
        headers=auth(user),
    )
    assert_problem(r, 422, "validation_error")  # a cursor of another branch
    # Before the conversation existed, and for another user: 404; a bad as_of: 422.
    assert_problem(await api.client.get(at, params={"as_of": c["position"] - 1}, headers=auth(user)), 404, "not_found")
    assert_problem(
        await api.client.get(at, params={"as_of": edit["position"]}, headers=auth(new_user())), 404, "not_found"
    )
    for bad in ("-1", "x", "1.5"):
        assert (await api.client.get(at, params={"as_of": bad}, headers=auth(user))).status_code == 422
    # Deleted now: 404 at any position (its content is erased).
    assert (await api.client.delete(at, headers=auth(user))).status_code == 204
    assert_problem(await api.client.get(at, params={"as_of": second["position"]}, headers=auth(user)), 404, "not_found")


async def test_a_fork_copies_a_branch_and_outlives_its_source_and_the_other_way_round(api: Api) -> None:
    user = new_user()
    source = await api.create(user, title="source", metadata={"k": "v"})
    one = await say(api, user, source["id"], "one")
    two = await say(api, user, source["id"], "two")
    await say(api, user, source["id"], "two, edited", parent_id=one["id"])
    r = await api.client.post(
        f"/v1/conversations/{source['id']}/fork", json={"message_id": two["id"]}, headers=auth(user)
    )
    assert r.status_code == 201, r.text
    forked = r.json()
    assert forked["title"] == "source" and forked["metadata"] == {"k": "v"} and forked["message_count"] == 2
    assert forked["forked_from"] == {"conversation_id": source["id"], "message_id": two["id"]}
    copies = await pages(api, user, f"/v1/conversations/{forked['id']}/messages")
    assert [(m["content"], m["seq"]) for m in copies] == [("one", 1), ("two", 2)]
    assert {m["id"] for m in copies}.isdisjoint({one["id"], two["id"]})
    assert copies[1]["parent_id"] == copies[0]["id"] and forked["active_leaf_id"] == copies[1]["id"]
    # Default: the active leaf, and a title of one's own.
    r = await api.client.post(f"/v1/conversations/{source['id']}/fork", json={"title": "mine"}, headers=auth(user))
    again = r.json()
    assert again["title"] == "mine"
    assert await contents(api, user, again["id"]) == ["one", "two, edited"]
    # Bad input: 422 (a message of another conversation, a malformed id); another user's: 404.
    r = await api.client.post(
        f"/v1/conversations/{source['id']}/fork", json={"message_id": copies[0]["id"]}, headers=auth(user)
    )
    assert_problem(r, 422, "validation_error")
    r = await api.client.post(f"/v1/conversations/{source['id']}/fork", json={"message_id": "x"}, headers=auth(user))
    assert r.status_code == 422
    r = await api.client.post(f"/v1/conversations/{source['id']}/fork", json={}, headers=auth(new_user()))
    assert_problem(r, 404, "not_found")
    # Independent: erase the source, the fork is whole; erase a fork, the source is whole.
    assert (await api.client.delete(f"/v1/conversations/{source['id']}", headers=auth(user))).status_code == 204
    assert await contents(api, user, forked["id"]) == ["one", "two"]
    assert (await api.client.delete(f"/v1/conversations/{again['id']}", headers=auth(user))).status_code == 204
    assert await contents(api, user, forked["id"]) == ["one", "two"]
    # Idempotent like every POST.
    headers = {**auth(user), "Idempotency-Key": "fork-once"}
    first = await api.client.post(f"/v1/conversations/{forked['id']}/fork", json={}, headers=headers)
    retry = await api.client.post(f"/v1/conversations/{forked['id']}/fork", json={}, headers=headers)
    assert first.status_code == retry.status_code == 201 and retry.headers.get("Idempotent-Replayed") == "true"
    assert first.json()["id"] == retry.json()["id"]


async def test_chat_edits_and_regenerates_on_branches(api: Api) -> None:
    user = new_user()
    r = await api.client.post("/v1/chat", json={"message": "first question"}, headers=auth(user))
    assert r.status_code == 200, r.text
    turn = r.json()
    cid, question, answer = turn["conversation"]["id"], *turn["messages"]
    r = await api.client.post("/v1/chat", json={"conversation_id": cid, "message": "second"}, headers=auth(user))
    assert r.status_code == 200
    # An edit of the first question: a sibling of it; the prompt is that new branch only.
    r = await api.client.post(
        "/v1/chat", json={"conversation_id": cid, "message": "first, edited", "parent_id": None}, headers=auth(user)
    )
    assert r.status_code == 200, r.text
    edited, reply = r.json()["messages"]
    assert edited["parent_id"] is None and reply["parent_id"] == edited["id"]
    assert "1 message" in reply["content"]  # the echo assistant counts the prompt's messages
    assert await contents(api, user, cid) == ["first, edited", reply["content"]]
    # Regenerate the first answer: a sibling of it, the active leaf; the prompt ends at its question.
    r = await api.client.post(
        "/v1/chat", json={"conversation_id": cid, "regenerate_id": answer["id"]}, headers=auth(user)
    )
    assert r.status_code == 200, r.text
    asked, again = r.json()["messages"]
    assert asked["id"] == question["id"] and again["parent_id"] == question["id"] and again["id"] != answer["id"]
    assert r.json()["conversation"]["active_leaf_id"] == again["id"]
    assert await contents(api, user, cid) == ["first question", again["content"]]
    tree = await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")
    assert [m["seq"] for m in tree] == list(range(1, 8))  # 3 turns of 2, and a regenerated reply
    # Idempotent like every turn: a retry with its key answers the same reply and asks nothing.
    keyed = {**auth(user), "Idempotency-Key": "regenerate-once"}
    body = {"conversation_id": cid, "regenerate_id": again["id"]}
    once = await api.client.post("/v1/chat", json=body, headers=keyed)
    retry = await api.client.post("/v1/chat", json=body, headers=keyed)
    assert once.status_code == retry.status_code == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert once.json()["messages"][1]["id"] == retry.json()["messages"][1]["id"]
    other = await api.client.post("/v1/chat", json={"conversation_id": cid, "message": "another"}, headers=keyed)
    assert_problem(other, 422, "idempotency_mismatch")  # the key was used for the regenerate: nothing stored
    tree = await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")
    assert len(tree) == 8
    # Bad: regenerate a user message, or another conversation's reply, or both message and regenerate_id.
    for body in (
        {"conversation_id": cid, "regenerate_id": question["id"]},
        {"conversation_id": cid, "regenerate_id": "01a2b3c4-0000-7000-8000-000000000000"},
        {"conversation_id": cid, "regenerate_id": answer["id"], "message": "x"},
        {"regenerate_id": answer["id"]},
        {"conversation_id": cid, "message": "x", "parent_id": "01a2b3c4-0000-7000-8000-000000000000"},
    ):
        assert_problem(await api.client.post("/v1/chat", json=body, headers=auth(user)), 422, "validation_error")
    assert len(await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")) == 8


async def test_mcp_follows_the_active_branch_and_appends_with_parent_id(api: Api) -> None:
    from tests.test_mcp import call, failure, over_http, problem_code

    user = new_user()
    cid = (await api.create(user))["id"]
    root = await say(api, user, cid, "root")
    await say(api, user, cid, "old reply")
    async with over_http(api, user) as client:
        added = await call(client, "append_message", conversation_id=cid, content="new reply", parent_id=root["id"])
        assert added["parent_id"] == root["id"]
        listed = await call(client, "get_messages", conversation_id=cid)
        assert [m["content"] for m in listed["messages"]] == ["root", "new reply"]
        elsewhere = (await api.create(user))["id"]
        foreign = await say(api, user, elsewhere, "elsewhere")
        text = await failure(client, "append_message", conversation_id=cid, content="x", parent_id=foreign["id"])
        assert problem_code(text) == "validation_error"
    assert len(await pages(api, user, f"/v1/conversations/{cid}/messages", tree="true")) == 3
