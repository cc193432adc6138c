"""The chat page, driven in a real headless Chromium (Debian's `chromium`, through Playwright)
against a real `chatlog serve` on a real PostgreSQL, with a fake OpenAI-compatible model that can
drip its reply slowly (to see it stream, and to stop it).

Every test records what the page did: console errors, uncaught exceptions, failed requests,
answers of 400 and above, and any request to another origin. It fails on any of them unless the
test names what it provokes. Each test leaves a screenshot in tests/screenshots/<test>.png.

Without Chromium (or Playwright) the module is skipped, saying so: `.ci/run` installs both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest

from tests.conftest import Databases
from tests.fake_openai import FakeOpenAI
from tests.support import SECRET, Api, auth, fake_model, new_user, serve_api, token

CHROMIUM = os.environ.get("CHATLOG_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"

try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the [test] extra installs it
    async_playwright = None

if os.environ.get("CHATLOG_TEST_REQUIRE_BROWSER") and (async_playwright is None or not Path(CHROMIUM).exists()):
    raise RuntimeError(f"CHATLOG_TEST_REQUIRE_BROWSER is set, but Playwright or Chromium ({CHROMIUM}) is missing")

pytestmark = [
    pytest.mark.skipif(async_playwright is None, reason="Playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHATLOG_TEST_CHROMIUM) to run these",
    ),
]

STORED = 'article[data-message-id]:not([data-message-id=""])'


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
async def site(databases: Databases, tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> AsyncIterator[Api]:
    """`chatlog serve` with the fake model as its assistant."""
    async for client in serve_api(
        databases,
        tmp_path_factory,
        **fake_model(fake.base_url),
        CHATLOG_OPENAI_READ_TIMEOUT="5",
        CHATLOG_READ_WAIT_SECONDS="5",
    ):
        yield client


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",  # the tests run as root on CI
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",  # no calls home: the machine has no network
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield launched
        await launched.close()


class Watched:
    """A page and everything it did that a user would call broken."""

    def __init__(self, page: Page, context: BrowserContext, base_url: str) -> None:
        self.page, self.context, self.base_url = page, context, base_url
        self.origin = urlsplit(base_url).netloc
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.allowed_statuses: set[int] = set()
        self.allowed_failures: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"uncaught: {exc}"))
        page.on("request", self._request)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def allow(self, *statuses: int, failed: str | None = None) -> None:
        """Answers with these statuses (and their console lines), or failed requests to `failed`, are expected."""
        self.allowed_statuses.update(statuses)
        if failed:
            self.allowed_failures.append(failed)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        text = message.text
        status = re.search(r"status of (\d{3})", text)
        if status and int(status.group(1)) in self.allowed_statuses:
            return
        self.problems.append(f"console error: {text}")

    def _request(self, request: Any) -> None:
        self.requests.append(f"{request.method} {request.url}")
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != self.origin:
            self.problems.append(f"request to another origin: {request.url}")

    def _failed(self, request: Any) -> None:
        if any(fragment in request.url for fragment in self.allowed_failures):
            return
        self.problems.append(f"failed request: {request.method} {request.url} ({request.failure})")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and response.status not in self.allowed_statuses:
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def api_calls(self, path: str = "/v1/") -> list[str]:
        return [r for r in self.requests if urlsplit(r.split(" ", 1)[1]).path.startswith(path)]

    async def sign_in(self, user: str, hash_rest: str = "") -> None:
        await self.page.goto(f"{self.base_url}/#token={token(user)}{hash_rest}")
        await expect(self.page.locator("#who")).to_have_text(f"Signed in as {user}")

    async def send(self, text: str) -> None:
        box = self.page.get_by_role("textbox", name="Message")
        await box.fill(text)
        await box.press("Enter")

    async def stored(self, count: int) -> Any:
        """The transcript once `count` stored messages are shown."""
        articles = self.page.get_by_role("log", name="Messages").locator(STORED)
        await expect(articles).to_have_count(count)
        return articles


@pytest.fixture
async def web(browser: Browser, site: Api, request: pytest.FixtureRequest) -> AsyncIterator[Watched]:
    """A fresh browser context on the served page; a screenshot and the problem check at the end."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.base_url)
    context.set_default_timeout(10_000)
    watched = Watched(await context.new_page(), context, site.base_url)
    yield watched
    SCREENSHOTS.mkdir(exist_ok=True)
    try:
        await watched.page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"))
    finally:
        await context.close()
    assert not watched.problems, "\n".join(watched.problems)


