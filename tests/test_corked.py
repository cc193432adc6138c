"""`chatlog serve` writes each answer through a cork (service/corked.py): the writes of one turn of
the event loop go out together, in order; nothing is lost, reordered or held back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from service.corked import CorkedTransport
from tests.support import Api, auth

Reply = Callable[[CorkedTransport, bytes], None]


class _Peer(asyncio.Protocol):
    """The server's side of one connection: on each line it receives, it runs `reply` with a
    CorkedTransport over its real one."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = CorkedTransport(transport, asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        for line in data.splitlines():
            self.reply(self.transport, line)


@pytest.fixture
async def corked_server() -> AsyncIterator[Any]:
    """A real TCP server on loopback whose replies go through a CorkedTransport; yields a function
    that starts it with a reply function and returns a connected (reader, writer)."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(
        reply: Callable[[CorkedTransport, bytes], None],
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        server = await asyncio.get_running_loop().create_server(lambda: _Peer(reply), "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_writes_of_one_turn_arrive_whole_and_in_order(corked_server: Any) -> None:
    def reply(transport: CorkedTransport, line: bytes) -> None:
        changing = bytearray(b"-body-")
        transport.write(b"head:" + line)
        transport.write(changing)
        changing[:] = b"XXXXXX"  # written already: what was written is what goes out
        transport.writelines([b"|", b"tail\n"])
        assert transport.get_write_buffer_size() >= len(b"head:" + line + b"-body-|tail\n")

    reader, writer = await corked_server(reply)
    writer.write(b"one\ntwo\n")  # two requests in one packet: two replies in one turn
    await writer.drain()
    assert await reader.readline() == b"head:one-body-|tail\n"
    assert await reader.readline() == b"head:two-body-|tail\n"
    writer.write(b"three\n")
    await writer.drain()
    assert await reader.readline() == b"head:three-body-|tail\n"


async def test_close_sends_what_was_written_first_and_abort_drops_it(corked_server: Any) -> None:
    def reply(transport: CorkedTransport, line: bytes) -> None:
        transport.write(b"said " + line + b"\n")
        if line == b"bye":
            transport.close()
        elif line == b"drop":
            transport.abort()

    reader, writer = await corked_server(reply)
    writer.write(b"bye\n")
    await writer.drain()
    assert await reader.read() == b"said bye\n"  # everything, then end of stream

    reader, writer = await corked_server(reply)
    writer.write(b"drop\n")
    await writer.drain()
    try:
        got = await reader.read()
    except ConnectionResetError:  # an abort resets the connection
        got = b""
    assert got == b""  # never "said drop"


async def test_pipelined_requests_to_the_service_get_their_answers_whole_in_order(api: Api) -> None:
    """Two requests sent together on one connection: their answers (each headers and body,
    written in one turn of the loop) arrive complete and in the order asked."""
    user = "corked-pipeline"
    convo = await api.create(user, title="pipelined")
    port = int(api.base_url.rsplit(":", 1)[1])
    token = auth(user)["Authorization"]
    request = (
        f"GET /v1/conversations/{convo['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n\r\n"
        f"GET /v1/conversations/{convo['id']}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    first, rest = _one_answer(raw)
    second, tail = _one_answer(rest)
    assert tail == b""
    assert first.status_code == 200 and first.json()["id"] == convo["id"]
    assert second.status_code == 200 and second.json()["data"] == []


def _one_answer(raw: bytes) -> tuple[httpx.Response, bytes]:
    """The first HTTP/1.1 answer in `raw` (with a Content-Length) and the bytes after it."""
    head, _, after = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
    assert len(after) >= length, "an answer arrived cut short"
    return httpx.Response(status, headers=headers, content=after[:length]), after[length:]
