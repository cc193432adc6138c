"""Opaque, signed list cursors.

A cursor is `base64url(payload).base64url(hmac)`: the payload names the list it belongs to, the
user (as a digest) and the keyset position after which the next page starts. A cursor that was
altered, or that belongs to another user or another list, is refused as a validation error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from typing import Any

import msgspec

from service.errors import BadRequest


class _Payload(msgspec.Struct, array_like=True):
    scope: str  # which list (and its order and filters)
    user: str  # a digest of the user id
    after: list[Any]  # the keyset values of the last item served


class Cursors:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"chatlog cursor key\x00" + secret.encode()).digest()

    def encode(self, scope: str, user: str, after: list[Any]) -> str:
        payload = msgspec.json.encode(_Payload(scope, _user_digest(user), after))
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:16]
        return f"{_b64(payload)}.{_b64(mac)}"

    def decode(self, cursor: str, scope: str, user: str) -> list[Any]:
        try:
            encoded_payload, encoded_mac = cursor.split(".")
            payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
        except (ValueError, binascii.Error):
            raise BadRequest("the cursor is not valid", field="cursor") from None
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, expected):
            raise BadRequest("the cursor is not valid", field="cursor")
        decoded = msgspec.json.decode(payload, type=_Payload)
        if decoded.scope != scope or decoded.user != _user_digest(user):
            raise BadRequest("the cursor belongs to another list", field="cursor")
        return decoded.after


def messages_scope(conversation_id: uuid.UUID, order: str, *, tree: bool = False) -> str:
    """The list that a cursor over a conversation's messages belongs to (HTTP and MCP alike)."""
    return f"messages:{conversation_id}:{order}:{'tree' if tree else 'branch'}"


def _user_digest(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or len(text) > 2048 or not text.isascii():
        raise ValueError("bad cursor part")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # the last character's spare bits: one cursor, one spelling
        raise ValueError("non-canonical cursor part")
    return data
