"""Shared pieces of the HTTP tests: a `chatlog serve` subprocess on its own database, and helpers."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import Databases
from tests.keys import MASTER_KEY

SECRET = "contract-suite-secret-" + "0123456789abcdef" * 4  # long enough for HS512 too
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def token(user: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def chatlog(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The `chatlog` command with `args`, in `env`, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


class Api:
    def __init__(self, base_url: str, db_url: str) -> None:
        self.base_url = base_url
        self.db_url = db_url
        self.client = httpx.AsyncClient(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=100))
        self.log: Path | None = None  # the server's output, where it is a subprocess of the tests

    async def create(self, user: str, **body: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/conversations", json=body, headers=auth(user))
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def say(self, user: str, cid: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
        r = await self.client.post(
            f"/v1/conversations/{cid}/messages", json={"role": "user", "content": content, **extra}, headers=auth(user)
        )
        assert r.status_code == 201, r.text
        return dict(r.json())


def fake_model(base_url: str) -> dict[str, str]:
    """Settings that make `chatlog serve` ask the fake OpenAI-compatible server at `base_url`."""
    return {"CHATLOG_ASSISTANT": "openai", "CHATLOG_OPENAI_BASE_URL": base_url, "CHATLOG_OPENAI_MODEL": "fake-model"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_api(
    databases: Databases, tmp_path_factory: pytest.TempPathFactory, **settings: str
) -> AsyncIterator[Api]:
    """`chatlog serve` on a fresh database, for one test module; `settings` are more CHATLOG_* variables."""
    db_url = await databases.fresh()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(
        {
            "CHATLOG_DATABASE_URL": db_url,
            "CHATLOG_DATA_DIR": str(tmp_path_factory.mktemp("api-data")),
            "CHATLOG_JWT_SECRET": SECRET,
            "CHATLOG_MASTER_KEY": MASTER_KEY,
            "CHATLOG_PROJECTION_POLL_INTERVAL": "0.05",
            "CHATLOG_READ_WAIT_SECONDS": "1",
            "CHATLOG_LOG_LEVEL": "WARNING",
            **settings,
        }
    )
    served = serve(env, port, tmp_path_factory.mktemp("api-log") / "serve.log")
    client = Api(served.base_url, db_url)
    client.log = served.log
    yield client
    await client.client.aclose()
    out = served.stop()
    assert "Traceback" not in out, out


class Served:
    """A running `chatlog serve`. Its output goes to a file: a pipe that nobody reads until the
    end could fill up and block the server mid-test."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.log = proc, log
        self.base_url = f"http://127.0.0.1:{port}"

    def stop(self) -> str:
        """Stop it with SIGTERM; its whole output."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        return self.log.read_text(errors="replace")


def serve(env: dict[str, str], port: int, log: Path, cwd: Path | None = None) -> Served:
    """Start `chatlog serve` (the code in `cwd`, default this checkout) and wait (60 s at most)
    until it answers /healthz."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=out,
            cwd=cwd,
        )
    served = Served(proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"chatlog serve exited: {log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{served.base_url}/healthz", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    raise AssertionError("chatlog serve did not answer /healthz within 60 s")


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["code"] == code
    assert isinstance(body["type"], str) and isinstance(body["title"], str) and isinstance(body["detail"], str)
    assert "Traceback" not in r.text and "SELECT" not in r.text and "asyncpg" not in r.text
    if status == 422:  # every 422 lists what is wrong, as the contract's example does
        assert isinstance(body.get("errors"), list) and body["errors"], body
        assert all(isinstance(e.get("message"), str) and e["message"] for e in body["errors"]), body
    return dict(body)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"
