"""The `chatlog` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from service.settings import Settings, SettingsError

if TYPE_CHECKING:
    import asyncpg
    from litestar import Litestar

    from projections.base import Projection
    from projections.slices import Slice
    from service.sealing import Keyring

log = logging.getLogger("chatlog")


def resolve_database(settings: Settings) -> Settings:
    """Settings whose database_url is set: the configured server, or the embedded one."""
    if settings.database_url:
        return settings
    from service.database import embedded_url

    return settings.with_overrides(database_url=embedded_url(settings.data_dir))


async def _migrate(settings: Settings, revision: str, *, down: bool = False) -> None:
    """Migrate (the sealing migration needs the master key), then, at the newest schema, keep
    the log's ids rising and refuse a master key that does not open the database's data keys."""
    from service.database import downgrade, make_engine, migrate
    from service.sealing import Keyring

    url = settings.database_url
    assert url
    keyring = Keyring.from_settings(settings)
    if not down and revision == "head":
        await _check_master_keys(url, keyring)  # before sealing anything with a wrong one
    engine = make_engine(url, pool_size=1)
    try:
        await (downgrade(engine, revision, keyring=keyring) if down else migrate(engine, revision, keyring=keyring))
    finally:
        await engine.dispose()
    if not down and revision == "head":
        await _settle_clock(url)


async def _check_master_keys(url: str, keyring: Keyring) -> None:
    from service.sealing import check_master_keys

    conn = await _connected(url)
    try:
        if await conn.fetchval("SELECT to_regclass('data_keys') IS NOT NULL"):
            await check_master_keys(conn, keyring)
    finally:
        await conn.close()


async def _settle_clock(url: str) -> None:
    """Keep the log's ids rising if it was restored into (or moved to) another server."""
    from service import clock

    conn = await _connected(url)
    try:
        await clock.settle(conn)
    finally:
        await conn.close()


def _exit_on_signals() -> None:
    """SIGTERM and SIGINT end the process through SystemExit, so that exit handlers run.

    uvicorn shuts down gracefully, restores these handlers and re-raises the signal; with the
    default SIGTERM action the process would die there, and the embedded PostgreSQL (stopped by
    an exit handler) would be left running.
    """

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_now)


# The collector's thresholds while serving (generation 0 collected after this many new container
# objects, not CPython's 700). An append allocates a few hundred, and the projection's batches
# and group commit's outlive several young collections, so at 700 the older generations were
# collected often too. Three paired runs under the append load (a server with each setting, one
# after the other) put the collector's share at 16-35 us of the API process's 260-320 us of CPU
# per append. Memory held by unreachable cycles lingers a little longer.
SERVING_GC_THRESHOLDS: Final = (50_000, 10, 10)


def _tune_collector() -> None:
    """Keep what startup built (routes, the OpenAPI document, pools: hundreds of thousands of
    objects) out of the garbage collector's full passes, and collect the young generation less
    often (SERVING_GC_THRESHOLDS). Without the freeze each full pass walks them all, ~120 ms on
    the reference machine, every few seconds under load, stalling every request in flight (it was
    the append benchmark's p99)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


def serve_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    """`serve`'s settings with its options applied and the database resolved and migrated."""
    settings = settings.with_overrides(
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        run_workers=settings.run_workers and not args.no_workers,
    )
    _exit_on_signals()
    settings = resolve_database(settings)
    assert settings.database_url
    _check_search_config(settings)  # before migrating: it needs no tables, and a bad one changes nothing
    asyncio.run(_migrate(settings, "head"))
    _check_read_replica(settings)
    log.info("schema migrated; listening on http://%s:%d", settings.host, settings.port)
    return settings


