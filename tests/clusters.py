"""PostgreSQL clusters that a test makes, starts, stops and throws away, with the server's own
binaries (Debian's under /usr/lib/postgresql/<major>/bin, or CHATLOG_TEST_PG_BIN). Tests run as
root on CI; PostgreSQL refuses to, so the server then runs as the `postgres` user."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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
