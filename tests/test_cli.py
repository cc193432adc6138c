"""`chatlog` on a machine with no database installed: the embedded server, tokens, help."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from tests.keys import MASTER_KEY
from tests.support import serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env["CHATLOG_DATA_DIR"] = str(data_dir)
    env["CHATLOG_MASTER_KEY"] = MASTER_KEY
    return env


def chatlog(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_serve_on_an_empty_data_dir_runs_embedded_postgres_and_reuses_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(data_dir)
    port = free_port()

    served = serve(env, port, tmp_path / "first.log")
    try:
        ready = httpx.get(f"{served.base_url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["schema_revision"] == ready.json()["expected_revision"]
        pid_file = data_dir / "postgres" / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
    finally:
        out = served.stop()
    assert served.proc.returncode == 0, out
    assert "Running upgrade" in out
    # The embedded server stopped with the process that started it.
    deadline = time.monotonic() + 10
    while _alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(postmaster)

    served = serve(env, port, tmp_path / "second.log")
    try:
        assert httpx.get(f"{served.base_url}/readyz", timeout=5).status_code == 200
    finally:
        out = served.stop()
    assert "Running upgrade" not in out, "the second start should find the schema already migrated"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_token_uses_a_secret_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data")
    first = chatlog(env, "token", "alice", "--ttl", "120")
    second = chatlog(env, "token", "bob")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    secret = (tmp_path / "data" / "jwt_secret").read_text().strip()
    assert len(secret) >= 32
    assert (tmp_path / "data" / "jwt_secret").stat().st_mode & 0o077 == 0
    claims = jwt.decode(first.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
    assert jwt.decode(second.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "bob"


def test_token_prefers_the_configured_secret(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data") | {"CHATLOG_JWT_SECRET": "configured-secret-of-enough-length-123"}
    out = chatlog(env, "token", "carol")
    assert (
        jwt.decode(out.stdout.strip(), "configured-secret-of-enough-length-123", algorithms=["HS256"])["sub"] == "carol"
    )
    assert not (tmp_path / "data" / "jwt_secret").exists()


@pytest.mark.parametrize("args", [("token", ""), ("token", "x" * 256), ("token", "alice", "--ttl", "0")])
def test_token_refuses_bad_arguments(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = chatlog(clean_env(tmp_path / "data"), *args)
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.parametrize("command", ["serve", "migrate", "token"])
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    result = chatlog(clean_env(tmp_path / "data"), command, "--help")
    assert result.returncode == 0 and "usage: chatlog" in result.stdout


def test_a_bad_setting_is_reported_not_a_traceback(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data") | {"CHATLOG_PORT": "eighty"}
    result = chatlog(env, "token", "alice")
    assert result.returncode == 2 and "CHATLOG" in result.stderr and "Traceback" not in result.stderr


def test_a_libpq_database_url_is_used_with_asyncpg(tmp_path: Path, db_url: str) -> None:
    """Users copy `postgresql://...` from their provider; chatlog connects with it as it is."""
    libpq = db_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    libpq += ("&" if "?" in libpq else "?") + "sslmode=disable"  # libpq's name; asyncpg calls it ssl
    env = clean_env(tmp_path / "data") | {"CHATLOG_DATABASE_URL": libpq}
    result = chatlog(env, "migrate")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@localhost/db",
        "postgresql+psycopg://u@h/db",
        "localhost:5432",
        "postgresql://u@h/db?channel_binding=require",  # libpq-only: asyncpg.connect would refuse it
    ],
)
def test_a_database_url_chatlog_cannot_use_is_reported(tmp_path: Path, url: str) -> None:
    env = clean_env(tmp_path / "data") | {"CHATLOG_DATABASE_URL": url}
    result = chatlog(env, "migrate")
    assert result.returncode == 2 and "CHATLOG_DATABASE_URL" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("serve", "klingon"),
        ("migrate", "klingon"),
        ("project", "klingon"),
        ("replay", "a.b.c.d"),
        ("verify", "db.schema.cfg"),
    ],
)
def test_an_unknown_search_configuration_stops_the_command_at_once(
    tmp_path: Path, db_url: str, command: str, config: str
) -> None:
    """Not at the first message (the projection would stop) nor at every search."""
    env = clean_env(tmp_path / "data") | {"CHATLOG_DATABASE_URL": db_url, "CHATLOG_SEARCH_CONFIG": config}
    result = chatlog(env, command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CHATLOG_SEARCH_CONFIG" in result.stderr and "Traceback" not in result.stderr


def test_serve_checks_the_search_configuration_before_it_migrates(tmp_path: Path, db_url: str, raw_dsn: str) -> None:
    env = clean_env(tmp_path / "data") | {"CHATLOG_DATABASE_URL": db_url}
    assert chatlog(env, "migrate", "--downgrade", "0003_message_search").returncode == 0
    result = chatlog(env | {"CHATLOG_SEARCH_CONFIG": "klingon"}, "serve")
    assert result.returncode == 2 and "klingon" in result.stderr

    async def revision() -> str:
        conn = await asyncpg.connect(raw_dsn)
        try:
            return str(await conn.fetchval("SELECT version_num FROM alembic_version"))
        finally:
            await conn.close()

    assert asyncio.run(revision()) == "0003_message_search", "no migration ran"
