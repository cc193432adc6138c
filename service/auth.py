"""JWT secrets and development tokens."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from pathlib import Path

import jwt

from service.events import EventValidationError
from service.eventstore import validate_user_id
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


class TokenError(Exception):
    """A bearer token that does not identify a user."""


_HMAC_ALGORITHMS = ["HS256"]
_JWKS_ALGORITHMS = ["RS256", "ES256", "EdDSA"]


class TokenVerifier:
    """Verifies bearer JWTs: HS256 with the secret, or RS256/ES256/EdDSA against a JWKS URL.

    `exp` is required; `iss` and `aud` are checked when configured and ignored otherwise;
    `alg: none` and every algorithm not configured are refused (PyJWT checks the header's `alg`
    against the allowed list before it verifies anything). JWKS keys are cached by PyJWT's
    client, refetched when a token names an unknown `kid`.

    A client sends the same token with every request, and verifying it (PyJWT, HS256) costs
    about 70 us of CPU on the reference machine, a fifth of an append request's; so tokens that
    verified are remembered by their exact text, for at most `remember_seconds` and never past
    their `exp`, up to `remember_tokens` of them (the oldest go first). A token that fails is
    never remembered.
    """

    remember_tokens = 4096
    remember_seconds = 60.0

    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self._jwks = (
            jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300, timeout=5)
            if settings.jwt_jwks_url
            else None
        )
        self._secret = None if self._jwks else jwt_secret(settings)
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user, valid until)
        self._lock = threading.Lock()  # verifying may run in threads (JWKS)

    @property
    def uses_network(self) -> bool:
        """Whether verifying may fetch keys (then it runs off the event loop)."""
        return self._jwks is not None

    def remembered(self, token: str) -> str | None:
        """The user of a token that verified recently and has not expired since, else None."""
        hit = self._verified.get(token)
        if hit is None:
            return None
        if time.time() < hit[1]:
            return hit[0]
        with self._lock:
            self._verified.pop(token, None)
        return None

    async def user_of(self, authorization: str | None) -> str:
        """The user of an `Authorization: Bearer <token>` header value; TokenError if there is
        none or it does not verify. Verifying may fetch keys (JWKS): then it runs off the loop."""
        token = bearer(authorization)
        if token is None:
            raise TokenError("a bearer token is required (Authorization: Bearer <JWT>)")
        user = self.remembered(token)
        if user is not None:
            return user
        if self.uses_network:
            return await asyncio.to_thread(self._verify, token)
        return self._verify(token)

    def user_id(self, token: str) -> str:
        return self.remembered(token) or self._verify(token)

    def _verify(self, token: str) -> str:
        """The token's user, verified now (and remembered); TokenError if it does not verify."""
        try:
            if self._jwks is not None:
                key: object = self._jwks.get_signing_key_from_jwt(token).key
                algorithms = _JWKS_ALGORITHMS
            else:
                key, algorithms = self._secret, _HMAC_ALGORITHMS
            claims = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
                leeway=5,
            )
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid bearer token: {exc}") from exc
        sub: str = claims["sub"]  # present: PyJWT requires it; validate_user_id checks it is a str
        try:
            validate_user_id(sub)  # what the log takes as a user id
        except EventValidationError:
            raise TokenError(
                "the token's sub must be a string of 1 to 255 characters, without NUL or lone surrogates"
            ) from None
        until = min(float(claims["exp"]), time.time() + self.remember_seconds)
        with self._lock:
            self._verified[token] = (sub, until)
            while len(self._verified) > self.remember_tokens:
                del self._verified[next(iter(self._verified))]
        return sub


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, if any."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
