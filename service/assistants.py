"""Assistants that answer a chat turn, behind one small interface (`CHATLOG_ASSISTANT`).

- `echo` (the default) is deterministic and offline: it quotes the user's last message and says
  how many messages the conversation holds, so the whole loop can be seen working with no model.
- `openai` talks to any OpenAI-compatible Chat Completions server (OpenAI, vLLM, Ollama,
  llama.cpp) through the official `openai` client, with connect and read timeouts.

An assistant either returns its whole reply (`complete`) or yields it in pieces (`stream`). Any
failure — a refused connection, a timeout, an error status, an answer that is not a chat
completion, an empty reply — is raised as `AssistantError`; the chat endpoint answers it 502.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, Literal, Protocol

import msgspec
import openai

from service.settings import Settings

log = logging.getLogger(__name__)

QUOTE_CHARS: Final = 1000


class AssistantError(Exception):
    """The assistant failed to give a reply (502 assistant_error). The chat sets
    `conversation_id`, where the user's message stays stored, and `position`, that message's."""

    conversation_id: uuid.UUID | None = None
    position: int | None = None


class PromptMessage(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant", "system", "tool"]
    content: str


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """What an assistant sees: the conversation's newest messages within the history caps, and
    how many messages the whole conversation holds."""

    messages: Sequence[PromptMessage]
    conversation_messages: int


class Assistant(Protocol):
    name: str

    async def complete(self, prompt: Prompt) -> str: ...

    def stream(self, prompt: Prompt) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class EchoAssistant:
    name = "echo"

    def reply(self, prompt: Prompt) -> str:
        last = next((m.content for m in reversed(prompt.messages) if m.role == "user"), "")
        quote = last if len(last) <= QUOTE_CHARS else last[:QUOTE_CHARS] + "…"
        count = prompt.conversation_messages
        held = f"{count} message{'s' if count != 1 else ''}"
        seen = len(prompt.messages)
        return (
            f'You said: "{quote}". This conversation holds {held} '
            f"(I was shown the newest {seen}). I am the echo assistant: set CHATLOG_ASSISTANT=openai for a model."
        )

    async def complete(self, prompt: Prompt) -> str:
        return self.reply(prompt)

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        text = self.reply(prompt)
        start = 0
        while start < len(text):  # word by word, the way a model streams
            end = text.find(" ", start + 1)
            end = len(text) if end < 0 else end
            yield text[start:end]
            start = end

    async def aclose(self) -> None:
        return None


class OpenAIAssistant:
    """An OpenAI-compatible Chat Completions server. The client does not retry by itself: a
    client of chatlog retries with its Idempotency-Key, which never calls the model twice for a
    turn that has its reply."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self.model = settings.openai_model
        self.client = openai.AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key or "unset",  # local servers (Ollama, vLLM) need none
            timeout=openai.Timeout(settings.openai_read_timeout, connect=settings.openai_connect_timeout),
            max_retries=0,
        )

    def _messages(self, prompt: Prompt) -> list[Any]:
        # The Chat Completions "tool" role needs the id of a tool call chatlog does not record:
        # a tool's output goes to the model as a user message that says what it is.
        return [
            {"role": "user", "content": f"Tool result:\n{m.content}"}
            if m.role == "tool"
            else {"role": m.role, "content": m.content}
            for m in prompt.messages
        ]

    async def complete(self, prompt: Prompt) -> str:
        try:
            answer = await self.client.chat.completions.create(model=self.model, messages=self._messages(prompt))
            content = answer.choices[0].message.content
        except Exception as exc:
            raise _failure(exc) from exc
        if not isinstance(content, str):
            raise AssistantError("the assistant's answer holds no message text")
        return content

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        try:
            chunks = await self.client.chat.completions.create(
                model=self.model, messages=self._messages(prompt), stream=True
            )
            async with chunks:
                async for chunk in chunks:
                    if chunk.choices and isinstance(text := chunk.choices[0].delta.content, str) and text:
                        yield text
        except AssistantError:
            raise
        except Exception as exc:
            raise _failure(exc) from exc

    async def aclose(self) -> None:
        await self.client.close()


def _failure(exc: Exception) -> AssistantError:
    """What went wrong, in words fit for a client (no URLs, keys or bodies), logged in full."""
    log.warning("the assistant failed: %r", exc)
    if isinstance(exc, openai.APITimeoutError):
        return AssistantError("the assistant did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return AssistantError("the assistant could not be reached")
    if isinstance(exc, openai.APIStatusError):
        return AssistantError(f"the assistant answered HTTP {exc.status_code}")
    return AssistantError("the assistant's answer could not be read")


def make_assistant(settings: Settings) -> Assistant:
    if settings.assistant == "echo":
        return EchoAssistant()
    if settings.assistant == "openai":
        return OpenAIAssistant(settings)
    raise ValueError(f"unknown assistant {settings.assistant!r} (CHATLOG_ASSISTANT): echo or openai")
