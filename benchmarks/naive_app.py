"""The naive baseline of benchmarks/http.py: a Litestar endpoint that inserts one row with asyncpg.

NAIVE_DSN=postgresql://... uvicorn benchmarks.naive_app:app --port 8001
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import msgspec
from litestar import Litestar, post
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


app = Litestar(route_handlers=[append], lifespan=[lifespan])
