"""A fake OpenAI-compatible Chat Completions server on loopback, for the chat tests.

Real HTTP (uvicorn in a thread), `POST /v1/chat/completions`, streaming or not. It answers
"reply <n> to: <the last user message>" and records every request. How it misbehaves is
chosen by a word in the last user message, or by `fail_next` (for a retry that should succeed):

- `#slow`: answers after 3 s (past the read timeout the tests set);
- `#fail`: HTTP 500 with an error body;
- `#malformed`: HTTP 200 with a body that is not a chat completion (garbage SSE when streaming);
- `#empty`: a completion with empty content;
- `#drip`: streams the reply in 10 pieces, 0.3 s apart;
- `#cut`: streams two pieces, then drops the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import uvicorn

Scope = dict[str, Any]


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0
        self.replies = 0
        self._lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", interface="asgi3"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def calls_with(self, text: str) -> int:
        """How many requests had `text` in their last message."""
        return sum(1 for r in self.requests if text in r["messages"][-1]["content"])

    async def app(self, scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions":
            await _send(send, 404, b'{"error": {"message": "not found"}}')
            return
        request = json.loads(body)
        with self._lock:
            self.requests.append(request)
            forced = self.fail_next > 0
            self.fail_next -= 1 if forced else 0
            self.replies += 1
            n = self.replies
        last = request["messages"][-1]["content"]
        reply = f"reply {n} to: {last}"
        if forced or "#fail" in last:
            await _send(send, 500, b'{"error": {"message": "the model is down", "type": "server_error"}}')
        elif "#slow" in last:
            await asyncio.sleep(3)
            await _send(send, 200, _completion(reply))
        elif "#malformed" in last:
            if request.get("stream"):
                await _stream(send, [b"data: {this is not json\n\n"])
            else:
                await _send(send, 200, b"<html>this is not a chat completion</html>")
        elif "#empty" in last:
            if request.get("stream"):
                await _stream(send, [_chunk(""), b"data: [DONE]\n\n"])
            else:
                await _send(send, 200, _completion(""))
        elif request.get("stream"):
            pieces = [reply[i : i + max(1, len(reply) // 10)] for i in range(0, len(reply), max(1, len(reply) // 10))]
            if "#cut" in last:
                await _stream(send, [_chunk(p) for p in pieces[:2]], cut=True)
            else:
                delay = 0.3 if "#drip" in last else 0.0
                await _stream(send, [*(_chunk(p) for p in pieces), b"data: [DONE]\n\n"], delay=delay)
        else:
            await _send(send, 200, _completion(reply))


def _completion(content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
    ).encode()


def _chunk(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _send(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Any, events: list[bytes], *, delay: float = 0.0, cut: bool = False) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
        if delay:
            await asyncio.sleep(delay)
    if cut:
        raise ConnectionAbortedError("the fake drops the connection mid-stream")
    await send({"type": "http.response.body", "body": b""})
