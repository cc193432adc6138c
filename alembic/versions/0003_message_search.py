"""Full-text search on messages: a tsvector column, kept by the conversations projection, and its GIN index.

Revision ID: 0003_message_search
Revises: 0002_read_tables
Create Date: 2026-11-25

Written by hand. Existing rows get vectors of the default configuration ('simple'); with another
`CHATLOG_SEARCH_CONFIG`, `chatlog verify` reports them and `chatlog replay` rebuilds them.
"""

from alembic import op

revision = "0003_message_search"
down_revision = "0002_read_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN search tsvector")
    op.execute("UPDATE messages SET search = to_tsvector('simple', content)")
    op.execute("ALTER TABLE messages ALTER COLUMN search SET NOT NULL")
    op.execute("CREATE INDEX messages_search ON messages USING gin (search)")


def downgrade() -> None:
    op.execute("DROP INDEX messages_search")
    op.execute("ALTER TABLE messages DROP COLUMN search")
