"""What both ends of the remote engine agree on: the signalling limits, the token, the control
messages on the data channel, and the video track that sends the newest frame put into it.

Frame tags: the daemon stamps each frame it sends with a pts of 90 kHz ticks since the first
frame it sent on this connection (so the first pts is 0, and the server's receiver, which counts
from the first frame it gets, sees the same numbers). The server gives each styled frame the pts
of the input frame it was made from, and sends ``{"t": "origin", "pts": P}`` with the first one
(the daemon's receiver counts from it), so the daemon maps every styled frame back to its capture
time: glass-to-glass stays measurable across the two encoders.

Messages (JSON objects with a type ``t``), daemon -> server:
    {"t": "preset", "base": EngineConfig, "preset": Preset}   run this style (embeddings cached
                                                              on the server by prompt text)
    {"t": "steps", "steps": N, "stream_batch": B}             the latency controller's choice
    {"t": "reset"}                                            restart the stream and its bank
    {"t": "ping", "id": N}
server -> daemon:
    {"t": "done", "pts": P, "ms": COST, "out": BOOL, "steps": N, "stream_batch": B}  per frame
    {"t": "origin", "pts": P}   {"t": "pong", "id": N}   {"t": "error", "error": TEXT}
    {"t": "failed", "error": TEXT, "count": N}   a frame failed on the server's engine (why)
"""

from __future__ import annotations

import asyncio
import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

#: The pts clock of every frame (RTP's video clock).
CLOCK_HZ = 90_000
TIME_BASE = Fraction(1, CLOCK_HZ)
#: Signalling bodies are SDP offers: a few kB; anything past this is refused (413).
MAX_OFFER_BYTES = 64 * 1024
#: Control messages are small JSON objects; a bigger one is dropped unread.
MAX_MESSAGE_BYTES = 64 * 1024
_MAX_DEPTH = 8

# aioice logs every ICE candidate check at INFO: noise in the daemon's and the server's log.
logging.getLogger("aioice").setLevel(logging.WARNING)


class BadMessage(ValueError):
    """A control message that is not a small JSON object with a known type."""


def read_token_file(path: Path) -> str:
    """The token: the first line of ``path``, stripped (OSError when it cannot be read)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def encode_message(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def decode_message(data: str | bytes, types: frozenset[str]) -> dict[str, Any]:
    """A received control message, checked: size, JSON, an object, nesting depth, its type."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(data)} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadMessage(f"not JSON ({err})") from None
    if not isinstance(message, dict) or message.get("t") not in types:
        raise BadMessage(f"expected an object with t in {sorted(types)}")
    if _depth(message) > _MAX_DEPTH:
        raise BadMessage(f"nested deeper than {_MAX_DEPTH}")
    return message


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


class LatestFrameTrack(MediaStreamTrack):
    """A video track that sends the newest frame put into it (latest wins, never a queue):
    when the encoder is slower than the producer, frames are skipped, not delayed."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._frame: VideoFrame | None = None
        self._ready = asyncio.Event()
        self.skipped = 0

    def put(self, frame: VideoFrame) -> None:
        """Offer ``frame`` (call on the event loop's thread)."""
        if self._frame is not None:
            self.skipped += 1
        self._frame = frame
        self._ready.set()

    async def recv(self) -> VideoFrame:
        while self._frame is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return self.on_send(frame)

    def on_send(self, frame: VideoFrame) -> VideoFrame:
        """The frame about to be encoded (subclasses stamp it)."""
        return frame

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake a waiting recv(), which then ends the track
