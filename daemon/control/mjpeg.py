"""The MJPEG preview on the control-plane server: ``/stream.mjpg`` and ``/frame.jpg``.

For a browser, OpenCV or an OBS Media Source; no authentication (OBS cannot log in), so the
server listens on loopback only. A published frame is JPEG-encoded at most once, lazily (the
first time a client wants it), in a worker thread, and every client shares those bytes; one
encode runs at a time. Each client is sent the newest frame once its socket has taken the
previous one, so a slow client skips frames; one that takes nothing for guard.CLIENT_TIMEOUT_S
is dropped. ``publish`` (the output thread) never waits: it swaps a reference and, when a client
waits, schedules a wake-up on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from aiohttp import web

from daemon.control.guard import send_part
from daemon.control.latest import Latest

log = logging.getLogger("streamv2v.control")

BOUNDARY = "frame"
#: How long a stream waits for a frame before it checks whether its client is still there.
_WAIT_S = 0.25
#: More stream clients than this at once get 429 (each holds a connection).
MAX_STREAM_CLIENTS = 64


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview frame as JPEG")
    return data.tobytes()


class FrameStore:
    """The newest published frame and, once somebody asked for it, its JPEG bytes."""

    def __init__(self, quality: int) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"preview JPEG quality must be 1..100, got {quality}")
        self.quality = quality
        self.frames_encoded = 0
        self.stream_clients = 0
        self.frames: Latest[np.ndarray] = Latest()
        self._jpeg: tuple[int, bytes] | None = None  # the newest encoded (seq, bytes)
        self._encoding: tuple[int, asyncio.Future[tuple[int, bytes]]] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def publish(self, rgb: np.ndarray) -> None:
        """Make ``rgb`` (HxWx3 uint8 RGB) the frame every client gets next; any thread,
        never blocks."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
        self.frames.set(np.array(rgb, copy=True))  # the caller may reuse its buffer

    # ------------------------------------------------------------------ on the loop
    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview-jpeg")
        self._encoding = None
        self.frames.bind(loop)

    @property
    def closed(self) -> bool:
        return self._executor is None

    def close(self) -> None:
        """Wake every waiting client with None; the last frame stays for a later open()."""
        self.frames.close()
        self.frames.bind(None)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def newer(self, seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest frame after ``seq`` as (seq, JPEG); None on timeout or close."""
        newest = await self.frames.newer(seq, timeout)
        return None if newest is None else await self._encoded(*newest)

    async def latest(self) -> tuple[int, bytes] | None:
        """The newest frame as (seq, JPEG); None before the first one or when closed."""
        seq, rgb = self.frames.get()
        return None if rgb is None else await self._encoded(seq, rgb)

    async def _encoded(self, seq: int, rgb: np.ndarray) -> tuple[int, bytes] | None:
        """Frame ``seq`` (or a newer one) as JPEG, encoding it only if nobody did."""
        while not self.closed:
            if self._jpeg is not None and self._jpeg[0] >= seq:
                return self._jpeg
            if self._encoding is not None:
                encoding_seq, future = self._encoding
                done = await asyncio.shield(future)
                if encoding_seq >= seq:
                    return done
                continue  # an older frame was being encoded; now encode this one
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, encode_jpeg, rgb, self.quality)
            self._encoding = (seq, asyncio.ensure_future(self._finish(seq, future)))
        return None

    async def _finish(self, seq: int, future: asyncio.Future[bytes]) -> tuple[int, bytes]:
        try:
            jpeg = (seq, await future)
        finally:
            self._encoding = None
        self.frames_encoded += 1
        if self._jpeg is None or self._jpeg[0] < seq:
            self._jpeg = jpeg
        return jpeg


# --------------------------------------------------------------------------- routes
FRAMES_KEY = web.AppKey("frames", FrameStore)


def add_preview_routes(app: web.Application, frames: FrameStore) -> None:
    app[FRAMES_KEY] = frames
    app.router.add_get("/stream.mjpg", stream)
    app.router.add_get("/frame.jpg", frame)

    async def open_frames(app: web.Application) -> None:
        frames.open(asyncio.get_running_loop())

    async def close_frames(app: web.Application) -> None:
        frames.close()  # wakes every stream at once, before the server waits for them

    app.on_startup.append(open_frames)
    app.on_shutdown.append(close_frames)


async def frame(request: web.Request) -> web.StreamResponse:
    latest = await request.app[FRAMES_KEY].latest()
    if latest is None:
        return web.json_response({"error": "no frame published yet"}, status=503)
    return web.Response(body=latest[1], content_type="image/jpeg")


async def stream(request: web.Request) -> web.StreamResponse:
    frames = request.app[FRAMES_KEY]
    if frames.stream_clients >= MAX_STREAM_CLIENTS:
        return web.json_response(
            {"error": f"more than {MAX_STREAM_CLIENTS} viewers; close some"}, status=429
        )
    response = web.StreamResponse(
        headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}"}
    )
    response.force_close()  # one stream per connection, as HTTP/1.0 clients expect
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    frames.stream_clients += 1
    try:
        seq = 0
        while request.transport is not None and not request.transport.is_closing():
            newest = await frames.newer(seq, _WAIT_S)
            if newest is None:
                if frames.closed:
                    break  # the server stops
                continue
            seq, jpeg = newest
            head = (
                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            )
            # Returns once the socket took the part: a slow client skips to the newest frame.
            if not await send_part(request, response, head.encode() + jpeg + b"\r\n"):
                break
    finally:
        frames.stream_clients -= 1
    return response
