"""Read tables of the conversations projection, and projection checkpoints.

Revision ID: 0002_read_tables
Revises: 0001_event_log
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002_read_tables"
down_revision = "0001_event_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE conversations (
            id                   uuid        PRIMARY KEY,
            user_id              text        NOT NULL,
            title                text        NOT NULL,
            metadata             jsonb       NOT NULL,
            created_at           timestamptz NOT NULL,
            updated_at           timestamptz NOT NULL,
            message_count        integer     NOT NULL,
            last_message_preview text,
            version              integer     NOT NULL,
            last_position        bigint      NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id)")
    op.execute(
        """
        CREATE TABLE messages (
            id              uuid        PRIMARY KEY,
            conversation_id uuid        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            user_id         text        NOT NULL,
            seq             integer     NOT NULL,
            role            text        NOT NULL,
            content         text        NOT NULL,
            metadata        jsonb       NOT NULL,
            created_at      timestamptz NOT NULL,
            position        bigint      NOT NULL
        )
        """
    )
    op.execute("CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq)")
    op.execute("CREATE INDEX messages_user_created ON messages (user_id, created_at)")
    op.execute(
        """
        CREATE TABLE projection_checkpoints (
            name            text        PRIMARY KEY,
            tx_id           xid8        NOT NULL DEFAULT '0',
            position        bigint      NOT NULL DEFAULT 0,
            updated_at      timestamptz NOT NULL DEFAULT now(),
            -- Set when the projection stopped on an event it could not apply.
            failed_position bigint,
            error           text
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE projection_checkpoints")
    op.execute("DROP TABLE messages")
    op.execute("DROP TABLE conversations")
