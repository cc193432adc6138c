"""What the benchmarks share: the server they run on, its URL in the form asyncpg takes, and CPU
accounting (where a figure's CPU went: this process, another one, the rest of the machine)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from service.database import embedded_url
from service.settings import database_url


def server_url() -> str:
    """`CHATLOG_DATABASE_URL` as chatlog reads it, else a new embedded PostgreSQL in a temporary directory."""
    configured = os.environ.get("CHATLOG_DATABASE_URL")
    if configured:
        return database_url(configured)
    return embedded_url(Path(tempfile.mkdtemp(prefix="chatlog-bench-")))


def libpq(url: str, database: str | None = None) -> str:
    """The SQLAlchemy URL `url` (on `database`, if given) as a libpq/asyncpg DSN."""
    u = make_url(url).set(drivername="postgresql")
    return (u.set(database=database) if database else u).render_as_string(hide_password=False)


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O) since boot, from
    /proc/stat; None where there is none. On a machine that runs only the benchmark and its
    database server, the busy time of a measurement less the benchmark's own is the server's."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has spent so far, from /proc; None where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
