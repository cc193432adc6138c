"""The chat page's weight and its time to the first message, in a real headless Chromium.

    python benchmarks/page.py [--messages 1000] [--rounds 5]

Starts `chatlog serve` (on CHATLOG_DATABASE_URL when set, else an embedded PostgreSQL in a
temporary directory; in a fresh database `chatlog_bench_page`), writes one conversation of N
messages (default 1,000) through the API, then opens the page straight at that conversation
(`/#token=...&c=ID`) in a new, cold browser context per round and prints:

- the bytes transferred for the page and all its assets (gzipped as sent, headers included),
  against the target of at most 200 KB;
- the time from navigation to the first message shown, median and worst of the rounds;
- how many API requests that took, against the target of at most 3.

Needs Debian's chromium (or CHATLOG_TEST_CHROMIUM) and the [test] extra (Playwright).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder (which holds http.py) would shadow the standard library's `http`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import asyncpg
import httpx
import jwt
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import libpq, server_url

DB = "chatlog_bench_page"
SECRET = "benchmark-secret-" + "x" * 48
CHROMIUM = os.environ.get("CHATLOG_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FIRST_MESSAGE = 'article[data-message-id]:not([data-message-id=""])'
TARGET_BYTES, TARGET_REQUESTS = 200 * 1024, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fresh_database(url: str) -> str:
    admin = await asyncpg.connect(libpq(url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DB}"')
    finally:
        await admin.close()
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=DB).render_as_string(hide_password=False)


def serve(db_url: str, port: int, data_dir: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(CHATLOG_DATABASE_URL=db_url, CHATLOG_JWT_SECRET=SECRET, CHATLOG_DATA_DIR=data_dir)
    env["CHATLOG_LOG_LEVEL"] = "WARNING"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("chatlog serve did not start")


async def write_conversation(base: str, token: str, messages: int) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        conversation = (await client.post("/v1/conversations", json={"title": "A thousand messages"})).json()
        cid = conversation["id"]
        position = 0
        for i in range(1, messages + 1):
            role = "user" if i % 2 else "assistant"
            body = {"role": role, "content": f"Message {i}: some **Markdown** and `code`, a line long."}
            r = await client.post(f"/v1/conversations/{cid}/messages", json=body)
            r.raise_for_status()
            position = r.json()["position"]
        (await client.get(f"/v1/conversations/{cid}", params={"min_position": position})).raise_for_status()
    return str(cid)


async def one_round(browser: object, url: str) -> tuple[float, int, int]:
    """(ms to the first message, bytes transferred, API requests) for one cold load."""
    context = await browser.new_context()  # type: ignore[attr-defined]
    page = await context.new_page()
    requests: list[object] = []
    page.on("requestfinished", lambda request: requests.append(request))
    await page.goto(url)
    await page.wait_for_selector(FIRST_MESSAGE)
    shown_ms = await page.evaluate("performance.now()")
    await page.wait_for_load_state("networkidle")
    transferred = api = 0
    for request in requests:
        sizes = await request.sizes()  # type: ignore[attr-defined]
        transferred += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        api += "/v1/" in request.url  # type: ignore[attr-defined]
    await context.close()
    return float(shown_ms), transferred, api


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    db_url = await fresh_database(server_url())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve(db_url, port, tempfile.mkdtemp(prefix="chatlog-bench-page-"))
    try:
        token = jwt.encode({"sub": "bench-page", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        started = time.perf_counter()
        cid = await write_conversation(base, token, args.messages)
        print(f"wrote {args.messages:,} messages in {time.perf_counter() - started:.1f} s")
        url = f"{base}/#token={token}&c={cid}"
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            await one_round(browser, url)  # warm the server and the disk cache
            rounds = [await one_round(browser, url) for _ in range(args.rounds)]
            await browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    times = sorted(r[0] for r in rounds)
    transferred = max(r[1] for r in rounds)
    api = max(r[2] for r in rounds)
    print(f"page: {args.messages:,}-message conversation, {args.rounds} cold loads in headless Chromium")
    target_kb = TARGET_BYTES / 1024
    print(f"  transferred (gzipped, all assets):  {transferred / 1024:8.1f} KB   target <= {target_kb:.0f} KB")
    print(f"  navigation to first message shown:  {statistics.median(times):8.1f} ms median, {times[-1]:.1f} ms worst")
    print(f"  API requests until then:            {api:8d}      target <= {TARGET_REQUESTS}")
    met = transferred <= TARGET_BYTES and api <= TARGET_REQUESTS
    print("  targets:", "met" if met else "NOT met")


if __name__ == "__main__":
    asyncio.run(main())
