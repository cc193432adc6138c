"""The naive baselines of benchmarks/http.py, Litestar routes over asyncpg: an append that inserts
one row, and a history page that selects 50 rows of chatlog's own `messages` table by its
(conversation_id, seq) index (no token to check, no own-writes wait: the least a history page can do).

NAIVE_DSN=postgresql://... uvicorn benchmarks.naive_app:app --port 8001
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import msgspec
from litestar import Litestar, get, post
from litestar.datastructures import State
from litestar.params import JSONBody

DSN = os.environ.get("NAIVE_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class MessageIn(msgspec.Struct):
    role: str
    content: str


class MessageOut(msgspec.Struct):
    id: int
    conversation_id: uuid.UUID
    role: str
    content: str


@post("/naive/{conversation_id:uuid}/messages", status_code=201)
async def append(state: State, conversation_id: uuid.UUID, data: JSONBody[MessageIn]) -> MessageOut:
    async with state.pool.acquire() as conn:
        row_id = await conn.fetchval(
            "INSERT INTO naive_messages (conversation_id, role, content) VALUES ($1, $2, $3) RETURNING id",
            conversation_id,
            data.role,
            data.content,
        )
    return MessageOut(id=row_id, conversation_id=conversation_id, role=data.role, content=data.content)


class HistoryMessage(msgspec.Struct):
    id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int
    role: str
    content: str
    metadata: msgspec.Raw
    created_at: str


class HistoryPage(msgspec.Struct):
    data: list[HistoryMessage]


_PAGE = (
    "SELECT id, conversation_id, seq, role, content, metadata::text, created_at::text FROM messages "
    "WHERE conversation_id = $1 AND user_id = $2 ORDER BY seq LIMIT $3"
)


@get("/naive/{conversation_id:uuid}/messages")
async def history(state: State, conversation_id: uuid.UUID, user: str = "bench-0", limit: int = 50) -> HistoryPage:
    async with state.pool.acquire() as conn:
        rows = await conn.fetch(_PAGE, conversation_id, user, limit)
    return HistoryPage([HistoryMessage(r[0], r[1], r[2], r[3], r[4], msgspec.Raw(r[5].encode()), r[6]) for r in rows])


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(DSN, min_size=20, max_size=20)
    async with app.state.pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS naive_messages (id bigserial PRIMARY KEY, conversation_id uuid NOT NULL, "
            "role text NOT NULL, content text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
    yield
    await app.state.pool.close()


app = Litestar(route_handlers=[append, history], lifespan=[lifespan])