async def conversation_with(site: Api, user: str, contents: list[str], title: str = "") -> dict[str, Any]:
    conversation = await site.create(user, title=title)
    for content in contents:
        role = "assistant" if content.startswith("assistant:") else "user"
        await site.say(user, conversation["id"], content.removeprefix("assistant:"), role=role)
    return conversation


# ---- signing in ---------------------------------------------------------------------------------


async def test_signing_in_with_the_dialog_and_signing_out_forgets_the_token(web: Watched, site: Api) -> None:
    user = new_user()
    await conversation_with(site, user, ["kept"], title="Already here")
    page = web.page
    web.allow(401)
    await page.goto(site.base_url + "/")
    dialog = page.get_by_role("dialog", name="Sign in to chatlog")
    await expect(dialog).to_be_visible()

    await page.get_by_role("textbox", name="Token").fill("not-a-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(dialog.get_by_text("That token was not accepted.")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0

    await page.get_by_role("textbox", name="Token").fill(token(user))
    await page.get_by_role("button", name="Sign in").click()
    await expect(dialog).to_be_hidden()
    nav = page.get_by_role("navigation", name="Conversations")
    await expect(nav.get_by_role("link", name="Already here")).to_be_visible()

    await page.get_by_role("button", name="Sign out").click()
    await expect(dialog).to_be_visible()
    await expect(nav.get_by_role("link")).to_have_count(0)
    assert await page.evaluate("sessionStorage.length") == 0
    await page.reload()
    await expect(page.get_by_role("dialog", name="Sign in to chatlog")).to_be_visible()


async def test_the_cli_link_signs_in_and_the_token_leaves_the_address_bar(web: Watched, site: Api) -> None:
    user = new_user()
    await conversation_with(site, user, ["hello"], title="From the link")
    port = str(urlsplit(site.base_url).port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(CHATLOG_JWT_SECRET=SECRET, CHATLOG_PORT=port)
    command = [sys.executable, "-m", "service.cli", "token", user, "--url"]
    link = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert link.startswith(f"http://127.0.0.1:{port}/#token=")

    page = web.page
    await page.goto(link)
    await expect(page.get_by_role("link", name="From the link")).to_be_visible()
    assert "token" not in page.url
    assert await page.evaluate("sessionStorage.getItem('chatlog.token')") == link.split("#token=", 1)[1]
    await page.reload()  # the token lives in sessionStorage now
    await expect(page.get_by_role("link", name="From the link")).to_be_visible()


async def test_an_expired_sign_in_returns_to_the_dialog_with_words(web: Watched, site: Api) -> None:
    web.allow(401)
    expired = jwt.encode({"sub": new_user(), "exp": int(time.time()) - 60}, SECRET, algorithm="HS256")
    await web.page.goto(f"{site.base_url}/#token={expired}")
    dialog = web.page.get_by_role("dialog", name="Sign in to chatlog")
    await expect(dialog).to_be_visible()
    await expect(dialog.get_by_text("Your sign-in is not valid any more. Sign in again.")).to_be_visible()


# ---- chatting -----------------------------------------------------------------------------------


async def test_a_streamed_reply_shows_as_it_comes_and_the_history_survives_a_reload(web: Watched, site: Api) -> None:
    user = new_user()
    await web.sign_in(user)
    page = web.page
    await web.send("Plan a day in Oslo #drip")
    stop = page.get_by_role("button", name="Stop")
    await expect(stop).to_be_visible()
    await expect(page.get_by_role("status")).to_have_text("The assistant is replying.")
    streaming = page.locator('article[data-role="assistant"][aria-busy="true"]')
    await expect(streaming).to_contain_text("reply")  # part of the reply, while it still streams
    assert await stop.is_visible()

    articles = await web.stored(2)
    await expect(stop).to_be_hidden()
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    await expect(page.get_by_role("status")).to_have_text("The reply is complete.")
    assert await articles.nth(0).get_attribute("data-role") == "user"
    assert await articles.nth(1).get_attribute("data-role") == "assistant"
    await expect(articles.nth(1)).to_contain_text("to: Plan a day in Oslo #drip")
    nav = page.get_by_role("navigation", name="Conversations")
    await expect(nav.get_by_role("link", name="Plan a day in Oslo #drip")).to_be_visible()
    ids = [await a.get_attribute("data-message-id") for a in await articles.all()]
    assert "#c=" in page.url

    await page.reload()
    again = await web.stored(2)
    assert [await a.get_attribute("data-message-id") for a in await again.all()] == ids
    await expect(page.get_by_role("heading", name="Plan a day in Oslo #drip")).to_be_visible()

    await web.send("And the next day?")  # a second turn goes to the same conversation
    await web.stored(4)
    listed = (await site.client.get("/v1/conversations", headers=auth(user))).json()["data"]
    assert len(listed) == 1


async def test_edit_regenerate_and_branch_arrows_keep_every_branch(web: Watched, site: Api) -> None:
    user = new_user()
    await web.sign_in(user)
    page = web.page
    log = page.get_by_role("log", name="Messages")
    await web.send("Which city first?")
    articles = await web.stored(2)
    await expect(articles.nth(1)).to_contain_text("to: Which city first?")
    # Edit the question: its text goes to the box; Send adds a new branch beside it.
    await articles.nth(0).get_by_role("button", name="Edit").click()
    box = page.get_by_role("textbox", name="Message")
    await expect(box).to_have_value("Which city first?")
    await web.send("Which town first?")
    await expect(log.locator(STORED).nth(1)).to_contain_text("to: Which town first?")
    articles = await web.stored(2)
    question = articles.nth(0)
    await expect(question).to_contain_text("Which town first?")
    await expect(question.get_by_text("2 / 2")).to_be_visible()
    # Back to the first branch with the arrow, and forth again.
    await question.get_by_role("button", name="Previous branch").click()
    await expect(log.locator(STORED).nth(0)).to_contain_text("Which city first?")
    await expect(log.locator(STORED).nth(0).get_by_text("1 / 2")).to_be_visible()
    await expect(log.locator(STORED).nth(1)).to_contain_text("to: Which city first?")
    await expect(log.locator(STORED).nth(0).get_by_role("button", name="Previous branch")).to_be_disabled()
    await log.locator(STORED).nth(0).get_by_role("button", name="Next branch").click()
    await expect(log.locator(STORED).nth(0)).to_contain_text("Which town first?")
    # Regenerate the reply: a sibling of it, shown with its own arrows.
    first_reply = await log.locator(STORED).nth(1).get_attribute("data-message-id")
    await log.locator(STORED).nth(1).get_by_role("button", name="Regenerate").click()
    await expect(log.locator(STORED).nth(1).get_by_text("2 / 2")).to_be_visible()
    regenerated = await log.locator(STORED).nth(1).get_attribute("data-message-id")
    assert regenerated != first_reply
    # A reload finds the same active branch.
    await page.reload()
    articles = await web.stored(2)
    await expect(articles.nth(0)).to_contain_text("Which town first?")
    assert await articles.nth(1).get_attribute("data-message-id") == regenerated
    await expect(articles.nth(1).get_by_text("2 / 2")).to_be_visible()
    tree = (await site.client.get(
        f"/v1/conversations/{page.url.split('c=')[1].split('&')[0]}/messages",
        params={"tree": "true"}, headers=auth(user),
    )).json()["data"]  # fmt: skip
    assert len(tree) == 5  # nothing lost: two questions, three replies


async def test_stop_ends_the_reply_and_keeps_the_question(web: Watched, site: Api) -> None:
    user = new_user()
    conversation = await conversation_with(site, user, ["first"], title="Stopping")
    web.allow(failed="/v1/chat")  # the stopped stream is an aborted request
    await web.sign_in(user, f"&c={conversation['id']}")
    await web.stored(1)
    page = web.page
    await web.send("Tell me everything #drip")
    streaming = page.locator('article[data-role="assistant"][aria-busy="true"]')
    await expect(streaming).to_contain_text("reply")
    await page.get_by_role("button", name="Stop").click()
    await expect(page.get_by_text("Stopped. This reply was not saved.")).to_be_visible()
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    await expect(page.get_by_role("status")).to_have_text("The reply was stopped.")

    await asyncio.sleep(1.0)  # the server stores nothing more for the turn
    await page.reload()
    articles = await web.stored(2)
    assert [await a.get_attribute("data-role") for a in await articles.all()] == ["user", "user"]
    await expect(articles.nth(1)).to_contain_text("Tell me everything #drip")


async def test_stopping_the_first_reply_of_a_new_chat_keeps_the_new_conversation(web: Watched, site: Api) -> None:
    web.allow(failed="/v1/chat")
    await web.sign_in(new_user())
    page = web.page
    await web.send("A brand new question #drip")
    await expect(page.locator('article[data-role="assistant"][aria-busy="true"]')).to_contain_text("reply")
    await page.get_by_role("button", name="Stop").click()
    nav = page.get_by_role("navigation", name="Conversations")
    await expect(nav.get_by_role("link", name="A brand new question #drip")).to_have_attribute("aria-current", "page")
    await expect(page.get_by_role("heading", name="A brand new question #drip")).to_be_visible()
    assert "#c=" in page.url
    await web.send("A second question")  # goes to the same conversation, not a new one
    articles = await web.stored(3)  # both questions, one reply: the stopped one was not stored
    assert [await a.get_attribute("data-role") for a in await articles.all()] == ["user", "user", "assistant"]
    await expect(nav.get_by_role("link")).to_have_count(1)


async def test_an_assistant_failure_is_said_in_words_and_the_question_stays(web: Watched, site: Api) -> None:
    web.allow(502)
    await web.sign_in(new_user())
    await web.send("This will fail #fail")
    await expect(web.page.get_by_role("alert")).to_have_text(
        re.compile("The assistant could not answer. Your message is saved: try again.")
    )
    articles = await web.stored(1)
    await expect(articles.first).to_contain_text("This will fail #fail")
    nav = web.page.get_by_role("navigation", name="Conversations")  # the new conversation is listed
    await expect(nav.get_by_role("link", name="This will fail #fail")).to_be_visible()


async def test_a_missing_conversation_is_said_in_words(web: Watched, site: Api) -> None:
    web.allow(404)
    await web.sign_in(new_user(), f"&c={uuid.uuid4()}")
    await expect(web.page.get_by_role("alert")).to_contain_text("That conversation does not exist any more")
    await expect(web.page.get_by_role("heading", name="New chat")).to_be_visible()


async def test_markdown_is_rendered_code_is_highlighted_and_both_copy(web: Watched, site: Api) -> None:
    user = new_user()
    code = 'def greet(name):\n    return f"hello {name}"'
    text = f"Some **bold** and a list:\n\n- one\n- two\n\n```python\n{code}\n```"
    conversation = await conversation_with(site, user, [text])
    await web.sign_in(user, f"&c={conversation['id']}")
    article = (await web.stored(1)).first
    await expect(article.locator("strong")).to_have_text("bold")
    await expect(article.locator("li")).to_have_count(2)
    await expect(article.locator("pre code.hljs span.hljs-keyword").first).to_have_text("def")

    page = web.page
    await article.get_by_role("button", name="Copy code").click()
    assert await page.evaluate("navigator.clipboard.readText()") == code
    await article.get_by_role("button", name="Copy", exact=True).click()
    assert await page.evaluate("navigator.clipboard.readText()") == text


# ---- long conversations and search --------------------------------------------------------------


@pytest.fixture(scope="module")
async def long_chat(site: Api) -> tuple[str, dict[str, Any]]:
    """A user with one conversation of 130 messages; message 7 holds a unique word."""
    user = new_user()
    contents = [f"message number {i}" + (" platypus" if i == 7 else "") for i in range(1, 131)]
    conversation = await conversation_with(site, user, contents, title="A long one")
    return user, conversation


async def test_a_long_conversation_shows_its_newest_page_first_and_older_ones_on_scrolling_up(
    web: Watched, long_chat: tuple[str, dict[str, Any]]
) -> None:
    user, conversation = long_chat
    await web.sign_in(user, f"&c={conversation['id']}")
    articles = await web.stored(50)
    await expect(articles.last).to_contain_text("message number 130")
    await expect(articles.first).to_contain_text("message number 81")
    assert len(web.api_calls("/v1/conversations/")) == 2  # the conversation and one page of messages

    log = web.page.get_by_role("log", name="Messages")
    await log.evaluate("el => { el.scrollTop = 0 }")
    await expect(log.locator(STORED)).to_have_count(100)
    await log.evaluate("el => { el.scrollTop = 0 }")
    await expect(log.locator(STORED)).to_have_count(130)
    await expect(log.locator(STORED).first).to_contain_text("message number 1")
    seqs = [int(s) for s in await log.locator(STORED).evaluate_all("els => els.map(e => e.dataset.seq)")]
    assert seqs == list(range(1, 131))
    await expect(web.page.get_by_role("button", name="Load older messages")).to_be_hidden()


async def test_search_finds_a_message_and_opens_its_conversation_at_it(
    web: Watched, site: Api, long_chat: tuple[str, dict[str, Any]]
) -> None:
    user, _ = long_chat
    await web.sign_in(user)
    page = web.page
    await page.get_by_role("searchbox", name="Search messages").fill("platypus")
    results = page.get_by_role("region", name="Search results")
    hit = results.get_by_role("button").filter(has_text="A long one")
    await expect(hit).to_have_count(1)
    await expect(hit.locator("mark")).to_have_text("platypus")
    await hit.click()
    found = page.locator('article[data-seq="7"]')
    await expect(found).to_be_in_viewport()
    await expect(found).to_be_focused()
    await expect(found).to_contain_text("message number 7 platypus")
    await expect(page.get_by_role("heading", name="A long one")).to_be_visible()
    await expect(results).to_be_hidden()


# ---- rename, delete, export ---------------------------------------------------------------------


async def test_rename_export_and_delete_a_conversation(web: Watched, site: Api) -> None:
    user = new_user()
    kept = await conversation_with(site, user, ["stays"], title="Keep me")
    conversation = await conversation_with(site, user, ["first words", "assistant:an **answer**"], title="Old name")
    web.allow(404)  # the page's own reads after the deletion may race it
    await web.sign_in(user, f"&c={conversation['id']}")
    await web.stored(2)
    page = web.page
    nav = page.get_by_role("navigation", name="Conversations")

    await page.get_by_role("button", name="Rename").click()
    await page.get_by_role("textbox", name="Title").fill("New name")
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("heading", name="New name")).to_be_visible()
    await expect(nav.get_by_role("link", name="New name")).to_be_visible()
    r = await site.client.get(f"/v1/conversations/{conversation['id']}", headers=auth(user))
    assert r.json()["title"] == "New name"

    async with page.expect_download() as markdown_download:
        await page.get_by_role("button", name="Export").click()
        await page.get_by_role("button", name="Markdown").click()
    markdown = Path(await (await markdown_download.value).path()).read_text()
    assert markdown.startswith("# New name\n")
    assert "first words" in markdown and "an **answer**" in markdown
    assert markdown.index("first words") < markdown.index("an **answer**")

    async with page.expect_download() as json_download:
        await page.get_by_role("button", name="Export").click()
        await page.get_by_role("button", name="JSON").click()
    exported = json.loads(Path(await (await json_download.value).path()).read_text())
    assert exported["conversation"]["id"] == conversation["id"]
    assert [m["content"] for m in exported["messages"]] == ["first words", "an **answer**"]

    await page.get_by_role("button", name="Delete").click()
    confirm = page.get_by_role("dialog", name="Delete conversation?")
    await expect(confirm).to_be_visible()
    await confirm.get_by_role("button", name="Cancel").click()
    await expect(nav.get_by_role("link", name="New name")).to_be_visible()
    await page.get_by_role("button", name="Delete").click()
    await confirm.get_by_role("button", name="Delete").click()
    await expect(nav.get_by_role("link", name="New name")).to_have_count(0)
    await expect(nav.get_by_role("link", name="Keep me")).to_be_visible()
    await expect(page.get_by_role("heading", name="New chat")).to_be_visible()
    r = await site.client.get(f"/v1/conversations/{conversation['id']}", headers=auth(user))
    assert r.status_code == 404
    r = await site.client.get(f"/v1/conversations/{kept['id']}", headers=auth(user))
    assert r.status_code == 200


# ---- layout and keyboard ------------------------------------------------------------------------


async def test_the_narrow_layout_keeps_the_list_in_a_drawer(web: Watched, site: Api) -> None:
    user = new_user()
    await conversation_with(site, user, ["a narrow question", "assistant:a narrow answer"], title="Narrow")
    page = web.page
    await page.set_viewport_size({"width": 360, "height": 740})
    await web.sign_in(user)
    nav = page.get_by_role("navigation", name="Conversations")
    menu = page.get_by_role("button", name="Menu")
    await expect(menu).to_have_attribute("aria-expanded", "false")
    await expect(nav.get_by_role("link", name="Narrow")).not_to_be_in_viewport()
    await menu.click()
    await expect(menu).to_have_attribute("aria-expanded", "true")
    await expect(nav.get_by_role("link", name="Narrow")).to_be_in_viewport()
    await nav.get_by_role("link", name="Narrow").click()
    await web.stored(2)
    await expect(menu).to_have_attribute("aria-expanded", "false")
    await expect(nav.get_by_role("link", name="Narrow")).not_to_be_in_viewport()
    await expect(page.get_by_role("textbox", name="Message")).to_be_in_viewport()
    await expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page is {width} px wide at 360"


async def test_everything_works_from_the_keyboard(web: Watched, site: Api) -> None:
    user = new_user()
    await conversation_with(site, user, ["an older chat about lighthouses"], title="Lighthouses")
    await web.sign_in(user)
    page, keyboard = web.page, web.page.keyboard

    await keyboard.press("?")
    shortcuts = page.get_by_role("dialog", name="Keyboard shortcuts")
    await expect(shortcuts).to_be_visible()
    await keyboard.press("Escape")
    await expect(shortcuts).to_be_hidden()

    await keyboard.press("Alt+N")
    await expect(page.get_by_role("textbox", name="Message")).to_be_focused()
    await keyboard.type("Typed without a mouse")
    await keyboard.press("Shift+Enter")
    await keyboard.type("on two lines")
    await keyboard.press("Enter")
    articles = await web.stored(2)
    await expect(articles.first).to_contain_text("Typed without a mouse")
    await expect(page.get_by_role("heading", name="Typed without a mouse")).to_be_visible()

    await tab_to(page, "Rename")
    await keyboard.press("Enter")
    await expect(page.get_by_role("textbox", name="Title")).to_be_focused()
    await keyboard.type("Renamed by keys")
    await keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Renamed by keys")).to_be_visible()

    await page.locator("body").focus()
    await keyboard.press("/")
    await expect(page.get_by_role("searchbox", name="Search messages")).to_be_focused()
    await keyboard.type("lighthouses")
    hit = page.get_by_role("region", name="Search results").get_by_role("button").filter(has_text="Lighthouses")
    await expect(hit).to_have_count(1)
    await tab_to(page, hit)
    await keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Lighthouses")).to_be_visible()

    await keyboard.press("Alt+ArrowUp")
    await expect(page.get_by_role("heading", name="Renamed by keys")).to_be_visible()


async def tab_to(page: Page, target: Any, presses: int = 40) -> None:
    """Press Tab until `target` (a button's name, or a locator) has the focus."""
    locator = page.get_by_role("button", name=target, exact=True) if isinstance(target, str) else target
    for _ in range(presses):
        await page.keyboard.press("Tab")
        if await locator.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"Tab never reached {target}")