def serving_app(settings: Settings) -> Litestar:
    """The app as `serve` runs it."""
    from service.app import create_app

    app = create_app(settings)
    app.on_startup.append(_tune_collector)
    return app


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate, then serve in one uvicorn worker (with httptools; on the reference machine it
    answered more requests/s than granian, see benchmarks/http.py)."""
    import uvicorn

    from service.corked import CorkedHttpToolsProtocol

    settings = serve_settings(settings, args)
    uvicorn.run(
        serving_app(settings),
        http=CorkedHttpToolsProtocol,  # an answer's headers and body in one write (service/corked.py)
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        # Nothing here reads the client's address (the access log names the request id), so
        # X-Forwarded-For need not be parsed on every request; and no `server: uvicorn` header.
        proxy_headers=False,
        server_header=False,
    )
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    settings = resolve_database(settings)
    assert settings.database_url
    _check_search_config(settings)  # migrations re-index messages in it (0005)
    if args.downgrade:
        asyncio.run(_migrate(settings, args.downgrade, down=True))
        print(f"downgraded to {args.downgrade}")
    else:
        asyncio.run(_migrate(settings, args.revision))
        print(f"migrated to {args.revision}")
    return 0


def _check_read_replica(settings: Settings) -> None:
    """A physical standby of one server is a replica; a Citus cluster's would need a standby of
    every node, which this setting does not describe: refused there (README, Citus's limits)."""
    if not settings.read_database_url:
        return

    async def distributed() -> bool:
        from service.citus import is_distributed

        assert settings.database_url
        conn = await _connected(settings.database_url)
        try:
            return await is_distributed(conn)
        finally:
            await conn.close()

    if asyncio.run(distributed()):
        raise SettingsError(
            "CHATLOG_READ_DATABASE_URL: the database is distributed by Citus, and a read replica of a Citus "
            "cluster needs a standby of every node; unset it"
        )


def _check_search_config(settings: Settings) -> None:
    from service.database import check_search_config

    assert settings.database_url
    asyncio.run(check_search_config(settings.database_url, settings.search_config))


def _projections(settings: Settings, names: list[str]) -> tuple[list[Projection], Settings, str]:
    """The named projections (all for none), and the settings with the database resolved."""
    from projections import select

    projections = select(settings, names)
    settings = resolve_database(settings)
    assert settings.database_url
    _check_search_config(settings)
    asyncio.run(_settle_clock(settings.database_url))
    asyncio.run(_check_master_keys(settings.database_url, _keyring(settings)))
    return projections, settings, settings.database_url


def _keyring(settings: Settings) -> Keyring:
    from service.sealing import Keyring

    return Keyring.from_settings(settings)


def cmd_project(settings: Settings, args: argparse.Namespace) -> int:
    from service.workers import make_workers, supervise

    _exit_on_signals()
    _, settings, _ = _projections(settings, args.names)

    async def run() -> int:
        workers = make_workers(settings, _keyring(settings), args.names)
        _tune_collector()

        def stop_all() -> None:
            for worker in workers:
                worker.stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_all)
        await asyncio.gather(*(supervise(w) for w in workers))  # a worker that dies is restarted
        return 1 if any(w.failure for w in workers) else 0

    return asyncio.run(run())


def _slice(settings: Settings, args: argparse.Namespace) -> Slice | None:
    """The slice `--slice K` names among CHATLOG_PROJECTION_SLICES (None: the whole projection)."""
    from projections.slices import Slice

    if args.slice is None:
        return None
    if not 0 <= args.slice < settings.projection_slices:
        raise SettingsError(f"--slice must be 0 to {settings.projection_slices - 1} (CHATLOG_PROJECTION_SLICES)")
    return Slice(args.slice, settings.projection_slices)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from projections.replay import replay, terminal_progress

    _exit_on_signals()
    part = _slice(settings, args)
    projections, settings, url = _projections(settings, args.names)

    async def run() -> None:
        for projection in projections:
            what = projection.name if part is None else f"{projection.name} ({part})"
            total = await _count_events(url)
            started = asyncio.get_running_loop().time()
            checkpoint = await replay(
                url, projection, _keyring(settings), batch_size=settings.replay_batch_size,
                progress=terminal_progress(projection.name, total), slices=settings.projection_slices, part=part,
            )  # fmt: skip
            seconds = asyncio.get_running_loop().time() - started
            print(f"\nreplayed {what}: {total:,} events in {seconds:.1f} s; now at position {checkpoint.position}")

    asyncio.run(run())
    return 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    from projections.replay import differences_report, verify

    part = _slice(settings, args)
    projections, settings, url = _projections(settings, args.names)

    async def run() -> int:
        status = 0
        for projection in projections:
            what = projection.name if part is None else f"{projection.name} ({part})"
            differences = await verify(
                url, projection, _keyring(settings), batch_size=settings.replay_batch_size,
                slices=settings.projection_slices, part=part,
            )  # fmt: skip
            if differences:
                status = 1
                print(f"{what}: {len(differences)} row(s) differ from a fresh fold of the log")
                print(differences_report(differences))
            else:
                print(f"{what}: the read tables equal a fresh fold of the log")
        return status

    return asyncio.run(run())


