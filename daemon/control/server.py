"""The daemon's one HTTP server (aiohttp): the control API, /metrics, the MJPEG preview, the
control page and its live event stream, on an asyncio loop in one daemon thread.

    server = ControlPlaneServer(api=daemon, frames=FrameStore(quality), control_file=...)
    server.listen(control_host, control_port); server.listen(preview_host, preview_port)
    server.start() ... server.stop()

serves one application on each configured loopback address (by default the control port 8766
and the preview port 8765: OBS sources and scripts that know either keep working, and the
page, reached on either, talks to the same origin it came from). Sockets are bound in the
caller's thread, so a taken port is an OSError at start(), with a listen backlog of BACKLOG.

Time bounds: a connection must deliver a request's headers within IDLE_TIMEOUT_S of opening
(or of its previous response), else it is closed: idle keep-alive clients and slowloris
senders alike. A body must follow within routes.BODY_TIMEOUT_S; a stream client that takes
nothing for guard.CLIENT_TIMEOUT_S is dropped. Every handler is a coroutine that never blocks
the loop: JPEG encoding and every call into the daemon run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from pathlib import Path

from aiohttp import web

from daemon.config import is_loopback
from daemon.control.auth import Auth
from daemon.control.bounded_json import MAX_BODY_BYTES
from daemon.control.events import LiveStatus
from daemon.control.guard import (
    DebugAccessLog,
    QuietServerLog,
    add_security_headers,
    guard,
    quiet_loop_errors,
)
from daemon.control.mjpeg import FrameStore, add_preview_routes
from daemon.control.page import add_page_routes
from daemon.control.routes import ControlApi, ControlRoutes
from daemon.http_errors import JsonErrorRunner

log = logging.getLogger("streamv2v.control")

BACKLOG = 1024
IDLE_TIMEOUT_S = 5.0
#: How long stop() lets open streams end by themselves before they are cut.
_SHUTDOWN_S = 0.2


def build_app(
    *, api: ControlApi | None, frames: FrameStore | None, auth: Auth, control_file: Path | None
) -> web.Application:
    """The application: the control API and page when ``api`` is given, the preview when
    ``frames`` is; the guard (guard.py) in front of every route."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(add_security_headers)
    if frames is not None:
        add_preview_routes(app, frames)
    if api is not None:
        routes = ControlRoutes(api, auth, control_file)
        routes.add_to(app)
        LiveStatus(routes).add_to(app)
    add_page_routes(app, control=api is not None)
    return app


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on a loopback ``host`` (port 0: any free one)."""
    address = host.strip("[]")
    if not is_loopback(address):
        raise ValueError(f"the control-plane server listens on loopback only, not {host!r}")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.create_server((address, port), family=family, backlog=BACKLOG)


class ControlPlaneServer:
    """The server and its thread. ``listen`` on each loopback address first (the control
    port, the preview port), then ``start``; ``frames`` may be set until then."""

    def __init__(
        self,
        *,
        api: ControlApi | None,
        frames: FrameStore | None = None,
        control_file: Path | None = None,
        auth: Auth | None = None,
    ) -> None:
        self.api, self.frames, self.control_file = api, frames, control_file
        self.auth = auth or Auth()
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def listen(self, host: str, port: int) -> str:
        """Bind ``host:port`` (port 0: any free one) and return its URL; ValueError for a host
        that is not loopback, OSError (naming the address) for a taken port."""
        if self._thread is not None:
            raise RuntimeError("listen() before start()")
        try:
            sock = bind(host, port)
        except OSError as err:
            raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from err
        self._sockets.append(sock)
        return url_of(host.strip("[]"), sock.getsockname()[1])

    def start(self) -> None:
        """Serve every address listened on, in a thread of its own."""
        if self._thread is not None or not self._sockets:
            return
        sockets, self._sockets = self._sockets, []
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(quiet_loop_errors)
        app = build_app(
            api=self.api, frames=self.frames, auth=self.auth, control_file=self.control_file
        )
        runner = JsonErrorRunner(  # aiohttp's own parser errors answered as ours too
            app,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_S,
            keepalive_timeout=IDLE_TIMEOUT_S,
            lingering_time=1.0,
            auto_decompress=False,  # no compressed bodies (read_json refuses them): no bombs
            max_line_size=8190,
            max_field_size=8190,
            max_headers=64,
            logger=QuietServerLog(),
            access_log_class=DebugAccessLog,
            access_log=log,
        )
        try:
            loop.run_until_complete(self._open(runner, sockets))
        except BaseException:
            for sock in sockets:
                sock.close()
            loop.close()
            raise
        self._loop, self._runner = loop, runner
        self._thread = threading.Thread(
            target=self._serve, args=(loop,), name="control-plane", daemon=True
        )
        self._thread.start()

    @staticmethod
    async def _open(runner: web.AppRunner, sockets: list[socket.socket]) -> None:
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=BACKLOG).start()

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    @staticmethod
    async def _close(runner: web.AppRunner) -> None:
        for site in list(runner.sites):
            await site.stop()  # no new connections from here on
        server = runner.server
        transports = [c.transport for c in server.connections] if server is not None else []
        await runner.cleanup()
        # A plain close waits until the socket takes what is buffered, which a stalled viewer
        # never does: cut such connections.
        for transport in transports:
            if transport is not None:
                transport.abort()

    def stop(self) -> None:
        """Close every connection and stop the thread (within about half a second)."""
        for sock in self._sockets:  # listened on, never started
            sock.close()
        self._sockets = []
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            return
        self._loop = self._runner = self._thread = None
        closing = asyncio.run_coroutine_threadsafe(self._close(runner), loop)
        try:
            closing.result(timeout=2.0)
        except Exception as err:  # stopping must never hang the daemon's shutdown
            log.warning("control plane: stopping took too long (%s)", err)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=1.0)
