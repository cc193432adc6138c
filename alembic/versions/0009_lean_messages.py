"""Leaner messages: no foreign key to conversations, no index that no query reads.

Revision ID: 0009_lean_messages
Revises: 0008_branches
Create Date: 2026-12-04

Written by hand. Measured on the append load of benchmarks/http.py, these three cost a third of
the projection's database time per message, for nothing a read uses:

- `messages_conversation_id_fkey`: a lookup in `conversations` for every message inserted, and,
  on each deleted conversation, a cascade that scans for messages the projection (or the erasure)
  has already deleted (about 4 ms of a 50-conversation erasure). The conversations projection is
  the only writer of both tables and removes a conversation's messages with it, in one
  transaction; `chatlog verify` checks both tables against the log.
- `messages_user_created` (user_id, created_at): no statement reads it; a user's search goes
  through the text index, where every message carries its owner's lexeme.
- `messages_parent` (conversation_id, parent_id, seq): no statement reads it; a message's place in
  its tree is found through `messages_run_depth`.

On Citus the same statements go to every shard. The downgrade puts them back.
"""

from alembic import op

revision = "0009_lean_messages"
down_revision = "0008_branches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_conversation_id_fkey")
    op.execute("DROP INDEX messages_user_created")
    op.execute("DROP INDEX messages_parent")


def downgrade() -> None:
    op.execute("CREATE INDEX messages_parent ON messages (conversation_id, parent_id, seq)")
    op.execute("CREATE INDEX messages_user_created ON messages (user_id, created_at)")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_conversation_id_fkey "
        "FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE"
    )
