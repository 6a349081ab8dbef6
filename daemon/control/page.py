"""The control page: static HTML, CSS and JavaScript shipped in the package (no build step, no
CDN), read once when the server is built and served from memory (no path ever reaches the
file system). The page itself holds no secret, so it loads without a session; what it may
change is decided per call (see auth.py).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from daemon.control.guard import json_reply

STATIC_DIR = Path(__file__).parent / "static"

# Only this origin's own files, no inline script or style, never inside a frame.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),  # browsers ask for it whatever the page says
}


def add_page_routes(app: web.Application, *, control: bool) -> None:
    """The page's files; on a server without the control API (preview only) also a /session
    that says so, so the page shows the output alone."""
    for path, (name, kind) in _FILES.items():
        app.router.add_get(path, _static((STATIC_DIR / name).read_bytes(), kind))
    if not control:
        app.router.add_get("/session", _no_control)


def _static(body: bytes, kind: str):
    headers = {"Content-Type": kind}
    if kind.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return serve


async def _no_control(request: web.Request) -> web.Response:
    return json_reply({"control": False, "authenticated": False})
