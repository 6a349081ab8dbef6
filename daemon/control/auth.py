"""Who may change the daemon through its server: the CLI with the Bearer token, or a browser
holding a session cookie it got through a one-time login link.

    streamv2v open  --POST /login-code (Bearer)-->  {"url": ".../login?code=C"}  (C: single use,
    browser GET /login?code=C  -->  303 to /, Set-Cookie: session (HttpOnly, SameSite=Strict)

The token never reaches a URL, a page or a log; a login code lives a minute and works once.
A state-changing call with the cookie must also carry an Origin header naming the server itself
(a page elsewhere cannot forge it), on top of SameSite=Strict. Only digests of codes and
sessions are kept. Used on the server's event loop only (no locks).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

COOKIE = "streamv2v_session"
CODE_TTL_S = 60.0
SESSION_TTL_S = 12 * 3600.0
_MAX_CODES = 16
_MAX_SESSIONS = 64


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _as_bytes(text: str) -> bytes:
    # Header values arrive as str decoded with surrogateescape; any str encodes this way, so a
    # non-ASCII header is a mismatch, never a TypeError.
    return text.encode("utf-8", "surrogatepass")


def session_cookie(cookie_header: str | None) -> str | None:
    """This server's session cookie in a Cookie header, read by hand: a general cookie parser
    warns in the log about every malformed cookie a client makes up."""
    for part in (cookie_header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


class Refused(Exception):
    """A state-changing call without valid credentials; ``status`` is 401 or 403."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Auth:
    """The token, the outstanding login codes and the browser sessions."""

    def __init__(
        self, token: str | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.token = token or secrets.token_urlsafe(32)
        self._token = _as_bytes(self.token)
        self._clock = clock
        self._codes: dict[bytes, float] = {}  # digest -> expiry
        self._sessions: dict[bytes, float] = {}

    # ------------------------------------------------------------------ the CLI's token
    def bearer_ok(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            _as_bytes(given.strip()), self._token
        )

    # ------------------------------------------------------------------ browser sessions
    def new_login_code(self) -> str:
        """A code for one login within CODE_TTL_S (the oldest codes give way past a few)."""
        code = secrets.token_urlsafe(24)
        self._remember(self._codes, _digest(code), CODE_TTL_S, _MAX_CODES)
        return code

    def redeem(self, code: str) -> str | None:
        """A new session id for a valid code, which is then spent; None otherwise."""
        expiry = self._codes.pop(_digest(code), None)
        if expiry is None or expiry < self._clock():
            return None
        session = secrets.token_urlsafe(32)
        self._remember(self._sessions, _digest(session), SESSION_TTL_S, _MAX_SESSIONS)
        return session

    def session_ok(self, cookie: str | None) -> bool:
        if not cookie:
            return False
        expiry = self._sessions.get(_digest(cookie))
        return expiry is not None and expiry >= self._clock()

    def _remember(self, table: dict[bytes, float], key: bytes, ttl: float, most: int) -> None:
        now = self._clock()
        for old in [k for k, expiry in table.items() if expiry < now]:
            del table[old]
        while len(table) >= most:
            del table[next(iter(table))]  # insertion order: the oldest first
        table[key] = now + ttl

    # ------------------------------------------------------------------ the decision
    def check_change(self, headers: Mapping[str, str], control_file: object) -> None:
        """Raise :class:`Refused` unless the request may change something: a valid Bearer
        token, or a valid session cookie with a same-origin Origin header."""
        if self.bearer_ok(headers.get("Authorization")):
            return
        if self.session_ok(session_cookie(headers.get("Cookie"))):
            origin, host = headers.get("Origin"), headers.get("Host")
            if origin is None or host is None or origin != f"http://{host}":
                raise Refused(
                    403,
                    "a browser call must come from this page (its Origin header must be "
                    f"http://{host}); reload the page",
                )
            return
        raise Refused(
            401,
            "missing or wrong token: send 'Authorization: Bearer TOKEN' with the token from "
            f"{control_file}, or log the page in with `streamv2v open`",
        )
