"""The web page at GET / (a person drops photos and sees each one's scenes) and the security
headers every answer of the endpoint carries.

The page is plain files, package data in ``placesnet/serve/static/`` served as they are: no build
step and nothing from another origin, so it works on a machine with no internet. Its script
asks /model and /predict like any client (with the key, if the endpoint has one); the routes
that serve it are in http_api.py. :data:`CSP` lets a page load only from the endpoint's own
origin, and :class:`SecurityHeaders` puts it on every response."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The files GET /static/{name} serves, and their media types: a name not listed here is a 404.
STATIC = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
INDEX = "index.html"
_NEEDS_KEY = "__NEEDS_KEY__"  # in index.html: "yes" or "no", filled in when it is served

# Only this origin: scripts and styles from its own files (no inline code, no eval), requests to
# itself. Images also from blob: URLs, the previews the page makes of the user's own files (never
# fetched from anywhere). No plugins, no <base>, no form submission (the key field is read by the
# script, never sent in a URL), never framed by another site.
CSP = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
# The page's files are small: a browser asks again each time, so an updated endpoint never runs
# an old script against a new page.
NO_CACHE = {"Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return (files("placesnet.serve") / "static" / name).read_bytes()


def index_html(needs_key: bool) -> str:
    """The page, telling its script whether the endpoint wants a key, so that it asks for one
    before its first request instead of after a 401."""
    return _read(INDEX).decode().replace(_NEEDS_KEY, "yes" if needs_key else "no")


def static_file(name: str) -> tuple[bytes, str] | None:
    """(the bytes, the media type) of the page's file ``name``, or None if it has no such file."""
    if name not in STATIC:
        return None
    return _read(name), STATIC[name]


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP response but those of the paths in
    ``exempt`` (FastAPI's /docs and /redoc pages, which load their scripts from a CDN)."""

    def __init__(self, app: ASGIApp, exempt: tuple[str | None, ...] = ()) -> None:
        self.app = app
        self.exempt = {path for path in exempt if path}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")  # Serve's route prefix, when it is not "/"
        if scope["type"] != "http" or path.removeprefix(root) in self.exempt:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
