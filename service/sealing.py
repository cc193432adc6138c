"""Sealing: every conversation's content under a data key of its own, so that deleting is erasing.

Envelope encryption (DESIGN.md, "Erasure: crypto-shredding"), with `cryptography`'s AES-256-GCM:

- each stream (conversation) has a random 256-bit data key, stored in `data_keys` wrapped by the
  master key (sealed with the stream id as associated data, so a wrapped key cannot be moved
  to another stream);
- an event's content is its whole JSON, sealed under its stream's data key with a fresh random
  nonce and the event's identity (event id and type) as associated data, so a sealed value
  cannot be moved to another row; ids, type, version, position and time stay in clear;
- the master key lives outside the database: `CHATLOG_MASTER_KEY`, or a key generated once into
  the data directory (like the JWT secret). `CHATLOG_MASTER_KEY` may list older keys after the
  current one, comma-separated: they unwrap, the first one wraps (`chatlog keys rotate`).

Destroying a stream's row in `data_keys` erases its content: no copy of the data key is left
in the database, and the master key alone opens nothing.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.citus import is_distributed
from service.settings import Settings, SettingsError

MASTER_KEY_FILE: Final = "master.key"
NONCE_BYTES: Final = 12
_DATA_KEY_AAD: Final = b"chatlog data key\x00"


class MasterKeyError(SettingsError):
    """The master key is missing, malformed, or not the one the database's keys are wrapped by."""


class SealingError(Exception):
    """A sealed value or a wrapped key that does not open: tampered with, or another key's."""


def master_key_id(key: bytes) -> str:
    """A short public name of a master key, stored beside every key it wraps (never the key)."""
    return hashlib.sha256(b"chatlog master key id\x00" + key).hexdigest()[:16]


def new_master_key() -> str:
    """A new master key, as `CHATLOG_MASTER_KEY` takes it (URL-safe base64 of 32 random bytes)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def parse_master_keys(text: str) -> list[bytes]:
    keys = []
    for item in text.split(","):
        item = item.strip()
        try:
            key = base64.urlsafe_b64decode(item.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            key = b""
        if len(key) != 32:
            raise MasterKeyError(
                "CHATLOG_MASTER_KEY must be the URL-safe base64 of 32 bytes (`chatlog keys new` prints one), "
                "or several such keys separated by commas, the current one first"
            )
        keys.append(key)
    return keys


def master_keys(settings: Settings) -> tuple[list[bytes], str]:
    """The configured master keys (current first) and where they came from, for messages."""
    if settings.master_key:
        return parse_master_keys(settings.master_key), "CHATLOG_MASTER_KEY"
    path = Path(settings.data_dir).expanduser() / MASTER_KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return parse_master_keys(path.read_text().strip()), f"the key file {path} (CHATLOG_MASTER_KEY is not set)"


def _create_key_file(path: Path) -> None:
    """A new key, whole and on disk before anyone reads it: written and fsynced under a name of its
    own, then linked into place (link fails if another process got there first: its key stands)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".master.key.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_master_key())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Keyring:
    """The master keys and the data keys in use, unwrapped once and kept in memory (bounded).

    The memory of unwrapped keys is keyed by the wrapped form read with the events, so a reader
    always asks the database whether a stream's key still exists: a key erased by another
    process is never used to open anything again.
    """

    def __init__(self, keys: Sequence[bytes], *, source: str = "the master key", cache_size: int = 65_536) -> None:
        if not keys:
            raise MasterKeyError("no master key")
        self.source = source
        self._masters = {master_key_id(k): AESGCM(k) for k in keys}
        self.current_id = master_key_id(keys[0])
        self.cache_size = cache_size
        self._opened: collections.OrderedDict[bytes, AESGCM] = collections.OrderedDict()
        self._writing: collections.OrderedDict[int, AESGCM] = collections.OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        keys, source = master_keys(settings)
        return cls(keys, source=source)

    @property
    def master_ids(self) -> frozenset[str]:
        return frozenset(self._masters)

    # Data keys

    def new_data_key(self, stream_id: uuid.UUID) -> tuple[AESGCM, bytes]:
        """A fresh data key for a stream, and its wrapped form (under the current master key)."""
        key = AESGCM.generate_key(bit_length=256)
        return AESGCM(key), self.wrap(stream_id, key)

    def new_stream_key(self, stream_id: uuid.UUID) -> tuple[AESGCM, tuple[bytes, str]]:
        """A fresh data key as a new stream's append carries it: with its wrapped form and the
        id of the master key that wrapped it."""
        aead, wrapped = self.new_data_key(stream_id)
        return aead, (wrapped, self.current_id)

    def wrap(self, stream_id: uuid.UUID, key: bytes, master_id: str | None = None) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        master = self._masters[master_id or self.current_id]
        return nonce + master.encrypt(nonce, key, _DATA_KEY_AAD + stream_id.bytes)

    def unwrap_raw(self, stream_id: uuid.UUID, wrapped: bytes, master_id: str) -> bytes:
        master = self._masters.get(master_id)
        if master is None:
            raise SealingError(
                f"a data key is wrapped by master key {master_id}, which {self.source} does not hold; "
                f"it holds {', '.join(sorted(self._masters))}"
            )
        try:
            return master.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _DATA_KEY_AAD + stream_id.bytes)
        except InvalidTag:
            raise SealingError(
                f"the data key of stream {stream_id} does not open under master key {master_id}"
            ) from None

    def unwrap(self, stream_id: uuid.UUID, wrapped: bytes, master_id: str) -> AESGCM:
        """The data key a row of `data_keys` holds (remembered by its wrapped form)."""
        aead = self._opened.get(wrapped)
        if aead is not None:
            self._opened.move_to_end(wrapped)
            return aead
        aead = AESGCM(self.unwrap_raw(stream_id, wrapped, master_id))
        self._opened[wrapped] = aead
        if len(self._opened) > self.cache_size:
            self._opened.popitem(last=False)
        return aead

    def writing_key(self, stream_id: uuid.UUID) -> AESGCM | None:
        """The data key this process last appended to the stream with, if it remembers it."""
        aead = self._writing.get(stream_id.int)
        if aead is not None:
            self._writing.move_to_end(stream_id.int)
        return aead

    def remember_writing_key(self, stream_id: uuid.UUID, aead: AESGCM) -> None:
        self._writing[stream_id.int] = aead
        self._writing.move_to_end(stream_id.int)
        if len(self._writing) > self.cache_size:
            self._writing.popitem(last=False)

    def forget_writing_key(self, stream_id: uuid.UUID) -> None:
        self._writing.pop(stream_id.int, None)


