"""The chat page: `GET /` and its assets under `/assets/`, files of this package (service/page/).

The files are read once, at startup, into memory with a gzipped copy each: the page is small
(about 100 KB gzipped in all), and an asset route that only looks names up in a dict cannot be
led outside the folder. Every answer carries a Content-Security-Policy that allows only this
origin ('self'), no inline script and no framing; a message's Markdown is sanitised by the page
itself (DOMPurify), and the policy is the second wall behind it.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from pathlib import Path
from typing import Annotated, Any, Final

from litestar import Request, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import PathParameter
from litestar.response import Response

ROOT: Final = Path(__file__).resolve().parent / "page"

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain",
}


class Asset:
    """One file, as sent: its bytes, gzipped bytes, type and ETag."""

    __slots__ = ("body", "etag", "gzipped", "media_type")

    def __init__(self, body: bytes, media_type: str) -> None:
        self.body = body
        self.gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def load_assets(root: Path = ROOT) -> dict[str, Asset]:
    """Every file under `root/assets` by its path below it, and the page itself as ''."""
    assets = {"": Asset((root / "index.html").read_bytes(), _TYPES[".html"])}
    for path in sorted((root / "assets").rglob("*")):
        if path.is_file():
            media_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            assets[path.relative_to(root / "assets").as_posix()] = Asset(path.read_bytes(), media_type)
    return assets


def _send(request: Request[Any, Any, State], asset: Asset, cache: str) -> Response[bytes]:
    headers = {**_SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": cache, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(b"", status_code=304, headers=headers)
    body = asset.body
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = asset.gzipped, "gzip"
    return Response(body, media_type=asset.media_type, headers=headers)


@get("/", include_in_schema=False, sync_to_thread=False)
def page(request: Request[Any, Any, State], state: State) -> Response[bytes]:
    """The chat page (always revalidated, so a new release's page is picked up at once)."""
    return _send(request, state.page_assets[""], "no-cache")


@get("/assets/{name:path}", include_in_schema=False, sync_to_thread=False)
def asset(request: Request[Any, Any, State], state: State, name: Annotated[str, PathParameter()]) -> Response[bytes]:
    found: Asset | None = state.page_assets.get(name.lstrip("/")) if name.strip("/") else None
    if found is None:
        raise NotFoundException("no such asset")
    return _send(request, found, "no-cache")


ROUTES = [page, asset]
