"""The append-only event log.

Revision ID: 0001_event_log
Revises:
Create Date: 2026-11-24

Written by hand (autogenerate does not know triggers): one `events` table, append-only in the
database itself through a statement-level trigger that rejects UPDATE, DELETE and TRUNCATE,
also when no row matches and also from connections that bypass the code.
"""

from alembic import op

revision = "0001_event_log"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE events (
            position            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id            uuid        NOT NULL,
            stream_id           uuid        NOT NULL,
            stream_version      integer     NOT NULL CHECK (stream_version > 0),
            user_id             text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
            type                text        NOT NULL,
            data                jsonb       NOT NULL,
            metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
            recorded_at         timestamptz NOT NULL DEFAULT now(),
            tx_id               xid8        NOT NULL DEFAULT pg_current_xact_id(),
            -- The idempotency key of the command that appended this event, on the command's
            -- first event only, with a fingerprint of the request it answered.
            idempotency_key     text,
            request_fingerprint bytea,
            CONSTRAINT events_event_id_key UNIQUE (event_id),
            CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
            CONSTRAINT events_idempotency_pair CHECK ((idempotency_key IS NULL) = (request_fingerprint IS NULL))
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX events_user_idempotency_key ON events (user_id, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL"
    )
    op.execute("CREATE INDEX events_user_recorded_at ON events (user_id, recorded_at)")
    op.execute("CREATE INDEX events_tx_position ON events (tx_id, position)")
    # The per-user feed (/v1/events) walks one user's events in (tx_id, position) order.
    op.execute("CREATE INDEX events_user_tx_position ON events (user_id, tx_id, position)")
    op.execute(
        """
        CREATE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the events table is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'restrict_violation';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change()"
    )


def downgrade() -> None:
    op.execute("DROP TABLE events")
    op.execute("DROP FUNCTION events_reject_change()")