# Sealed values


def event_aad(event_id: uuid.UUID, type_: str) -> bytes:
    return event_id.bytes + type_.encode()


def seal(aead: AESGCM, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, associated)


def open_sealed(aead: AESGCM, sealed: bytes, associated: bytes) -> bytes:
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SealingError("a sealed value does not open: it was changed, or moved from another row") from None


def idempotency_digest(user_id: str, key: str) -> bytes:
    """How the log finds an Idempotency-Key again without holding it: a digest with its user."""
    return hashlib.sha256(b"chatlog idempotency key\x00" + user_id.encode() + b"\x00" + key.encode()).digest()


# The master keys the database's data keys are wrapped by: a loose index scan of `data_keys_master`
# (one probe per distinct key, however many data keys there are).
_MASTER_IDS = """
WITH RECURSIVE ids AS (
    (SELECT master_id FROM data_keys ORDER BY master_id LIMIT 1)
    UNION ALL
    SELECT (SELECT master_id FROM data_keys WHERE master_id > ids.master_id ORDER BY master_id LIMIT 1)
    FROM ids WHERE ids.master_id IS NOT NULL
)
SELECT master_id FROM ids WHERE master_id IS NOT NULL
"""


async def check_master_keys(conn: asyncpg.Connection, keyring: Keyring) -> None:
    """Refuse to go on with a master key that cannot open the database's data keys: a wrong or
    missing key stops the command at once, with words, instead of failing every request."""
    # On Citus a recursive CTE must stay on one shard: there each shard lists its own ids.
    ids = "SELECT DISTINCT master_id FROM data_keys" if await is_distributed(conn) else _MASTER_IDS
    in_use = [r[0] for r in await conn.fetch(ids)]
    missing = [master_id for master_id in in_use if master_id not in keyring.master_ids]
    if missing:
        raise MasterKeyError(
            f"the database's conversations are sealed under master key {', '.join(missing)}, and {keyring.source} "
            f"is key {keyring.current_id}: set CHATLOG_MASTER_KEY to the key this database was sealed with "
            "(while `chatlog keys rotate` moves to a new key, give both: new,old)"
        )
    for master_id in in_use:  # the ids match: prove it by opening one key of each
        row = await conn.fetchrow("SELECT stream_id, wrapped FROM data_keys WHERE master_id = $1 LIMIT 1", master_id)
        if row is not None:
            try:
                keyring.unwrap_raw(row[0], row[1], master_id)
            except SealingError as exc:
                raise MasterKeyError(f"{keyring.source}: {exc}") from None


async def rotate(conn: asyncpg.Connection, keyring: Keyring, batch: int = 1000) -> int:
    """Re-wrap every data key not under the current master key with it, in short transactions
    (appends and erasures go on meanwhile); events are not touched. Returns how many moved."""
    if await is_distributed(conn):
        return await _rotate_by_user(conn, keyring, batch)
    moved = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT stream_id, wrapped, master_id FROM data_keys WHERE master_id <> $1 "
                "ORDER BY stream_id LIMIT $2 FOR UPDATE",
                keyring.current_id,
                batch,
            )
            if not rows:
                return moved
            moved += await _rewrap(conn, keyring, rows)


async def _rewrap(conn: asyncpg.Connection, keyring: Keyring, rows: list[asyncpg.Record]) -> int:
    await conn.execute(
        "UPDATE data_keys AS k SET wrapped = n.wrapped, master_id = $3 "
        "FROM unnest($1::uuid[], $2::bytea[]) AS n(stream_id, wrapped) WHERE k.stream_id = n.stream_id",
        [r[0] for r in rows],
        [keyring.wrap(r[0], keyring.unwrap_raw(r[0], r[1], r[2])) for r in rows],
        keyring.current_id,
    )
    return len(rows)


async def _rotate_by_user(conn: asyncpg.Connection, keyring: Keyring, batch: int) -> int:
    """`rotate` on Citus, where rows are locked only on one shard: a user's keys a transaction."""
    moved = 0
    while True:
        users = await conn.fetch(
            "SELECT DISTINCT user_id FROM data_keys WHERE master_id <> $1 LIMIT $2", keyring.current_id, batch
        )
        if not users:
            return moved
        for (user_id,) in users:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT stream_id, wrapped, master_id FROM data_keys WHERE user_id = $1 "
                    "AND master_id <> $2 ORDER BY stream_id FOR UPDATE",
                    user_id,
                    keyring.current_id,
                )
                for stream_id, wrapped, master_id in rows:  # statements on the user's shard alone
                    await conn.execute(
                        "UPDATE data_keys SET wrapped = $3, master_id = $4 WHERE user_id = $1 AND stream_id = $2",
                        user_id,
                        stream_id,
                        keyring.wrap(stream_id, keyring.unwrap_raw(stream_id, wrapped, master_id)),
                        keyring.current_id,
                    )
                moved += len(rows)
