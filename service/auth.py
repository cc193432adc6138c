"""JWT secrets and development tokens."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt

from service.settings import Settings

SECRET_FILE = "jwt_secret"  # noqa: S105 (a file name, not a secret)


def jwt_secret(settings: Settings) -> str:
    """CHATLOG_JWT_SECRET, or the secret generated once into the data directory.

    The file is created exclusively, so `serve` and `token` started together still agree.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    path = Path(settings.data_dir).expanduser() / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def mint_token(secret: str, user: str, ttl_seconds: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl_seconds}, secret, algorithm="HS256")
