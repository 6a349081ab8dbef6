"""The page's live figures, pushed as Server-Sent Events on ``GET /events``.

One task samples the daemon's status and preset listing every INTERVAL_S, whatever the number
of pages open, keeps the last minute of glass-to-glass p50/p95 (so a page opened now draws a
full chart at once), and encodes one event that every page shares. A page that reads slowly
skips to the newest event; one that reads nothing for guard.CLIENT_TIMEOUT_S is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from daemon.control.guard import send_part
from daemon.control.latest import Latest
from daemon.control.routes import ControlRoutes

log = logging.getLogger("streamv2v.control")

INTERVAL_S = 0.5
HISTORY_S = 60.0
#: A comment line this often keeps an idle stream (and any proxy) from timing out.
_PING_S = 15.0
#: More pages than this at once get 429 (each holds a connection open).
MAX_CLIENTS = 32


class LiveStatus:
    """The sampler and the ``/events`` handler."""

    def __init__(self, routes: ControlRoutes, interval_s: float = INTERVAL_S) -> None:
        self.routes, self.interval_s = routes, interval_s
        self.events: Latest[bytes] = Latest()
        self.clients = 0
        self.samples = 0
        self._history: collections.deque[tuple[float, Any, Any]] = collections.deque(
            maxlen=int(HISTORY_S / interval_s)
        )
        self._failing = False

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/events", self.handle)
        app.cleanup_ctx.append(self._sampling)
        app.on_shutdown.append(self._close)

    async def _close(self, app: web.Application) -> None:
        self.events.close()  # ends every page's stream before the server waits for them

    async def _sampling(self, app: web.Application) -> AsyncIterator[None]:
        self.events.bind(asyncio.get_running_loop())
        task = asyncio.create_task(self._run(), name="control-events")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.events.close()

    async def _run(self) -> None:
        while True:
            try:
                self.events.set(await self._event())
                self.samples += 1
                self._failing = False
            except Exception as err:  # the daemon answered oddly: said once, retried
                if not self._failing:
                    log.error("control page: the live figures failed (%s)", err)
                self._failing = True
            await asyncio.sleep(self.interval_s)

    async def _event(self) -> bytes:
        status = await self.routes.status()
        listing = await self.routes.listing()
        now = time.monotonic()
        latency = status.get("latency_ms") or {}
        self._history.append((now, latency.get("p50"), latency.get("p95")))
        history = [[round(t - now, 2), p50, p95] for t, p50, p95 in self._history]
        payload = {"status": status, "presets": listing, "latency_history": history}
        return f"data: {json.dumps(payload, default=str)}\n\n".encode()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.clients >= MAX_CLIENTS:
            return web.json_response(
                {"error": f"more than {MAX_CLIENTS} pages are open; close some"}, status=429
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.clients += 1
        try:
            data = b"retry: 2000\n\n"
            version = 0
            while await send_part(request, response, data):
                newest = await self.events.newer(version, _PING_S)
                if newest is None:
                    if self.events.closed:
                        break
                    data = b": ping\n\n"
                else:
                    version, data = newest
        finally:
            self.clients -= 1
        return response
