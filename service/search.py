"""Full-text search over one user's messages (the messages projection keeps `messages.search`).

Queries use PostgreSQL's web-search syntax (`websearch_to_tsquery`: words, "quoted phrases",
`-not`, `or`) in the configured text-search configuration, the same one the projection builds
the vectors with. Results are ranked by `ts_rank`, then newest first, and paged by a keyset on
exactly that order (rank, created_at, id), so a walk is stable while messages arrive. Snippets
come from `ts_headline` over the HTML-escaped text (`&`, `<`, `>`), computed only for the page's
rows, with the hits in `<mark>` tags: safe to render as HTML, and no part of the text is lost.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Final

import asyncpg
import msgspec

from projections.conversations import owner_lexeme
from service import shapes
from service.errors import BadRequest
from service.queries import from_micros, message_from_row, micros

MAX_QUERY_CHARS: Final = 500
_START, _STOP = "\ue000", "\ue001"  # private-use marks, turned into <mark> tags after escaping
_HEADLINE: Final = f"StartSel={_START}, StopSel={_STOP}, MaxWords=35, MinWords=15"


class SearchResult(msgspec.Struct, kw_only=True):
    object: str = "search_result"
    message: shapes.Message
    conversation_title: str
    snippet: str
    rank: float


def cursor_scope(text: str, conversation_id: uuid.UUID | None, role: str | None) -> str:
    """The list a search cursor belongs to: this query with these filters."""
    return "search:" + hashlib.sha256(msgspec.json.encode([text, conversation_id, role])).hexdigest()[:32]


def _sql(filters: str, keyset: str) -> str:
    return f"""
    WITH hits AS (
        SELECT m.id, m.conversation_id, m.seq, m.role, m.content, m.metadata, m.created_at, m.position,
               ts_rank(m.search, q) AS rank, m.parent_id
        FROM messages AS m, websearch_to_tsquery($1::regconfig, $2) AS q
        WHERE m.user_id = $3 AND numnode(q) > 0  -- no searchable word: no hits (not all the user's)
          AND m.search @@ (q && quote_literal({owner_lexeme("$3::text")})::tsquery) {filters}
    )
    SELECT h.id, h.conversation_id, h.seq, h.role, h.content, h.metadata::text, h.created_at, h.position,
           h.rank, c.title,
           ts_headline($1::regconfig, replace(replace(replace(h.content, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'),
                       websearch_to_tsquery($1::regconfig, $2), $4),
           h.parent_id
    FROM (SELECT * FROM hits {keyset} ORDER BY rank DESC, created_at DESC, id DESC LIMIT $5) AS h
    JOIN conversations AS c ON c.user_id = $3 AND c.id = h.conversation_id
    ORDER BY h.rank DESC, h.created_at DESC, h.id DESC
    """


async def search_messages(
    conn: asyncpg.Connection,
    user_id: str,
    config: str,
    text: str,
    *,
    conversation_id: uuid.UUID | None,
    role: str | None,
    limit: int,
    after: list[Any] | None,
) -> tuple[list[SearchResult], list[Any] | None]:
    """A page of the user's messages matching `text`, and the keyset after its last one if more follow."""
    args: list[Any] = [config, text, user_id, _HEADLINE, limit + 1]
    filters = ""
    if conversation_id is not None:
        args.append(conversation_id)
        filters += f" AND m.conversation_id = ${len(args)}"
    if role is not None:
        args.append(role)
        filters += f" AND m.role = ${len(args)}"
    keyset = ""
    if after is not None:
        args += _keyset(after)
        n = len(args)
        keyset = f"WHERE (rank, created_at, id) < (${n - 2}::real, ${n - 1}::timestamptz, ${n}::uuid)"
    async with conn.transaction(readonly=True):
        # A generic plan cannot know how common the words are; for a common word it would scan
        # the text index across all users instead of the user's own rows.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(_sql(filters, keyset), *args)
    page = [
        SearchResult(
            message=message_from_row(r, parent_column=11), conversation_title=r[9], snippet=_snippet(r[10]), rank=r[8]
        )
        for r in rows[:limit]
    ]
    if len(rows) <= limit:
        return page, None
    last = rows[limit - 1]
    return page, [last[8], micros(last[6]), str(last[0])]


def _snippet(headline: str) -> str:
    """The headline of the escaped text (the parser would drop tags of the raw one), marked up."""
    return headline.replace(_START, "<mark>").replace(_STOP, "</mark>")


def _keyset(after: list[Any]) -> list[Any]:
    """(rank, created_at, id) of the last result served."""
    try:
        rank, created_at, last_id = after
        if type(rank) not in (int, float) or type(created_at) is not int:
            raise TypeError
        return [float(rank), from_micros(created_at), uuid.UUID(str(last_id))]
    except (ValueError, TypeError, OverflowError):
        raise BadRequest("the cursor is not valid", field="cursor") from None
