"""The control API's routes on the control-plane server (the endpoints and JSON of the API the
CLI has always used), and the browser's way in: one-time login codes and the session.

    GET  /status   /presets   /metrics   /session         (no token: they only read)
    POST /preset {"name": NAME|"next"|"prev"}   POST /reload   POST /login-code
    GET  /login?code=CODE   -> the session cookie, and a redirect to the page

Each handler is a short coroutine; every call into the daemon runs in a worker thread (it
takes the daemon's locks), and concurrent reads of the status share one call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from daemon.control.auth import CODE_TTL_S, COOKIE, SESSION_TTL_S, Auth, session_cookie
from daemon.control.bounded_json import MAX_BODY_BYTES, BodyError, parse_body
from daemon.control.guard import AUTH_KEY, CONTROL_FILE_KEY, ApiError, json_reply
from daemon.styles.presets import BrokenPreset, UnknownPreset

#: A body must arrive within this long once its headers did (a slow sender is cut off).
BODY_TIMEOUT_S = 5.0
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_PRESET_BODY = 'expected a JSON object {"name": PRESET|"next"|"prev"}'


class ControlApi(Protocol):
    """What the daemon offers the API (every method may take the daemon's locks)."""

    def status(self) -> dict[str, Any]: ...

    def preset_listing(self) -> dict[str, Any]: ...

    def select_preset(self, target: str, reason: str) -> str: ...

    def reload_presets(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...


class SharedRead:
    """A blocking read of the daemon (status, listing) run in a worker thread, whose result
    concurrent callers share: 200 simultaneous GETs of /status cost one status() call. A caller
    only joins a call that started after the last change made through this server, so a read
    right after a switch never sees the state from before it."""

    def __init__(self, read: Callable[[], Any], run: Callable[..., Awaitable[Any]]) -> None:
        self._read, self._run = read, run
        self._inflight: tuple[float, asyncio.Future[Any]] | None = None
        self.changed_at = 0.0

    async def __call__(self) -> Any:
        inflight = self._inflight
        if inflight is None or inflight[0] < self.changed_at or inflight[1].done():
            inflight = (time.monotonic(), asyncio.ensure_future(self._run(self._read)))
            self._inflight = inflight
        return await asyncio.shield(inflight[1])


class ControlRoutes:
    """The API's handlers over a :class:`ControlApi` (the daemon)."""

    def __init__(self, api: ControlApi, auth: Auth, control_file: Path | None) -> None:
        self.api, self.auth, self.control_file = api, auth, control_file
        self._executor: ThreadPoolExecutor | None = None  # while the server runs
        # Looked up at each call: the method the API object has then is the one that runs.
        self.status = SharedRead(lambda: self.api.status(), self._call)
        self.listing = SharedRead(lambda: self.api.preset_listing(), self._call)

    def add_to(self, app: web.Application) -> None:
        app[AUTH_KEY] = self.auth
        app[CONTROL_FILE_KEY] = self.control_file
        router = app.router
        router.add_get("/status", self.get_status)
        router.add_get("/presets", self.get_presets)
        router.add_get("/metrics", self.get_metrics)
        router.add_get("/session", self.get_session)
        router.add_get("/login", self.login, allow_head=False)  # a HEAD must not spend a code
        router.add_post("/preset", self.post_preset)
        router.add_post("/reload", self.post_reload)
        router.add_post("/login-code", self.post_login_code)
        app.cleanup_ctx.append(self._threads)

    async def _threads(self, app: web.Application) -> AsyncIterator[None]:
        # Daemon calls take the daemon's locks: in threads of their own, off the loop.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="control-api")
        yield
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None

    def _changed(self) -> None:
        self.status.changed_at = self.listing.changed_at = time.monotonic()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            raise ApiError(409, "the server is stopping")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ reads
    async def get_status(self, request: web.Request) -> web.Response:
        return json_reply(await self.status())

    async def get_presets(self, request: web.Request) -> web.Response:
        return json_reply(await self.listing())

    async def get_metrics(self, request: web.Request) -> web.Response:
        text = await self._call(self.api.metrics_text)
        return web.Response(body=text.encode(), headers={"Content-Type": _PROMETHEUS})

    async def get_session(self, request: web.Request) -> web.Response:
        """What the page needs to know about itself: may it change things?"""
        return json_reply(
            {
                "control": True,
                "authenticated": self.auth.session_ok(
                    session_cookie(request.headers.get("Cookie"))
                ),
            }
        )

    # ------------------------------------------------------------------ changes
    async def post_preset(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, _PRESET_BODY)
        try:
            active = await self._call(self.api.select_preset, name, "control API")
        except BrokenPreset as err:
            raise ApiError(409, str(err)) from None
        except UnknownPreset as err:
            raise ApiError(404, str(err)) from None
        self._changed()
        return json_reply({"active": active})

    async def post_reload(self, request: web.Request) -> web.Response:
        await read_json(request)  # any body is read (bounded) and ignored
        result = await self._call(self.api.reload_presets)
        self._changed()
        return json_reply(result)

    async def post_login_code(self, request: web.Request) -> web.Response:
        """A one-time login link for the page (`streamv2v open` asks with the token)."""
        await read_json(request)
        if not self.auth.bearer_ok(request.headers.get("Authorization")):
            raise ApiError(403, "a login link is given for the token only, not for a session")
        url = f"{_origin(request)}/login?code={self.auth.new_login_code()}"
        return json_reply({"url": url, "expires_in_s": CODE_TTL_S})

    async def login(self, request: web.Request) -> web.StreamResponse:
        session = self.auth.redeem(request.query.get("code", ""))
        if session is None:
            raise ApiError(
                403, "this login link was used already or has expired: run `streamv2v open` again"
            )
        response = web.HTTPSeeOther("/")  # the code leaves the address bar
        response.set_cookie(
            COOKIE, session, max_age=int(SESSION_TTL_S), path="/", httponly=True, samesite="Strict"
        )
        raise response


def _origin(request: web.Request) -> str:
    """This server as the socket the request came in on names it (not the Host header: the
    link must lead back to this very port)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    address, port = (sockname or ("127.0.0.1", 0))[:2]
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (None when empty), read only now that the request is
    authorized: bounded in size, time, depth and number length."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise ApiError(400, f"body must be at most {MAX_BODY_BYTES} B", close=True)
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise ApiError(415, "send the body uncompressed (no Content-Encoding)", close=True)
    try:
        raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(400, f"body must be at most {MAX_BODY_BYTES} B", close=True) from None
    except RequestPayloadError as err:
        raise ApiError(400, f"unreadable body ({err.__cause__ or err})", close=True) from None
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s", close=True
        ) from None
    try:
        return parse_body(raw)
    except BodyError as err:
        raise ApiError(400, str(err)) from None