async def _count_events(url: str) -> int:
    conn = await _connected(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


def cmd_mcp(settings: Settings, args: argparse.Namespace) -> int:
    """The MCP server over stdio for one user. stdout is the protocol's: logs go to stderr."""
    from service.events import EventValidationError
    from service.eventstore import validate_user_id
    from service.mcp import serve_stdio

    try:
        validate_user_id(args.user)
    except EventValidationError as exc:
        print(f"chatlog mcp: --user: {exc}", file=sys.stderr)
        return 2
    _exit_on_signals()
    settings = resolve_database(settings.with_overrides(run_workers=not args.no_workers))
    assert settings.database_url
    _check_search_config(settings)
    asyncio.run(_migrate(settings, "head"))
    _check_read_replica(settings)
    asyncio.run(serve_stdio(settings, args.user))
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from service.auth import jwt_secret, mint_token

    if not 1 <= len(args.user) <= 255:
        print("chatlog token: USER must be 1 to 255 characters", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("chatlog token: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    token = mint_token(jwt_secret(settings), args.user, args.ttl)
    print(f"{page_address(settings)}#token={token}" if args.url else token)
    return 0


def _database(settings: Settings) -> str:
    """The database URL, resolved, at the newest schema, with a master key that opens it."""
    settings = resolve_database(settings)
    assert settings.database_url
    asyncio.run(_migrate(settings, "head"))
    return settings.database_url


async def _connected(url: str) -> asyncpg.Connection:
    """A connection of the command's own (the CLI's short tasks need no pool)."""
    import asyncpg

    from service.citus import is_distributed
    from service.connections import connect_args

    conn = await asyncpg.connect(**connect_args(url))
    await is_distributed(conn)  # on Citus, sets what distributed plans need
    return conn


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from service import sealing

    if args.action == "new":
        print(sealing.new_master_key())
        return 0
    keyring = _keyring(settings)
    url = _database(settings)

    async def rotate() -> int:
        conn = await _connected(url)
        try:
            return await sealing.rotate(conn, keyring)
        finally:
            await conn.close()

    moved = asyncio.run(rotate())
    print(f"re-wrapped {moved} data key(s) under master key {keyring.current_id}; no event was touched")
    return 0


def cmd_erase(settings: Settings, args: argparse.Namespace) -> int:
    import uuid

    from service import erasure
    from service.eventstore import NotFound

    if (args.user is None) == (args.conversation is None):
        print("chatlog erase: give a USER, or --conversation ID", file=sys.stderr)
        return 2
    try:
        conversation = uuid.UUID(args.conversation) if args.conversation else None
    except ValueError:
        print(f"chatlog erase: --conversation: not a UUID: {args.conversation!r}", file=sys.stderr)
        return 2
    url = _database(settings)

    async def run() -> int:
        conn = await _connected(url)
        try:
            if conversation is None:
                position = await erasure.erase_user(conn, args.user)
                print(f"erased user {args.user!r} (position {position})")
                return 0
            owner = await erasure.owner_of(conn, conversation)
            try:
                if owner is None:
                    raise NotFound(str(conversation))
                position = await erasure.erase_conversation(conn, owner, conversation)
            except NotFound:
                print(f"chatlog erase: no live conversation {conversation}", file=sys.stderr)
                return 1
            print(f"erased conversation {conversation} (position {position})")
            return 0
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_erasures(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from service import erasure

    path = Path(args.file)
    entries: list[erasure.LedgerEntry] = []
    if args.action == "apply":
        try:
            lines = [line for line in path.read_bytes().splitlines() if line.strip()]
            entries = [msgspec.json.decode(line, type=erasure.LedgerEntry) for line in lines]
        except (OSError, msgspec.DecodeError) as exc:
            print(f"chatlog erasures apply: {path}: {exc}", file=sys.stderr)
            return 2
    url = _database(settings)

    async def run() -> tuple[int, int]:
        conn = await _connected(url)
        try:
            if args.action == "export":
                entries.extend(await erasure.export_ledger(conn))
                return 0, 0
            return await erasure.apply_ledger(conn, entries)
        finally:
            await conn.close()

    conversations, records = asyncio.run(run())
    if args.action == "export":
        path.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in entries))
        print(f"wrote {len(entries)} erasure(s) to {path}")
    else:
        print(
            f"applied {len(entries)} erasure(s): {conversations} conversation(s) erased again, "
            f"{records} idempotency record(s) deleted"
        )
    return 0


def page_address(settings: Settings) -> str:
    """The chat page's address for `serve` with these settings (a wildcard host as loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, settings.host)  # noqa: S104
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatlog",
        description="An event-sourced conversation log service. Settings come from CHATLOG_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="migrate, then serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (CHATLOG_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (CHATLOG_PORT, default 8000)")
    serve.add_argument(
        "--no-workers", action="store_true", help="do not run the projection workers here (run `chatlog project`)"
    )
    serve.set_defaults(func=cmd_serve)

    project = sub.add_parser("project", help="run the projection workers (until SIGTERM or Ctrl-C)")
    project.add_argument("names", nargs="*", metavar="NAME", help="projections to run (default: all)")
    project.set_defaults(func=cmd_project)

    replay = sub.add_parser("replay", help="rebuild read tables from the log and swap them in")
    replay.add_argument("names", nargs="*", metavar="NAME", help="projections to rebuild (default: all)")
    replay.add_argument(
        "--slice", type=int, metavar="K", help="rebuild only slice K's rows (of CHATLOG_PROJECTION_SLICES)"
    )
    replay.set_defaults(func=cmd_replay)

    verify = sub.add_parser("verify", help="refold the log and report read-table rows that differ (exit 1)")
    verify.add_argument("names", nargs="*", metavar="NAME", help="projections to check (default: all)")
    verify.add_argument("--slice", type=int, metavar="K", help="check only slice K's rows (CHATLOG_PROJECTION_SLICES)")
    verify.set_defaults(func=cmd_verify)

    migrate = sub.add_parser("migrate", help="upgrade the database schema (or --downgrade it)")
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    migrate.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead (e.g. base)")
    migrate.set_defaults(func=cmd_migrate)

    mcp = sub.add_parser("mcp", help="serve the MCP tools over stdio for one user (for local agents)")
    mcp.add_argument("--user", required=True, help="whose conversations the tools see (1-255 characters)")
    mcp.add_argument("--no-workers", action="store_true", help="do not run the projection workers here")
    mcp.set_defaults(func=cmd_mcp)

    keys = sub.add_parser("keys", help="master keys: print a new one, or re-wrap every data key under the current one")
    keys.add_argument("action", choices=["new", "rotate"], help="new: print a new key; rotate: re-wrap (see README)")
    keys.set_defaults(func=cmd_keys)

    erase = sub.add_parser("erase", help="erase a user (everything of theirs) or one conversation")
    erase.add_argument("user", nargs="?", metavar="USER", help="the user (a token's sub) to erase")
    erase.add_argument("--conversation", metavar="ID", help="erase this conversation instead")
    erase.set_defaults(func=cmd_erase)

    erasures = sub.add_parser("erasures", help="the erasure ledger: export it, or apply it after restoring a backup")
    erasures.add_argument("action", choices=["export", "apply"])
    erasures.add_argument("file", metavar="FILE", help="JSON lines: written by export, read by apply")
    erasures.set_defaults(func=cmd_erasures)

    token = sub.add_parser("token", help="print a development JWT for USER")
    token.add_argument("user", metavar="USER", help="the token's subject (1-255 characters)")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)")
    token.add_argument(
        "--url", action="store_true", help="print a link to the chat page that signs in with it (CHATLOG_HOST/PORT)"
    )
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatlog: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("pgserver", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result: int = args.func(settings, args)
    except KeyError as exc:  # an unknown projection name
        print(f"chatlog: {exc.args[0]}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a setting the database cannot use (also the slices: LayoutMismatch)
        print(f"chatlog: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
