"""Token verification: HS256, a JWKS URL (RS256, ES256, EdDSA) served on loopback, iss and aud."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from service.auth import TokenError, TokenVerifier
from service.settings import Settings

SECRET = "s" * 64


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture(scope="module")
def jwks_url(keys: dict[str, Any]) -> Iterator[str]:
    """A JWKS document on a loopback HTTP server, counting how often it is fetched."""
    to_jwk = {"RS256": RSAAlgorithm.to_jwk, "ES256": ECAlgorithm.to_jwk, "EdDSA": OKPAlgorithm.to_jwk}
    jwks = {"keys": [{**json.loads(to_jwk[alg](k.public_key())), "kid": alg, "alg": alg} for alg, k in keys.items()]}
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        fetches = 0

        def do_GET(self) -> None:
            Handler.fetches += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/jwks.json"
    server.shutdown()
    server.server_close()


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 60, **extra}


def verifier(tmp_path: Path, **settings: Any) -> TokenVerifier:
    return TokenVerifier(Settings(data_dir=tmp_path, **settings))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwks_tokens_of_each_algorithm_verify(tmp_path: Path, keys: dict[str, Any], jwks_url: str, alg: str) -> None:
    v = verifier(tmp_path, jwt_jwks_url=jwks_url)
    assert v.user_id(jwt.encode(claims(), keys[alg], algorithm=alg, headers={"kid": alg})) == "alice"


def test_jwks_refuses_hs256_alg_none_and_a_key_it_does_not_know(
    tmp_path: Path, keys: dict[str, Any], jwks_url: str
) -> None:
    v = verifier(tmp_path, jwt_jwks_url=jwks_url)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "RS256"}),
        jwt.encode(claims(), None, algorithm="none", headers={"kid": "RS256"}),
        jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "RS256"}),
        jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "unknown"}),
        jwt.encode({"sub": "alice"}, keys["RS256"], algorithm="RS256", headers={"kid": "RS256"}),
    ]
    for token in bad:
        with pytest.raises(TokenError):
            v.user_id(token)


def test_hs256_mode_refuses_asymmetric_and_none_tokens(tmp_path: Path, keys: dict[str, Any]) -> None:
    v = verifier(tmp_path, jwt_secret=SECRET)
    assert v.user_id(jwt.encode(claims(), SECRET, algorithm="HS256")) == "alice"
    for token in (
        jwt.encode(claims(), keys["RS256"], algorithm="RS256"),
        jwt.encode(claims(), None, algorithm="none"),
        jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"),
    ):
        with pytest.raises(TokenError):
            v.user_id(token)


def test_issuer_and_audience_are_checked_only_when_configured(tmp_path: Path) -> None:
    plain = verifier(tmp_path, jwt_secret=SECRET)
    anything = jwt.encode(claims(iss="elsewhere", aud="someone-else"), SECRET, algorithm="HS256")
    assert plain.user_id(anything) == "alice"

    strict = verifier(tmp_path, jwt_secret=SECRET, jwt_issuer="https://issuer.example", jwt_audience="chatlog")
    good = jwt.encode(claims(iss="https://issuer.example", aud="chatlog"), SECRET, algorithm="HS256")
    assert strict.user_id(good) == "alice"
    for wrong in (
        claims(iss="https://issuer.example", aud="other"),
        claims(iss="https://other.example", aud="chatlog"),
        claims(aud="chatlog"),
        claims(iss="https://issuer.example"),
    ):
        with pytest.raises(TokenError):
            strict.user_id(jwt.encode(wrong, SECRET, algorithm="HS256"))
