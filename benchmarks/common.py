"""What the benchmarks share: the server they run on, and its URL in the form asyncpg takes."""

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
