"""What every request to the control-plane server goes through, whatever its route.

- The Host header, when sent, must name this machine (a web page cannot reach the server
  through DNS rebinding); HTTP/1.0 clients without one (OpenCV, OBS) are let in.
- Methods no route has (OPTIONS, TRACE, PUT, lowercase ``get``...) get 405 before anything else.
- A state-changing call (POST) is authorized before its body is read; a refusal closes the
  connection rather than read what the client still sends.
- Every error is a JSON ``{"error": reason}``; an unexpected exception is logged once per kind
  with its traceback and answered 500 without one. A client that hangs up is one DEBUG line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from daemon.config import is_loopback
from daemon.control.auth import Auth, Refused

log = logging.getLogger("streamv2v.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A client of a long response (stream, events) that takes nothing for this long is dropped.
CLIENT_TIMEOUT_S = 10.0
#: Methods some route answers; anything else is 405 at once.
METHODS = frozenset({"GET", "HEAD", "POST"})
#: Methods that read only (everything else needs the token or a session).
SAFE_METHODS = frozenset({"GET", "HEAD"})

#: The app's Auth (absent: a preview-only server, which changes nothing) and the control file
#: its 401s point to.
AUTH_KEY = web.AppKey("auth", Auth)
CONTROL_FILE_KEY = web.AppKey("control_file", object)


class ApiError(Exception):
    """An answer other than 200, with the reason the client is shown."""

    def __init__(self, status: int, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


def json_reply(payload: Any, status: int = 200) -> web.Response:
    body = (json.dumps(payload, default=str) + "\n").encode()
    return web.Response(body=body, status=status, content_type="application/json")


def error_reply(status: int, reason: str, *, close: bool = False) -> web.Response:
    response = json_reply({"error": reason}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="streamv2v"'
    elif status == 405:
        response.headers["Allow"] = ", ".join(sorted(METHODS))
    if close:
        response.force_close()
    return response


def _endpoints(request: web.Request) -> str:
    seen = set()
    for route in request.app.router.routes():
        path = getattr(route.resource, "canonical", None)
        if route.method != "HEAD" and path:
            seen.add(f"{route.method} {path}")
    return ", ".join(sorted(seen))


#: A Host header: a bracketed IPv6 literal or a name / IPv4 address, then an optional port.
_HOST = re.compile(r"(?:\[([0-9A-Fa-f:.]{2,45})\]|([A-Za-z0-9.-]{1,253}))(?::[0-9]{1,5})?")

_logged_kinds: set[tuple[str, str]] = set()


def _log_once(request: web.Request, err: BaseException) -> None:
    kind = (type(err).__name__, request.path)
    if kind in _logged_kinds:
        log.error("control plane: %s %s failed again (%s)", request.method, request.path, err)
        return
    _logged_kinds.add(kind)
    log.error("control plane: %s %s failed", request.method, request.path, exc_info=err)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host and method checks first, then authorization of changes, then the route; any
    failure becomes a JSON 4xx (or, for a bug, a 500 that shows no traceback)."""
    has_body = request.body_exists
    try:
        if request.version not in ((1, 0), (1, 1)) or not request.raw_path.startswith("/"):
            raise ApiError(400, "send HTTP/1.x with a path as the target (this is no proxy)")
        host = request.headers.get("Host")
        if host is not None:
            name = _HOST.fullmatch(host)
            if name is None:
                raise ApiError(400, "malformed Host header", close=True)
            if not is_loopback(name.group(1) or name.group(2)):
                raise ApiError(403, "the Host header must name this machine", close=has_body)
        if request.method not in METHODS:
            raise ApiError(
                405, f"{request.method[:16]!r} is not a method this server answers", close=True
            )
        if request.method not in SAFE_METHODS:
            auth = request.app.get(AUTH_KEY)
            if auth is None:
                raise ApiError(405, f"{request.method} is not allowed here", close=has_body)
            try:
                auth.check_change(request.headers, request.app[CONTROL_FILE_KEY])
            except Refused as refused:
                raise ApiError(refused.status, refused.reason, close=has_body) from None
        return await handler(request)
    except ApiError as err:
        return error_reply(err.status, err.reason, close=err.close)
    except web.HTTPException as err:
        if err.status < 400:
            raise  # redirects
        if err.status == 404:
            reason = f"no endpoint {request.path[:200]}; there are: {_endpoints(request)}"
        elif err.status == 405:
            reason = f"{request.method} is not allowed on {request.path[:200]}"
        else:
            reason = err.reason
        return error_reply(err.status, reason, close=has_body)
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client left: aiohttp ends the connection (quietly, see QuietServerLog)
    except Exception as err:
        _log_once(request, err)
        return error_reply(500, "internal error (the daemon's log has the details)", close=True)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response: never cached, never sniffed into another type, never framed."""
    headers = response.headers
    headers["Server"] = "streamv2v"  # not the library's name and version
    headers.setdefault("Cache-Control", "no-store")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")


async def send_part(request: web.Request, response: web.StreamResponse, data: bytes) -> bool:
    """Write one part of a long response; False when the client is gone: it left, or took
    nothing for CLIENT_TIMEOUT_S (a frozen viewer, a dead peer), and is then cut off."""
    try:
        # write() returns once the socket's buffer has room again.
        await asyncio.wait_for(response.write(data), CLIENT_TIMEOUT_S)
        return True
    except asyncio.TimeoutError:
        log.debug(
            "control plane: %s took nothing for %g s: dropped", request.remote, CLIENT_TIMEOUT_S
        )
        if request.transport is not None:
            request.transport.abort()  # a plain close would wait for it to take the buffer
    except ConnectionError as err:
        log.debug("control plane: %s left (%s)", request.remote, type(err).__name__)
    return False


# --------------------------------------------------------------------------- logs
_CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError, asyncio.TimeoutError)


class QuietServerLog(logging.LoggerAdapter):
    """aiohttp's server logger: malformed requests and vanished clients are everyday events on
    a server, worth one DEBUG line without a traceback; anything else is logged in full."""

    def __init__(self) -> None:
        super().__init__(log, {})

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kw: Any) -> None:
        self._one_line(logging.DEBUG, msg, args, exc_info)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        err = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(err, _CLIENT_FAULTS):
            self._one_line(logging.DEBUG, msg, args, err)
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kw)

    def _one_line(self, level: int, msg: object, args: tuple, exc_info: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        err = exc_info if isinstance(exc_info, BaseException) else None
        suffix = f": {type(err).__name__}" if err is not None else ""
        self.logger.log(level, "control plane: %s%s", text, suffix)


class DebugAccessLog(AbstractAccessLogger):
    """One DEBUG line per request: method, path (never the query: a login code lives there)
    and status; never a header (Authorization, Cookie)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "control plane: %s %s %s (%.1f ms)",
            request.method[:16],
            request.path[:200],
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def quiet_loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: a transport error of a departed client is DEBUG."""
    err = context.get("exception")
    if isinstance(err, (ConnectionError, asyncio.TimeoutError)):
        log.debug("control plane: %s (%s)", context.get("message"), type(err).__name__)
        return
    loop.default_exception_handler(context)
