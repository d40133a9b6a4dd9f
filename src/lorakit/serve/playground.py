"""The playground page at `/`: pick an adapter or a blend, type a prompt, watch the answer stream.

The page is three static files (HTML, plain JavaScript, CSS) shipped as package data in
``lorakit/serve/static/``: no build step and nothing fetched from elsewhere, so it works on a
machine without internet. It talks to the server only through the public API
(`/health`, `/v1/models`, `/v1/completions` with ``"stream": true`` and
`/v1/classifications`), with the API key the user types (kept in the tab's sessionStorage).
The page and its files hold no data, so they load without a key; the API gate lets exactly
these paths through (GET and HEAD) and every API call still needs the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..extras import import_optional

PURPOSE = "lorakit serve"
PAGE_PATH = "/"
PAGE_FILE = "index.html"
ASSET_PREFIX = "/playground/"
ASSET_FILES = ("playground.js", "playground.css")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page runs only its own script and style and talks only to this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new lorakit's page replaces the old one at once
}


@dataclass(frozen=True)
class StaticFile:
    """One file of the page, read once when the app is built.

    Attributes:
        url_path: Where it is served, e.g. "/" or "/playground/playground.js".
        body: The file's bytes.
        media_type: Its Content-Type.
    """

    url_path: str
    body: bytes
    media_type: str


def playground_files() -> tuple[StaticFile, ...]:
    """The page's files from the package data: index.html at `/`, the others under /playground/.

    Raises:
        FileNotFoundError: A file is missing from the installed package (a broken install).
    """
    static = resources.files("lorakit.serve").joinpath("static")
    served = [(PAGE_PATH, PAGE_FILE)] + [(ASSET_PREFIX + name, name) for name in ASSET_FILES]
    files = []
    for url_path, name in served:
        suffix = name[name.rfind(".") :]
        files.append(StaticFile(url_path, static.joinpath(name).read_bytes(), MEDIA_TYPES[suffix]))
    return tuple(files)


def mount_playground(app: Any) -> frozenset[str]:
    """Add a GET route per file of the page to a Starlette/FastAPI app.

    Args:
        app: The server's app.

    Returns:
        The paths added: public, the API gate lets them through without a key.
    """
    responses = import_optional("starlette.responses", "serve", PURPOSE)
    files = playground_files()
    for file in files:
        app.add_route(file.url_path, _endpoint(responses, file), methods=["GET"])
    return frozenset(file.url_path for file in files)


def _endpoint(responses: Any, file: StaticFile) -> Any:
    async def send_file(request: Any) -> Any:
        return responses.Response(file.body, media_type=file.media_type, headers=SECURITY_HEADERS)

    return send_file
