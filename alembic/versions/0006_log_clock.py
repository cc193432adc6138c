"""The log's clock: transaction ids that go on rising when the log moves to another server.

Revision ID: 0006_log_clock
Revises: 0005_search_angle_brackets
Create Date: 2026-12-04

Written by hand. The log is ordered by `tx_id`, the id of the transaction that wrote each event,
and read only below the oldest running transaction (DESIGN.md). Those ids belong to the server
that wrote them: after a logical restore (pg_dump/pg_restore) or a move by logical replication
into a server whose ids are lower, the restored events would sit above the horizon (hidden) and
new events would sort before them (skipped by every checkpoint). So the log's ids are the
server's plus a `shift`, kept in `log_clock`: `chatlog_xact_id()` gives the current
transaction's, `chatlog_horizon()` the horizon's, and the column's default adds the same
constant. The shift starts at 0 (ids are exactly the server's, as before); `service.clock`
raises it when it finds the log's newest id at or above the server's.
"""

from alembic import op

revision = "0006_log_clock"
down_revision = "0005_search_angle_brackets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE log_clock (
            one        boolean PRIMARY KEY DEFAULT true CHECK (one),
            shift      numeric NOT NULL DEFAULT 0 CHECK (shift >= 0),
            changed_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("INSERT INTO log_clock DEFAULT VALUES")
    op.execute(
        "CREATE FUNCTION chatlog_xact_id() RETURNS xid8 LANGUAGE sql VOLATILE AS $$ SELECT pg_current_xact_id() $$"
    )
    op.execute(
        "CREATE FUNCTION chatlog_horizon() RETURNS xid8 LANGUAGE sql STABLE "
        "AS $$ SELECT pg_snapshot_xmin(pg_current_snapshot()) $$"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id()")
    op.execute("DROP FUNCTION chatlog_horizon()")
    op.execute("DROP FUNCTION chatlog_xact_id()")
    op.execute("DROP TABLE log_clock")