# ---- hostile content ----------------------------------------------------------------------------

HOSTILE_TITLE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_MESSAGES = [
    "<script>window.__pwned=2</script>zebra one",
    '<img src=x onerror="window.__pwned=3"> zebra two',
    "[click me](javascript:window.__pwned=4) zebra three",
    "![tracker](http://127.0.0.2:9/pixel.png) zebra four",
    '<a href="javascript:window.__pwned=5">raw link</a> <iframe src="http://127.0.0.2:9/"></iframe> zebra five',
    '<svg onload="window.__pwned=6"></svg><style>body{display:none}</style> zebra six',
]


async def test_hostile_content_never_runs_and_nothing_loads_from_another_host(web: Watched, site: Api) -> None:
    user = new_user()
    conversation = await conversation_with(site, user, HOSTILE_MESSAGES, title=HOSTILE_TITLE)
    await web.sign_in(user, f"&c={conversation['id']}")
    page = web.page
    articles = await web.stored(len(HOSTILE_MESSAGES))
    nav = page.get_by_role("navigation", name="Conversations")
    await expect(nav.get_by_role("link", name=HOSTILE_TITLE)).to_be_visible()  # the title, as text
    await expect(page.get_by_role("heading", name=HOSTILE_TITLE)).to_be_visible()

    log = page.get_by_role("log", name="Messages")
    for selector in ("img", "script", "iframe", "svg", "style", "[onerror]", "[onload]", 'a[href^="javascript:"]'):
        assert await log.locator(selector).count() == 0, selector
    await expect(articles.nth(0)).to_contain_text("<script>window.__pwned=2</script>zebra one")  # shown as text
    await expect(articles.nth(1)).to_contain_text('<img src=x onerror="window.__pwned=3"> zebra two')
    await expect(articles.nth(2)).to_contain_text("click me")
    await articles.nth(2).get_by_text("click me").click()
    await expect(articles.nth(3).get_by_role("link", name="Image: tracker")).to_have_attribute(
        "href", "http://127.0.0.2:9/pixel.png"
    )
    await articles.nth(4).get_by_text("raw link").click()

    await page.get_by_role("searchbox", name="Search messages").fill("zebra")
    hits = page.get_by_role("region", name="Search results").get_by_role("button")
    await expect(hits).to_have_count(len(HOSTILE_MESSAGES))
    await expect(hits.first).to_contain_text(HOSTILE_TITLE)
    assert await page.get_by_role("region", name="Search results").locator("img, script, svg").count() == 0

    await page.wait_for_timeout(300)
    assert await page.evaluate("window.__pwned") is None
    assert await page.evaluate("document.body.style.display") == ""
    csp = (await site.client.get("/")).headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp


