"""One typed settings object, read from the environment once and passed in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import parse_qsl, urlencode

import msgspec


class SettingsError(ValueError):
    """A setting in the environment cannot be used."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    # A physical standby of the database for the read routes (README, "Read replicas"); unset:
    # every read on database_url.
    read_database_url: str | None = None
    data_dir: Path = Path(".chatlog")
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    cursor_secret: str | None = None  # signs list cursors; default: derived from the JWT secret
    # Wraps every conversation's data key (service/sealing.py); default: generated into data_dir.
    # Older keys may follow the current one, comma-separated, while `chatlog keys rotate` runs.
    master_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    db_pool_size: int = 20
    group_commit: bool = True  # appends that arrive together share a transaction (DESIGN.md)
    log_level: str = "INFO"
    run_workers: bool = True  # `chatlog serve` runs the projection workers in-process
    projection_batch_size: int = 1000
    projection_poll_interval: float = 1.0
    projection_linger: float = 0.005
    horizon_warn_seconds: float = 30.0  # the worker warns about a transaction holding the horizon this long
    replay_batch_size: int = 5000
    # Each projection runs as this many slices by a hash of user_id (projections/slices.py), which
    # worker processes share and take over from each other. Every process needs the same value.
    projection_slices: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # HTTP limits (shared/API.md)
    max_body_bytes: int = 1_048_576
    max_content_chars: int = 32_768
    max_title_chars: int = 200
    read_wait_seconds: float = 5.0  # how long a read with min_position waits
    # Search (messages projection): the PostgreSQL text-search configuration of the index and
    # of queries. Changing it needs `chatlog replay` to rebuild the stored vectors.
    search_config: str = "simple"
    # Chat (POST /v1/chat)
    assistant: Literal["echo", "openai"] = "echo"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_connect_timeout: float = 5.0
    openai_read_timeout: float = 60.0
    # 0: the prompt is the conversation's full history (the contract). Otherwise it keeps the
    # system messages and the newest others within both caps (for a model's context window).
    chat_history_messages: Annotated[int, msgspec.Meta(ge=0)] = 0
    chat_history_chars: Annotated[int, msgspec.Meta(ge=0)] = 0
    chat_concurrency: int = 16  # chat turns in flight per process (each holds a connection for its lock)
    # MCP: each tool result is cut to this many characters of JSON
    mcp_result_chars: int = 20_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            raw = env.get(f"CHATLOG_{field.name.upper()}")
            if raw is not None and raw != "":
                values[field.name] = raw
        for name in ("database_url", "read_database_url"):
            if name in values:
                values[name] = database_url(str(values[name]), f"CHATLOG_{name.upper()}")
        try:
            return msgspec.convert(values, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"invalid CHATLOG_* setting: {exc}") from exc

    def with_overrides(self, **changes: object) -> Settings:
        return msgspec.structs.replace(self, **changes)


# Query parameters of a URL that reach asyncpg.connect intact (SQLAlchemy passes each one on as a
# keyword, as a string; it makes `port` and `prepared_statement_cache_size` integers).
_ASYNCPG_PARAMETERS: Final = frozenset({"host", "port", "ssl", "target_session_attrs", "prepared_statement_cache_size"})


def database_url(url: str, setting: str = "CHATLOG_DATABASE_URL") -> str:
    """`url` in the form chatlog connects with: a libpq-style `postgresql://` (or `postgres://`)
    URL gets the asyncpg driver and libpq's `sslmode` becomes asyncpg's `ssl` (same values);
    another driver, or a query parameter asyncpg does not take, is an error here rather than a
    failed import or connect later. `setting` names the variable in the errors."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SettingsError(f"{setting} must be a URL such as postgresql://user:password@host:5432/db")
    if scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise SettingsError(f"{setting}: chatlog connects with asyncpg; use postgresql://, not {scheme}://")
    address, _, query = rest.partition("?")
    address, hosts = _hosts_out_of(address)
    parameters = list(hosts)
    for name, value in parse_qsl(query, keep_blank_values=True):
        name = "ssl" if name == "sslmode" else name
        if name not in _ASYNCPG_PARAMETERS:
            raise SettingsError(
                f"{setting}: the parameter {name!r} is not supported; "
                f"use one of sslmode, {', '.join(sorted(_ASYNCPG_PARAMETERS))}"
            )
        parameters.append((name, value))
    return f"postgresql+asyncpg://{address}" + (f"?{urlencode(parameters)}" if parameters else "")


def _hosts_out_of(address: str) -> tuple[str, list[tuple[str, str]]]:
    """libpq's several hosts in the authority (`user@a:5432,b:5433/db`, for failover) as the
    `host=a,b&port=5432,5433` parameters that asyncpg's URL reader takes."""
    userinfo, at, rest = address.rpartition("@")
    hostlist, slash, path = rest.partition("/")
    if "," not in hostlist:
        return address, []
    hosts, ports = [], []
    for item in hostlist.split(","):
        host, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        hosts.append(host if colon else item)
        ports.append(port if colon else "5432")
    return f"{userinfo}{at}{slash}{path}", [("host", ",".join(hosts)), ("port", ",".join(ports))]


def _decode_path(type_: type, value: object) -> object:
    if type_ is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError
