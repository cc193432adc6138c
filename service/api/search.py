"""GET /v1/search: full-text search over the caller's own messages."""

from __future__ import annotations

from typing import Annotated

from litestar import get
from litestar.datastructures import State
from litestar.params import QueryParameter

from service import search as searching
from service import shapes
from service.api.routes import Cursor, Limit, MinPosition, User, page_of, problems, wait
from service.cursors import Cursors
from service.events import CLEAN_TEXT, Role
from service.ids import parse_uuid


@get(
    "/v1/search",
    summary="Search the caller's messages",
    description=(
        'PostgreSQL full-text search in web-search syntax: words, "quoted phrases", -not, or. '
        "Best first (ts_rank), then newest first. Snippets are HTML-escaped with hits in <mark> tags."
    ),
    responses=problems(422, 503),
)
async def search(
    state: State,
    user: User,
    q: Annotated[
        str,
        QueryParameter(min_length=1, max_length=searching.MAX_QUERY_CHARS, pattern=CLEAN_TEXT, description="the query"),
    ],
    conversation_id: Annotated[str | None, QueryParameter(max_length=64, description="only this conversation")] = None,
    role: Annotated[Role | None, QueryParameter(description="only messages of this role")] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
    min_position: MinPosition = None,
) -> shapes.Page[searching.SearchResult]:
    await wait(state, user, min_position)
    cursors: Cursors = state.cursors
    cid = parse_uuid(conversation_id) if conversation_id is not None else None
    scope = searching.cursor_scope(q, cid, role)
    after = cursors.decode(cursor, scope, user) if cursor is not None else None
    async with state.reads.acquire() as conn:
        page, next_after = await searching.search_messages(
            conn, user, state.settings.search_config, q, conversation_id=cid, role=role, limit=limit, after=after
        )
    return page_of(cursors, scope, user, page, next_after)


ROUTES = [search]
