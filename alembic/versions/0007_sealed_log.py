"""Sealing: content never stands in the log in clear; deleting a conversation erases it.

Revision ID: 0007_sealed_log
Revises: 0006_log_clock
Create Date: 2026-12-04

Written by hand. New tables: `data_keys` (each stream's data key, wrapped by the master key),
`idempotency_keys` (a command's Idempotency-Key, as a digest with its user, and its request's
fingerprint: moved out of `events`, where nothing can be deleted, so that an erasure can delete
them), and `erasures` (the ledger: ids and times only).

The events already stored are sealed **by copying, never by updating**: the log's append-only
trigger forbids UPDATE, and rightly; an UPDATE would also leave the clear rows behind as dead
tuples in the same table. The old table is renamed aside, a new `events` made with the same
positions, ids, `tx_id`s and times (so every checkpoint and cursor stays valid), each event's
content sealed under its stream's new data key, and the old table dropped (its files are
unlinked at commit). It is one transaction: a failure leaves the old log as it was. A
conversation already deleted is erased on the way: its events are copied as structure only,
sealed under a key that is never stored. This needs the master key (`CHATLOG_MASTER_KEY`, or
the data directory's), which `chatlog migrate` passes in.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy.util import await_only

from alembic import context, op

revision = "0007_sealed_log"
down_revision = "0006_log_clock"
branch_labels = None
depends_on = None

BATCH = 5000
_COPIED = (
    "position", "event_id", "stream_id", "stream_version", "user_id", "type", "data", "sealed", "metadata",
    "recorded_at", "tx_id",
)  # fmt: skip

_EVENTS = """
CREATE TABLE events (
    position            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id            uuid        NOT NULL,
    stream_id           uuid        NOT NULL,
    stream_version      integer     NOT NULL CHECK (stream_version > 0),
    user_id             text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
    type                text        NOT NULL,
    -- Structure only (the ids and numbers that queries use); the content is in `sealed`.
    data                jsonb       NOT NULL,
    -- The event's whole JSON, sealed under its stream's data key (null for an event with no
    -- content, such as a deletion).
    sealed              bytea,
    metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    tx_id               xid8        NOT NULL DEFAULT {tx_default},
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
)
"""

# The log's append-only trigger (0001), on whichever `events` table is the log.
_APPEND_ONLY = (
    "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change()"
)

_INDEXES = (
    "CREATE INDEX events_user_recorded_at ON events (user_id, recorded_at)",
    "CREATE INDEX events_tx_position ON events (tx_id, position)",
    "CREATE INDEX events_user_tx_position ON events (user_id, tx_id, position)",
)


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE data_keys (
            stream_id  uuid        PRIMARY KEY,
            user_id    text        NOT NULL,
            wrapped    bytea       NOT NULL,
            master_id  text        NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX data_keys_user ON data_keys (user_id)")
    op.execute("CREATE INDEX data_keys_master ON data_keys (master_id)")
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            user_id       text        NOT NULL,
            key_digest    bytea       NOT NULL,
            fingerprint   bytea       NOT NULL,
            stream_id     uuid        NOT NULL,
            first_version integer     NOT NULL,
            event_count   integer     NOT NULL CHECK (event_count > 0),
            created_at    timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, key_digest)
        )
        """
    )
    op.execute("CREATE INDEX idempotency_keys_stream ON idempotency_keys (stream_id)")
    op.execute(
        """
        CREATE TABLE erasures (
            id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_id    text        NOT NULL,
            -- The erased conversation; null for the user's own records (DELETE /v1/me).
            stream_id  uuid,
            position   bigint,
            erased_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX erasures_stream ON erasures (stream_id)")

    bind = op.get_bind()
    conn: Any = bind.connection.dbapi_connection.driver_connection  # type: ignore[union-attr]
    tx_default = _set_aside(conn, "_clear")
    await_only(conn.execute(_EVENTS.replace("{tx_default}", tx_default)))
    _copy_sealed(conn)
    await_only(conn.execute("DROP TABLE events_clear"))
    for statement in _INDEXES:
        await_only(conn.execute(statement))
    await_only(conn.execute(_APPEND_ONLY))


def _keyring() -> Any:
    attributes = context.config.attributes
    keyring = attributes.get("keyring")
    if keyring is None and "connection" in attributes:
        raise RuntimeError("this migration opens or seals events: it needs the master key (pass keyring=)")
    if keyring is None:  # the plain `alembic` command: the key from the environment
        from service.sealing import Keyring
        from service.settings import Settings

        keyring = Keyring.from_settings(Settings.from_env())
    return keyring


def _copy_sealed(conn: Any) -> None:
    """Every event of `events_clear` into `events`, sealed; keys and idempotency records made."""
    if not await_only(conn.fetchval("SELECT EXISTS (SELECT FROM events_clear)")):
        return
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from service.eventstore import seal_event

    keyring = _keyring()
    deleted = {
        r[0] for r in await_only(conn.fetch("SELECT stream_id FROM events_clear WHERE type = 'conversation.deleted'"))
    }
    keys: dict[Any, Any] = {}
    after = 0
    while True:
        rows = await_only(
            conn.fetch(
                "SELECT position, event_id, stream_id, stream_version, user_id, type, data::text, metadata::text, "
                "recorded_at, tx_id FROM events_clear WHERE position > $1 ORDER BY position LIMIT $2",
                after,
                BATCH,
            )
        )
        if not rows:
            break
        records, new_keys = [], []
        for position, event_id, stream_id, version, user_id, type_, data, metadata, recorded_at, tx_id in rows:
            aead = keys.get(stream_id)
            if aead is None:
                if stream_id in deleted:  # erased on the way: sealed under a key nobody keeps
                    aead = AESGCM(AESGCM.generate_key(bit_length=256))
                else:
                    aead, wrapped = keyring.new_data_key(stream_id)
                    new_keys.append((stream_id, user_id, wrapped, keyring.current_id))
                keys[stream_id] = aead
            clear, sealed = seal_event(aead, event_id, type_, data.encode())
            meta = msgspec.json.decode(metadata)
            meta.pop("idempotency_key", None)
            records.append((
                position, event_id, stream_id, version, user_id, type_, clear, sealed,
                msgspec.json.encode(meta).decode(), recorded_at, tx_id,
            ))  # fmt: skip
        await_only(
            conn.copy_records_to_table(
                "events",
                records=records,
                columns=_COPIED,
            )
        )
        if new_keys:
            await_only(
                conn.copy_records_to_table(
                    "data_keys", records=new_keys, columns=["stream_id", "user_id", "wrapped", "master_id"]
                )
            )
        after = rows[-1][0]
    await_only(conn.execute("SELECT setval(pg_get_serial_sequence('events', 'position'), $1)", after))
    # The idempotency records of live conversations: the first event of each keyed command names
    # it; its events are those of its stream and transaction that carry the key.
    rows = await_only(
        conn.fetch(
            """
            SELECT first.user_id, first.idempotency_key, first.request_fingerprint, first.stream_id,
                   first.stream_version, count(*)::integer, min(e.recorded_at)
            FROM events_clear AS first
            JOIN events_clear AS e ON e.stream_id = first.stream_id AND e.tx_id = first.tx_id
                                  AND e.metadata->>'idempotency_key' = first.idempotency_key
            WHERE first.idempotency_key IS NOT NULL AND NOT first.stream_id = ANY($1::uuid[])
            GROUP BY first.position
            """,
            list(deleted),
        )
    )
    from service.sealing import idempotency_digest

    await_only(
        conn.copy_records_to_table(
            "idempotency_keys",
            records=[(u, idempotency_digest(u, k), f, s, v, n, t) for u, k, f, s, v, n, t in rows],
            columns=["user_id", "key_digest", "fingerprint", "stream_id", "first_version", "event_count", "created_at"],
        )
    )


_CLEAR_EVENTS = """
CREATE TABLE events (
    position            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id            uuid        NOT NULL,
    stream_id           uuid        NOT NULL,
    stream_version      integer     NOT NULL CHECK (stream_version > 0),
    user_id             text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
    type                text        NOT NULL,
    data                jsonb       NOT NULL,
    metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    tx_id               xid8        NOT NULL DEFAULT {tx_default},
    idempotency_key     text,
    request_fingerprint bytea,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_idempotency_pair CHECK ((idempotency_key IS NULL) = (request_fingerprint IS NULL))
)
"""


def _set_aside(conn: Any, suffix: str) -> str:
    """Rename `events` (its sequence and indexes too) out of the way; the `tx_id` default it had."""
    tx_default = await_only(
        conn.fetchval(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef AS d "
            "JOIN pg_attribute AS a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
            "WHERE d.adrelid = 'events'::regclass AND a.attname = 'tx_id'"
        )
    )
    sequence = await_only(conn.fetchval("SELECT pg_get_serial_sequence('events', 'position')"))
    await_only(conn.execute(f"ALTER TABLE events RENAME TO events{suffix}"))
    await_only(conn.execute(f"ALTER SEQUENCE {sequence} RENAME TO events{suffix}_position_seq"))
    for name in await_only(conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = $1", f"events{suffix}")):
        await_only(conn.execute(f'ALTER INDEX "{name[0]}" RENAME TO "{name[0]}{suffix}"'))
    return str(tx_default)


def downgrade() -> None:
    """Back to the clear log: every event opened with its stream's key and copied back. Refused
    when the log holds erased events (their content is gone, as erasure promised). Idempotency
    keys were kept only as digests, so they do not come back: a retry after the downgrade is
    taken for a new request."""
    bind = op.get_bind()
    conn: Any = bind.connection.dbapi_connection.driver_connection  # type: ignore[union-attr]
    tx_default = _set_aside(conn, "_sealed")
    await_only(conn.execute(_CLEAR_EVENTS.replace("{tx_default}", tx_default)))
    if await_only(conn.fetchval("SELECT EXISTS (SELECT FROM events_sealed)")):
        _copy_clear(conn)
    await_only(conn.execute("DROP TABLE events_sealed"))
    for statement in (
        *_INDEXES,
        "CREATE UNIQUE INDEX events_user_idempotency_key ON events (user_id, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL",
        _APPEND_ONLY,
        "DROP TABLE erasures",
        "DROP TABLE idempotency_keys",
        "DROP TABLE data_keys",
    ):
        await_only(conn.execute(statement))


def _copy_clear(conn: Any) -> None:
    from service.eventstore import recorded

    keyring = _keyring()
    after = 0
    while True:
        rows = await_only(
            conn.fetch(
                "SELECT e.position, e.event_id, e.stream_id, e.stream_version, e.user_id, e.type, e.data::text, "
                "e.sealed, e.metadata::text, e.recorded_at, e.tx_id, k.wrapped, k.master_id "
                "FROM events_sealed AS e LEFT JOIN data_keys AS k ON k.stream_id = e.stream_id AND e.sealed IS NOT NULL "
                "WHERE e.position > $1 ORDER BY e.position LIMIT $2",
                after,
                BATCH,
            )
        )
        if not rows:
            break
        records = []
        for row in rows:
            event = recorded(row, keyring)
            if event.event is None:
                raise RuntimeError(
                    f"the log holds erased events (position {event.position}): their content is gone, so the "
                    "log cannot go back below 0007_sealed_log"
                )
            data = msgspec.json.encode(event.event).decode()
            records.append((*row[:6], data, row[8], row[9], row[10]))
        await_only(
            conn.copy_records_to_table(
                "events",
                records=records,
                columns=[c for c in _COPIED if c != "sealed"],
            )
        )
        after = rows[-1][0]
    await_only(conn.execute("SELECT setval(pg_get_serial_sequence('events', 'position'), $1)", after))
