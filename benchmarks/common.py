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
    """CPU seconds (user + system) that process `pid` and its descendants alive now have spent so
    far, from /proc (an ASGI server may serve from a forked worker); None where there is none."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, CPU seconds)
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    if pid not in stats:
        return None
    total, tree = 0.0, {pid}
    for p in sorted(stats):  # a child's pid is usually larger than its parent's; check again below
        if stats[p][0] in tree:
            tree.add(p)
    while grown := {p for p, (parent, _) in stats.items() if parent in tree} - tree:
        tree |= grown
    for p in tree:
        total += stats[p][1]
    return total
