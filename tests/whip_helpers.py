"""Real WHIP/WHEP clients for the tests: aiortc peer connections speaking to `streamv2v serve`
over real HTTP (aiohttp) on 127.0.0.1, each on an asyncio loop of its own thread so a test drives
them with plain calls. The publisher sends frames of a colour the test chooses (a plain scene of
the tiny model's world painted in that colour); a viewer keeps the newest frame it decoded.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import threading
import time
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

SIZE = 128
FPS = 15


class Loop:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ColourTrack(MediaStreamTrack):
    """Frames of ``colour`` (RGB), FPS per second, stamped with their send time."""

    kind = "video"

    def __init__(self, colour: tuple[int, int, int]) -> None:
        super().__init__()
        self.colour = colour
        self.sent = 0
        self._start: float | None = None

    def image(self) -> np.ndarray:
        frame = np.empty((SIZE, SIZE, 3), np.uint8)
        frame[:] = self.colour
        return frame

    async def recv(self) -> VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = VideoFrame.from_ndarray(self.image(), format="rgb24")
        frame.pts, frame.time_base = self.sent * (90_000 // FPS), fractions.Fraction(1, 90_000)
        self.sent += 1
        return frame


class Receiver:
    """Keeps the newest decoded frame of a remote track, with the time it arrived."""

    def __init__(self) -> None:
        self.latest: np.ndarray | None = None
        self.arrived = 0.0
        self.frames = 0
        self.ended = False
        self.history: list[tuple[float, float]] = []  # (arrival, warmth) of every frame
        self.levels: collections.deque[tuple[float, float]] = collections.deque(maxlen=300)

    async def read(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                image = frame.to_ndarray(format="rgb24")
                self.latest, self.arrived = image, time.monotonic()
                self.frames += 1
                self.history.append((self.arrived, warmth(image)))
                self.levels.append((self.arrived, float(image.mean())))
        except MediaStreamError:
            self.ended = True


def warmth(image: np.ndarray) -> float:
    """Red minus blue, on average: the warm style is positive, the cool one negative."""
    return float(image[..., 0].mean()) - float(image[..., 2].mean())


def prefer(transceiver: Any, codec: str) -> None:
    """Offer only ``codec`` (e.g. "H264", as OBS does), or aiortc's default list for ""."""
    if codec:
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == f"video/{codec}"])


async def _post(url: str, sdp: str, token: str | None) -> tuple[int, dict, str]:
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=sdp, headers=headers) as reply,
    ):
        return reply.status, reply.headers.copy(), await reply.text()  # case-insensitive


class Publisher:
    """A WHIP client: sends ``colour`` frames; with ``back`` its offer is sendrecv and the styled
    frames that come back on the same connection land in ``self.back``."""

    def __init__(
        self, loop: Loop, base: str, token: str, colour, *, back: bool = True, codec: str = ""
    ) -> None:
        self.loop, self.base, self.token, self.codec = loop, base, token, codec
        self.track = ColourTrack(colour)
        self.back = Receiver() if back else None
        self.location: str | None = None
        self.headers: dict = {}
        self.pc: RTCPeerConnection | None = None

    def start(self, query: str = "") -> int:
        return self.loop.run(self._start(query))

    async def _start(self, query: str) -> int:
        self.pc = pc = RTCPeerConnection()
        transceiver = pc.addTransceiver(
            self.track, direction="sendrecv" if self.back else "sendonly"
        )
        prefer(transceiver, self.codec)
        if self.back is not None:
            pc.on("track", lambda t: asyncio.ensure_future(self.back.read(t)))
        await pc.setLocalDescription(await pc.createOffer())
        status, headers, body = await _post(
            f"{self.base}/whip{query}", pc.localDescription.sdp, self.token
        )
        self.headers = headers
        if status != 201:
            await pc.close()
            return status
        self.location = headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        return status

    @property
    def id(self) -> str:
        assert self.location is not None
        return self.location.rsplit("/", 1)[-1]

    def set_colour(self, colour) -> None:
        self.track.colour = colour

    def close(self) -> None:
        if self.pc is not None:
            self.loop.run(self.pc.close())


class Viewer:
    """A WHEP client: a recvonly offer to ``path`` (/whep or /whep/ID)."""

    def __init__(self, loop: Loop, base: str, token: str, codec: str = "") -> None:
        self.loop, self.base, self.token, self.codec = loop, base, token, codec
        self.received = Receiver()
        self.location: str | None = None
        self.pc: RTCPeerConnection | None = None
        self.state = "new"

    def start(self, path: str) -> int:
        return self.loop.run(self._start(path))

    async def _start(self, path: str) -> int:
        self.pc = pc = RTCPeerConnection()
        prefer(pc.addTransceiver("video", direction="recvonly"), self.codec)
        pc.on("track", lambda t: asyncio.ensure_future(self.received.read(t)))

        @pc.on("connectionstatechange")
        def _state() -> None:
            self.state = pc.connectionState

        await pc.setLocalDescription(await pc.createOffer())
        status, headers, body = await _post(self.base + path, pc.localDescription.sdp, self.token)
        if status != 201:
            await pc.close()
            return status
        self.location = headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        return status

    def close(self) -> None:
        if self.pc is not None:
            self.loop.run(self.pc.close())