# ---- what is served -----------------------------------------------------------------------------


async def test_the_page_and_its_assets_are_served_gzipped_from_this_origin_only(site: Api) -> None:
    page = await site.client.get("/", headers={"Accept-Encoding": "gzip"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-encoding"] == "gzip"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    html = page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/assets/") or a.startswith("#") for a in assets), assets
    assert not re.search(r"<script(?![^>]*\ssrc=)", html)  # no inline script
    assert not re.search(r"\son[a-z]+=", html)  # nor inline handlers
    for asset in [a for a in assets if a.startswith("/assets/")]:
        r = await site.client.get(asset, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200, asset
        assert r.headers["content-encoding"] == "gzip"
        again = await site.client.get(asset, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
    missing = await site.client.get("/assets/../pyproject.toml")
    assert missing.status_code == 404
    assert (await site.client.get("/assets/nope.js")).status_code == 404


def test_the_page_is_in_the_wheel(tmp_path: Path, project_root: Path) -> None:
    """`pip install .` ships the page: build the wheel and look inside."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*command, str(project_root)], check=True, capture_output=True)
    import zipfile

    (wheel,) = tmp_path.glob("chatlog-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("service/page/index.html", "service/page/assets/app.js", "service/page/assets/vendor/purify.es.mjs"):
        assert name in names, name
