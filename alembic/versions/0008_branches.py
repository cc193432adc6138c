"""Branches: a conversation's messages form a tree.

Revision ID: 0008_branches
Revises: 0007_sealed_log
Create Date: 2026-12-04

Written by hand. Messages get `parent_id`, `depth` (1 for a first message) and `run` (the first
message of the chain it continues: a message continues its parent's run when it is its first
child), so that a branch is a few runs, each a range of depths on `messages_run_depth`.
Conversations get `active_leaf_id`, `last_message_id` and where a fork came from. The rows there
are filled as the log says: every stored conversation is linear (each message follows the one
appended before it). The events are not touched: a `message.appended` of schema version 1 is
upcast when read. `events_message_id` lets a command find a message of a stream in the log.
"""

from alembic import op

revision = "0008_branches"
down_revision = "0007_sealed_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE conversations ADD COLUMN active_leaf_id uuid, ADD COLUMN last_message_id uuid, "
        "ADD COLUMN forked_from_conversation uuid, ADD COLUMN forked_from_message uuid"
    )
    op.execute("ALTER TABLE messages ADD COLUMN parent_id uuid, ADD COLUMN depth integer, ADD COLUMN run uuid")
    op.execute(
        """
        UPDATE messages AS m SET parent_id = linear.parent, depth = m.seq, run = linear.first
        FROM (SELECT id, lag(id) OVER w AS parent, first_value(id) OVER w AS first FROM messages
              WINDOW w AS (PARTITION BY conversation_id ORDER BY seq)) AS linear
        WHERE linear.id = m.id
        """
    )
    op.execute("ALTER TABLE messages ALTER COLUMN depth SET NOT NULL, ALTER COLUMN run SET NOT NULL")
    op.execute(
        """
        UPDATE conversations AS c SET active_leaf_id = last.id, last_message_id = last.id
        FROM (SELECT DISTINCT ON (conversation_id) conversation_id, id FROM messages
              ORDER BY conversation_id, seq DESC) AS last
        WHERE last.conversation_id = c.id
        """
    )
    op.execute("CREATE UNIQUE INDEX messages_run_depth ON messages (run, depth)")
    op.execute("CREATE INDEX messages_parent ON messages (conversation_id, parent_id, seq)")
    op.execute(
        "CREATE INDEX events_message_id ON events (((data->>'message_id')::uuid)) WHERE type = 'message.appended'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX events_message_id")
    op.execute("ALTER TABLE messages DROP COLUMN parent_id, DROP COLUMN depth, DROP COLUMN run")
    op.execute(
        "ALTER TABLE conversations DROP COLUMN active_leaf_id, DROP COLUMN last_message_id, "
        "DROP COLUMN forked_from_conversation, DROP COLUMN forked_from_message"
    )
