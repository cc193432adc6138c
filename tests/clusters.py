"""PostgreSQL clusters that a test makes, starts, stops and throws away, with the server's own
binaries (Debian's under /usr/lib/postgresql/<major>/bin, or CHATLOG_TEST_PG_BIN). Tests run as
root on CI; PostgreSQL refuses to, so the server then runs as the `postgres` user."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest


def pg_bin() -> Path | None:
    configured = os.environ.get("CHATLOG_TEST_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def require_pg_bin() -> Path:
    """The binaries' folder, or skip the test with the reason."""
    found = pg_bin()
    if found is None or not (found / "pg_ctl").exists():
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql, or set CHATLOG_TEST_PG_BIN)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster in `base`, on a free port of 127.0.0.1, trust authentication."""

    def __init__(self, bin_dir: Path, *, port: int | None = None) -> None:
        # Its own folder under the system's temporary one: the `postgres` user cannot enter
        # pytest's (root's, mode 700).
        self.base, self.bin = Path(tempfile.mkdtemp(prefix="chatlog-cluster-")), bin_dir
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = port or _free_port()
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(self.base, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*(["runuser", "-u", "postgres", "--"] if self.root else []), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd="/")
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def init(self, *extra: str) -> Cluster:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", *extra)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.base}'\n"
                "fsync = off\nmax_connections = 100\nshared_buffers = 32MB\n"
            )
        return self

    def start(self, *, wait: bool = True) -> None:
        args = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "start"]
        self._run(*args, *(["-w", "-t", "60"] if wait else ["-W"]))

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready = self._run(str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"the cluster on port {self.port} did not become ready: {self.log.read_text()[-2000:]}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = self._run(
            str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
            "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        )  # fmt: skip
        return out.stdout.strip()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def standby_of(primary: Cluster) -> Cluster:
    """A physical standby of `primary` (pg_basebackup -R: streaming from it), not started yet."""
    standby = Cluster(primary.bin)
    standby._run(
        str(primary.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
        "-D", str(standby.data), "-R", "-X", "stream", "--checkpoint=fast",
    )  # fmt: skip
    with (standby.data / "postgresql.conf").open("a") as conf:  # the copy has the primary's settings
        conf.write(f"\nport = {standby.port}\nunix_socket_directories = '{standby.base}'\n")
        # Once promoted it has no standby of its own: it must not wait for one at every commit.
        conf.write("synchronous_standby_names = ''\n")
    return standby


def chatlog_env(url: str, data: Path, **settings: str) -> dict[str, str]:
    """The environment of a `chatlog serve` on `url` for a drill (the tests' JWT secret, quick polls)."""
    from tests.keys import MASTER_KEY
    from tests.support import SECRET

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLOG_")}
    env.update(
        CHATLOG_DATABASE_URL=url,
        CHATLOG_DATA_DIR=str(data),
        CHATLOG_JWT_SECRET=SECRET,
        CHATLOG_MASTER_KEY=MASTER_KEY,
        CHATLOG_PROJECTION_POLL_INTERVAL="0.05",
        CHATLOG_READ_WAIT_SECONDS="10",
        CHATLOG_LOG_LEVEL="WARNING",
        **settings,
    )
    return env


class Answer(NamedTuple):
    at: float  # time.monotonic() when it came
    status: int
    content_type: str
    body: dict[str, Any]


class Appends:
    """Appenders posting messages to conversations of `user` until stopped, one per conversation,
    each answer recorded (a failed one is followed by a short pause)."""

    def __init__(self, api: Any, user: str, conversations: list[str], label: str) -> None:
        self.api, self.user, self.label = api, user, label
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._append(k, cid)) for k, cid in enumerate(conversations)]

    async def _append(self, k: int, cid: str) -> None:
        from tests.support import auth

        i = 0
        while not self._stop.is_set():
            r = await self.api.client.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": "user", "content": f"{self.label} {k}-{i}"},
                headers=auth(self.user),
            )
            self.answers.append(Answer(time.monotonic(), r.status_code, r.headers.get("content-type", ""), r.json()))
            i += 1
            if r.status_code != 201:
                await asyncio.sleep(0.05)

    async def answered_after(self, moment: float, within: float, what: str) -> None:
        """Wait until an append is answered 201 after `moment`; fail after `within` seconds."""
        while not any(a.at > moment and a.status == 201 for a in self.answers[-20:]):
            assert time.monotonic() - moment < within, f"{what}: appends not answered again within {within} s"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def acknowledged(self) -> list[dict[str, Any]]:
        return [a.body for a in self.answers if a.status == 201]

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 201]


async def pages(api: Any, user: str, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged list, walking its cursors."""
    from tests.support import auth

    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = await api.client.get(path, params=query, headers=auth(user))
        assert r.status_code == 200, r.text
        items += r.json()["data"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items
