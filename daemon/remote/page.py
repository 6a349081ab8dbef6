"""The page on ``serve``: a browser on any machine publishes its camera by WHIP and watches the
styled stream (``/``), or only watches it by WHEP (``/view``: the URL for an OBS Browser Source).

The login is the control page's (daemon/control/auth.py): a one-time code asked for with the
token, redeemed by the browser for an HttpOnly, SameSite=Strict session cookie; the token never
reaches a URL or the page.

    POST /login-code   (Bearer)  -> {"url": ".../login?code=C", "view_url": "...&next=/view"}
    GET  /login?code=C[&next=/view]  -> the cookie, 303 to the page (a browser that already
                                        holds a session is let through: an OBS Browser Source
                                        reloads its URL, whose code is spent)
    GET  /session                  -> {"authenticated": bool, "token_required": bool}

The files are read once and served from memory (no request path reaches the file system).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from daemon.control.auth import CODE_TTL_S, COOKIE, SESSION_TTL_S, session_cookie
from daemon.remote.whip import Gate

STATIC_DIR = Path(__file__).parent / "static"
_HTML = "text/html; charset=utf-8"
_JS = "text/javascript; charset=utf-8"
_FILES = {
    "/": ("publish.html", _HTML),
    "/view": ("view.html", _HTML),
    "/publish.js": ("publish.js", _JS),
    "/view.js": ("view.js", _JS),
    "/whip.js": ("whip.js", _JS),
    "/serve.css": ("serve.css", "text/css; charset=utf-8"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
#: Only this origin's files and connections; the camera's stream goes into a video element.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_PAGES = {"/", "/view"}


def add_page(app: web.Application, gate: Gate) -> None:
    """The page's files, its login and its session probe."""
    for path, (name, kind) in _FILES.items():
        app.router.add_get(path, _static((STATIC_DIR / name).read_bytes(), kind))
    login = Login(gate)
    app.router.add_post("/login-code", login.code)
    app.router.add_get("/login", login.redeem, allow_head=False)  # a HEAD must not spend a code
    app.router.add_get("/session", login.session, allow_head=False)


def _static(body: bytes, kind: str):
    headers = {"Content-Type": kind, "Cache-Control": "no-cache"}
    if kind == _HTML:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return serve


class Login:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def code(self, request: web.Request) -> web.Response:
        auth = self.gate.auth
        if not self.gate.open and not auth.bearer_ok(request.headers.get("Authorization")):
            return web.json_response(
                {"error": "a login link is given for the token only (Authorization: Bearer)"},
                status=401,
            )
        code = auth.new_login_code()
        origin = _origin(request)
        return web.json_response(
            {
                "url": f"{origin}/login?code={code}",
                "view_url": f"{origin}/login?code={code}&next=/view",
                "expires_in_s": CODE_TTL_S,
            }
        )

    async def redeem(self, request: web.Request) -> web.StreamResponse:
        target = request.query.get("next", "/")
        if target not in _PAGES:
            target = "/"
        auth = self.gate.auth
        if auth.session_ok(session_cookie(request.headers.get("Cookie"))):
            raise web.HTTPSeeOther(target)
        session = auth.redeem(request.query.get("code", ""))
        if session is None:
            return web.json_response(
                {"error": "this login link was used already or has expired: ask for a new one"},
                status=403,
            )
        response = web.HTTPSeeOther(target)  # the code leaves the address bar
        response.set_cookie(
            COOKIE, session, max_age=int(SESSION_TTL_S), path="/", httponly=True, samesite="Strict"
        )
        raise response

    async def session(self, request: web.Request) -> web.Response:
        ok = self.gate.open or self.gate.auth.session_ok(
            session_cookie(request.headers.get("Cookie"))
        )
        return web.json_response({"authenticated": ok, "token_required": not self.gate.open})


def _origin(request: web.Request) -> str:
    """This server as the socket the request came in on names it (the link leads back here)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return f"http://{request.host}"
    host, port = sockname[0], sockname[1]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"
