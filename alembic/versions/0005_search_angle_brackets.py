"""Words between angle brackets are searchable: a message's vector reads `<` as a space.

Revision ID: 0005_search_angle_brackets
Revises: 0004_search_owner
Create Date: 2026-11-25

Written by hand. PostgreSQL's text parser takes `<String>` in `Vec<String>` (or `<b>`) for an
HTML tag and leaves the word out, so such words were never found. The vector is now built from
the text with `<` read as a space (`projections.conversations.search_vector`). Only messages
holding a `<` change; they are re-indexed here in the configured text-search configuration
(`CHATLOG_SEARCH_CONFIG`, as `chatlog migrate` and `serve` read it; `simple` by default), and
back on downgrade.
"""

import os

import sqlalchemy as sa

from alembic import op

revision = "0005_search_angle_brackets"
down_revision = "0004_search_owner"
branch_labels = None
depends_on = None

_OWNER = "array_to_tsvector(ARRAY[' u:' || encode(convert_to(user_id, 'UTF8'), 'hex')])"


def _reindex(text_sql: str) -> None:
    config = os.environ.get("CHATLOG_SEARCH_CONFIG") or "simple"
    update = f"""
        UPDATE messages SET search = to_tsvector(CAST(:config AS regconfig), {text_sql}) || {_OWNER}
        WHERE strpos(content, '<') > 0
    """
    op.execute(sa.text(update).bindparams(config=config))


def upgrade() -> None:
    _reindex("translate(content, '<', ' ')")


def downgrade() -> None:
    _reindex("content")
