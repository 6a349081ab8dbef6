"""One encoder per session and codec, many listeners: styled frames encoded once, the packets
handed to every peer connection that shows them (the WHIP publisher's own return track and each
WHEP viewer).

aiortc encodes per sender: one track feeding N peer connections costs N encodes of every frame.
Its sender also takes already-encoded ``av.Packet`` s from a track (then it only packetizes them
into RTP), which is what :class:`PacketTrack` gives it. The encoder (:class:`EncodedRelay`) runs
in a worker thread, one frame at a time, the newest frame winning while it is busy (the engine is
the slow part, never a queue). A listener must see every packet from a keyframe on (a missing
delta frame breaks the picture until the next keyframe), so each one has a short queue of its
own; a listener that falls that far behind drops what it holds and waits for a keyframe, which it
asks for. Keyframes: one at every new listener, on a listener's PLI/FIR, and every
:data:`KEYFRAME_EVERY_S`.

Limitation (said in the README): the bitrate is one for all listeners (a fixed target), not
adapted per viewer to its REMB reports as aiortc's own encoder would.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import time
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

log = logging.getLogger("streamv2v.serve")

#: The video codecs aiortc sends, by SDP name: the FFmpeg encoder each is encoded with.
ENCODERS = {"VP8": "libvpx", "H264": "libx264"}
BITRATE = 1_500_000
KEYFRAME_EVERY_S = 2.0
#: Packets a listener may hold before it is counted as behind (then it waits for a keyframe).
QUEUE_PACKETS = 30
_TIME_BASE = fractions.Fraction(1, 90_000)


class PacketTrack(MediaStreamTrack):
    """A video track whose ``recv`` gives encoded packets of a relay (aiortc packs them)."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.relay: EncodedRelay | None = None
        self._queue: collections.deque[av.Packet] = collections.deque()
        self._ready = asyncio.Event()
        self._want_key = True  # start at a keyframe
        self.packets = 0
        self.resyncs = 0

    def deliver(self, packet: av.Packet) -> None:
        """The relay's next packet (on the loop)."""
        if self._want_key:
            if not packet.is_keyframe:
                return
            self._want_key = False
        if len(self._queue) >= QUEUE_PACKETS:  # behind: drop all, restart at a keyframe
            self._queue.clear()
            self._want_key = True
            self.resyncs += 1
            if self.relay is not None:
                self.relay.request_keyframe()
            return
        self._queue.append(packet)
        self._ready.set()

    async def recv(self) -> av.Packet:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        self.packets += 1
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        if self.relay is not None:
            self.relay.unsubscribe(self)
        self._ready.set()


class EncodedRelay:
    """Styled frames of one session encoded once in one codec, fanned out to listeners."""

    def __init__(self, codec: str, executor: Any = None) -> None:
        if codec not in ENCODERS:
            raise ValueError(f"no encoder for {codec}; one of {sorted(ENCODERS)}")
        self.codec = codec
        self.listeners: set[PacketTrack] = set()
        self.frames_encoded = 0
        self.encode_s = 0.0
        self._executor = executor
        self._context: Any = None
        self._pending: VideoFrame | None = None
        self._busy = False
        self._task: asyncio.Future | None = None
        self._force_key = True
        self._last_key = 0.0
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ listeners
    def subscribe(self, track: PacketTrack) -> None:
        track.relay = self
        self.listeners.add(track)
        self.request_keyframe()

    def unsubscribe(self, track: PacketTrack) -> None:
        self.listeners.discard(track)

    def request_keyframe(self) -> None:
        self._force_key = True

    def watch_keyframe_requests(self, sender: Any) -> None:
        """A listener's PLI/FIR asks this relay for a keyframe. aiortc's sender turns them into
        a flag of its own encoder, which packets bypass; its ``_send_keyframe`` is the one
        place that sees them, so it is pointed here (aiortc 1.x)."""
        if hasattr(sender, "_send_keyframe"):
            sender._send_keyframe = self.request_keyframe

    # ------------------------------------------------------------------ frames
    def publish(self, frame: VideoFrame) -> None:
        """A styled frame (on the loop): encoded soon in a worker thread, the newest winning."""
        if not self.listeners:
            return
        self._pending = frame
        if not self._busy:
            self._busy = True
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending is not None and self.listeners:
                frame, self._pending = self._pending, None
                now = time.monotonic()
                key = self._force_key or now - self._last_key >= KEYFRAME_EVERY_S
                self._force_key = False
                packets = await loop.run_in_executor(self._executor, self._encode, frame, key)
                for packet in packets:
                    if packet.is_keyframe:
                        self._last_key = now
                    for track in list(self.listeners):
                        track.deliver(packet)
        except Exception:  # an encoder failure: logged once, listeners see no more frames
            log.exception("styled video: the %s encoder failed", self.codec)
        finally:
            self._busy = False

    def _encode(self, frame: VideoFrame, key: bool) -> list[av.Packet]:
        """Worker thread: one frame, encoded (the context is only ever used here)."""
        t0 = time.perf_counter()
        image = frame.reformat(format="yuv420p")
        image.pts = round((time.monotonic() - self._t0) * 90_000)
        image.time_base = _TIME_BASE
        image.pict_type = av.video.frame.PictureType.I if key else av.video.frame.PictureType.NONE
        context = self._context
        if context is None or (context.width, context.height) != (image.width, image.height):
            context = self._context = self._open(image.width, image.height)
        packets = list(context.encode(image))
        for packet in packets:
            packet.time_base = _TIME_BASE
        self.frames_encoded += 1
        self.encode_s += time.perf_counter() - t0
        return packets

    def _open(self, width: int, height: int) -> Any:
        context = av.CodecContext.create(ENCODERS[self.codec], "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.bit_rate = BITRATE
        context.time_base = _TIME_BASE
        context.framerate = fractions.Fraction(30, 1)
        if self.codec == "VP8":
            context.gop_size = 3000  # keyframes when asked (and every KEYFRAME_EVERY_S)
            context.options = {
                "deadline": "realtime",
                "cpu-used": "-6",
                "lag-in-frames": "0",
                "static-thresh": "1",
            }
        else:  # H264, as aiortc's own encoder makes it: what browsers decode
            context.gop_size = 3000
            context.options = {"level": "31", "tune": "zerolatency"}
            context.profile = "Baseline"
        context.thread_count = 1
        return context

    def close(self) -> None:
        for track in list(self.listeners):
            track.stop()
        self.listeners.clear()
