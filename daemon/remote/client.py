"""The daemon's remote engine: the engine worker's "frame in, styled frame out" contract, with the
engine behind ``[engine] remote = "http://HOST:PORT"`` (a ``streamv2v serve``), over WebRTC.

Two threads: the engine thread (as the local worker's) takes the newest camera frame, follows the
active preset, and hands the frame to the uplink, or passes it through when the remote is not
there (connecting, refused, lost) or has sent nothing styled for :data:`STALE_S`; the network
thread runs the asyncio loop of the peer connection, publishes styled frames as they arrive
(tagged with their capture time, see daemon/remote/protocol.py), and reconnects with a backoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from daemon.config import DaemonConfig
from daemon.control.latency import LatencyBudget, StepChoice
from daemon.control.metrics import Rolling
from daemon.dataplane.frames import Frame, fit_to
from daemon.dataplane.slots import LatestSlot
from daemon.models.engine_config import engine_config
from daemon.remote.protocol import (
    CLOCK_HZ,
    TIME_BASE,
    BadMessage,
    LatestFrameTrack,
    decode_message,
    encode_message,
)
from daemon.styles.presets import Preset, PresetManager
from streamv2v.config import SCHEDULE_STEPS

log = logging.getLogger("streamv2v")

#: Without a styled frame for this long, camera frames go out as they are.
STALE_S = 0.5
#: Without any message from the server for this long, the connection is given up and redone.
LOST_S = 2.0
_CONNECT_TIMEOUT_S = 5.0
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.5, 2.0
_PING_S = 0.5
_SERVER_MESSAGES = frozenset({"done", "origin", "pong", "error", "failed"})


class Refused(Exception):
    """The server answered the offer with a 4xx (wrong token, bad offer, ...)."""


class NoRoom(Refused):
    """503 (or an older serve's 429): no engine behind the URL has a free session."""


class CameraTrack(LatestFrameTrack):
    """The uplink: stamps each frame it sends with its pts (90 kHz ticks since the first frame
    sent on this connection) and remembers the pts's capture time, sequence and send time."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.OrderedDict[int, tuple[float, int, float]] = (
            collections.OrderedDict()
        )
        self._first: float | None = None
        self._last_pts = -1

    def on_send(self, frame: VideoFrame) -> VideoFrame:
        captured_at, seq = frame.opaque
        if self._first is None:
            self._first = captured_at
        pts = max(round((captured_at - self._first) * CLOCK_HZ), self._last_pts + 1)
        self._last_pts = pts
        frame.pts, frame.time_base, frame.opaque = pts, TIME_BASE, None
        self.sent[pts] = (captured_at, seq, time.monotonic())
        while len(self.sent) > 256:
            self.sent.popitem(last=False)
        return frame


class RemoteEngineWorker:
    """The engine worker for a remote engine: same slots, states and figures as
    :class:`~daemon.dataplane.engine_worker.EngineWorker` (``engine`` stays None: the model is
    elsewhere), plus :meth:`remote_figures` for the status."""

    def __init__(
        self,
        config: DaemonConfig,
        inp: LatestSlot[Frame],
        out: LatestSlot[Frame],
        presets: PresetManager,
    ) -> None:
        self.config = config
        self.presets = presets
        section = config.engine
        self.url = section.remote
        self.base = engine_config(section.model, section.settings, loras=section.loras)
        # What the server is told: ControlNets by the names configured (the server finds the
        # built-in one in its own installation), the rest as run here.
        self._wire_base = self.base.model_copy(
            update={"control": section.settings.control}
        ).model_dump(mode="json")
        self._in, self._out = inp, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._net = threading.Thread(target=self._network, name="engine-net", daemon=True)
        self.state = "loading"  # loading (connecting), running, failed, stopped
        # connecting, connected, failing (its engine fails), unreachable, refused, lost,
        # full (no engine behind the URL has room: 503)
        self.remote_state = "connecting"
        self.remote_error = ""
        self.engine: Any = None
        self.switching = False
        self.applied: Preset | None = None  # the preset the server was last told to run
        self.call_ms = Rolling()  # server cost + network round trip per frame
        self.rtt_ms = Rolling()
        self.server_ms = Rolling()
        self.frames_styled = 0
        self.calls = 0
        latency = config.latency
        self.budget = LatencyBudget(latency, config.camera.fps) if latency.active else None
        self.output_delay: Rolling | None = None
        self.steps: StepChoice | None = None  # what the server runs now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._track: CameraTrack | None = None
        self._channel: Any = None
        self._origin: int | None = None
        self._last_styled = 0.0
        self._last_heard = 0.0
        self._last_done: float | None = None
        self._latency_ms: float | None = None  # capture to arrival of the last styled frame
        self.reconnects = 0
        #: Presets with a mask: the frames sent are segmented here meanwhile, and the output
        #: thread composites each styled frame that comes back with its own frame's mask (the
        #: capture time travels with the frame both ways). Set by the Daemon.
        self.masks: Any = None
        self._restarted = True  # nothing styled yet to blend a mask from (a new connection)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._net.start()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)  # wake it
        self._thread.join(timeout)
        self._net.join(timeout)
        self.state = "stopped"

    def remote_figures(self) -> dict[str, Any]:
        """The remote's state and figures (Daemon.status, the page, doctor)."""
        return {
            "url": self.url,
            "state": self.remote_state,
            "error": self.remote_error,
            "problem": self.problem(),
            "rtt_ms_p50": self.rtt_ms.pct(50),
            "server_ms_p50": self.server_ms.pct(50),
            "steps": self.steps.steps if self.steps else None,
            "stream_batch": self.steps.stream_batch if self.steps else None,
            "reconnects": self.reconnects,
        }

    def problem(self) -> str:
        """What is wrong with the remote engine, in one sentence ("" when nothing is)."""
        state, error = self.remote_state, self.remote_error
        if state == "failing":
            return f"the engine on {self.url} fails: {error}"
        if state == "full":
            return f"no engine has room on {self.url}; retrying"
        if state in ("refused", "unreachable", "lost"):
            return f"the engine on {self.url} {state}" + (f": {error}" if error else "")
        return ""

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self._in.get(timeout=0.1)
            if frame is None:
                continue
            wanted = self.presets.current()
            linked = self._channel is not None
            if linked and wanted != self.applied:
                self.applied = wanted
                self._send_soon(
                    {
                        "t": "preset",
                        "base": self._wire_base,
                        "preset": wanted.model_dump(mode="json"),
                    }
                )
            if frame.kind != "unavailable" and linked and not wanted.passthrough:
                if self.masks is not None:
                    self.masks.offer(frame, wanted, restart=self._restarted)
                    self._restarted = False
                image = fit_to(frame.image, self.base.width, self.base.height)
                video = VideoFrame.from_ndarray(image, format="rgb24")
                video.opaque = (frame.captured_at, frame.seq)
                self._call_soon(self._put_uplink, video)
                if time.monotonic() - self._last_styled < self._stale_s():
                    continue  # styled frames are flowing: they are published as they arrive
            else:
                self._restarted = True
            self._pass(frame)

    def _stale_s(self) -> float:
        """How long without a styled frame before camera frames go out: STALE_S, longer for a
        slow server (no flicker between styled and camera frames), never past 0.9 s."""
        cost = self.call_ms.pct(50)
        return STALE_S if cost is None else min(0.9, max(STALE_S, 3 * cost / 1000))

    def _pass(self, frame: Frame) -> None:
        if frame.kind == "camera":
            frame = Frame(frame.image, frame.captured_at, frame.seq, "passthrough")
        self._out.put(frame)

    def _call_soon(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed
                loop.call_soon_threadsafe(fn, *args)

    def _send_soon(self, message: dict[str, Any]) -> None:
        self._call_soon(self._send, message)

    def _put_uplink(self, video: VideoFrame) -> None:
        if self._track is not None:
            self._track.put(video)

    def _send(self, message: dict[str, Any]) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(encode_message(message))

    # ------------------------------------------------------------------ network thread
    def _network(self) -> None:
        asyncio.run(self._connect_forever())

    def _set_remote(self, state: str, error: str = "") -> None:
        """One log line per change of the remote's state (not per retry)."""
        if (state, error) == (self.remote_state, self.remote_error):
            return
        self.remote_state, self.remote_error = state, error
        if state == "connected":
            log.info("remote engine %s: connected", self.url)
        elif state == "full":
            log.error(
                "remote engine %s: no engine has room (%s); passthrough, retrying", self.url, error
            )
        elif state == "refused":
            log.error("remote engine %s refused this daemon: %s; passthrough", self.url, error)
        elif state in ("unreachable", "lost"):
            log.error("remote engine %s %s (%s); passthrough, reconnecting", self.url, state, error)
        elif state == "failing":
            log.error("%s; passthrough until it styles again", self.problem())
        self.state = {"connected": "running", "connecting": "loading"}.get(state, "failed")

    async def _connect_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            token = self.config.engine.resolve_token()
        except ValueError as err:
            self._set_remote("refused", str(err))
            return
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        backoff = _BACKOFF_MIN_S
        async with aiohttp.ClientSession(headers=headers) as http:
            while not self._stop.is_set():
                try:
                    if await self._session(http):
                        backoff = _BACKOFF_MIN_S
                except NoRoom:
                    self._set_remote("full", "every engine is full or draining")
                except Refused as err:
                    self._set_remote("refused", str(err))
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
                    self._set_remote("unreachable", str(err) or type(err).__name__)
                deadline = time.monotonic() + backoff
                while time.monotonic() < deadline and not self._stop.is_set():
                    await asyncio.sleep(0.05)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _session(self, http: aiohttp.ClientSession) -> bool:
        """One peer connection, until it is lost; True when it carried frames."""
        pc = RTCPeerConnection()
        track = CameraTrack()
        channel = pc.createDataChannel("control")
        pc.addTrack(track)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", self._on_message)
        pc.on("track", lambda remote: asyncio.ensure_future(self._receive(remote, track)))
        try:
            await pc.setLocalDescription(await pc.createOffer())
            offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
            timeout = aiohttp.ClientTimeout(total=_CONNECT_TIMEOUT_S)
            async with http.post(f"{self.url}/offer", json=offer, timeout=timeout) as answer:
                if answer.status in (429, 503):
                    raise NoRoom(f"HTTP {answer.status}: {await _reason(answer)}")
                if answer.status != 200:
                    raise Refused(f"HTTP {answer.status}: {await _reason(answer)}")
                body = await answer.json()
            await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
            await asyncio.wait_for(opened.wait(), _CONNECT_TIMEOUT_S)
            self._origin, self._last_done, self.applied = None, None, None
            self._restarted = True
            self._last_heard = time.monotonic()
            self._track, self._channel = track, channel  # the engine thread starts sending
            self._set_remote("connected")
            await self._watch(pc)
            return True
        finally:
            self._track, self._channel = None, None
            self._last_styled = 0.0
            track.stop()
            with contextlib.suppress(Exception):
                await pc.close()
            self.reconnects += 1

    async def _watch(self, pc: RTCPeerConnection) -> None:
        """Ping, and return when the connection is gone or the server went silent."""
        while not self._stop.is_set():
            if pc.connectionState in ("failed", "closed"):
                self._set_remote("lost", f"connection {pc.connectionState}")
                return
            silent = time.monotonic() - self._last_heard
            if silent > LOST_S:
                self._set_remote("lost", f"no answer for {silent:.1f} s")
                return
            self._send({"t": "ping", "id": time.monotonic()})
            for _ in range(int(_PING_S / 0.05)):
                if self._stop.is_set():
                    return
                await asyncio.sleep(0.05)

    async def _receive(self, remote: Any, track: CameraTrack) -> None:
        """Publish the server's styled frames, tagged with their capture time."""
        try:
            while True:
                video = await remote.recv()
                now = time.monotonic()
                image = video.to_ndarray(format="rgb24")
                sent = None
                if self._origin is not None and video.pts is not None:
                    sent = track.sent.get(video.pts + self._origin)
                if sent is None and track.sent:  # (only before the origin message arrived)
                    sent = next(reversed(track.sent.values()))
                captured_at, seq = (sent[0], sent[1]) if sent else (now, -1)
                self._out.put(Frame(image, captured_at, seq, "styled"))
                self._latency_ms = (now - captured_at) * 1000 if sent else None
                self._last_styled = now
                self.frames_styled += 1
        except MediaStreamError:
            pass

    def _on_message(self, data: str | bytes) -> None:
        self._last_heard = time.monotonic()
        try:
            message = decode_message(data, _SERVER_MESSAGES)
        except BadMessage as err:
            log.warning("remote engine %s: %s", self.url, err)
            return
        kind = message["t"]
        if kind == "origin" and isinstance(message.get("pts"), int):
            self._origin = message["pts"]
        elif kind == "pong" and isinstance(message.get("id"), float):
            self.rtt_ms.add((time.monotonic() - message["id"]) * 1000)
        elif kind == "error":
            log.warning("remote engine %s: %s", self.url, message.get("error"))
        elif kind == "failed":  # its engine failed on a frame: said once while it fails
            error = str(message.get("error"))[:300]
            if self.remote_state == "failing":
                self.remote_error = error  # (the newest reason on the status, no new log line)
            else:
                self._set_remote("failing", error)
        elif kind == "done":
            if self.remote_state == "failing":  # a frame went through again
                self._set_remote("connected")
            self._on_done(message)

    def _on_done(self, message: dict[str, Any]) -> None:
        """One frame processed on the server: its cost, with the network, for the controller."""
        cost = message.get("ms")
        steps, batch = message.get("steps"), message.get("stream_batch")
        if not isinstance(cost, int | float) or not isinstance(steps, int):
            return
        self.calls += 1
        self.server_ms.add(cost)
        rtt = self.rtt_ms.pct(50) or 0.0
        call_ms = cost + rtt
        self.call_ms.add(call_ms)
        self.steps = choice = StepChoice(steps, bool(batch))
        now = time.monotonic()
        interval = None if self._last_done is None else (now - self._last_done) * 1000
        self._last_done = now
        budget, preset = self.budget, self.applied
        if budget is None or preset is None or preset.passthrough:
            return
        latency = self._latency_ms if message.get("out") else None
        budget.observe(choice, call_ms, latency, interval)
        lo, hi = preset.step_range(self.base)
        strength = preset.strength or self.base.strength
        hi = min(hi, int(SCHEDULE_STEPS * strength))
        decided = budget.decide(choice, min(lo, hi), hi, f"remote {self.base.width}")
        if decided != choice:
            log.info("steps: %s -> %s (%s; remote)", choice, decided, budget.last_reason)
            self._send({"t": "steps", "steps": decided.steps, "stream_batch": decided.stream_batch})


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The server's reason for a refusal (its JSON "error"), in one line."""
    try:
        body = await response.json(content_type=None)
        return str(body.get("error", ""))[:300] or response.reason or ""
    except (ValueError, aiohttp.ClientError, AttributeError):
        return response.reason or ""


def probe(url: str, token: str, timeout_s: float = 3.0) -> tuple[str, str, float | None]:
    """``GET /health`` of a ``streamv2v serve``: (ok | refused | unreachable, detail, round
    trip in ms) for ``streamv2v doctor``."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/health", headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            health = json.loads(answer.read(64 * 1024))
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read(4096)).get("error", "")
        except (ValueError, AttributeError):
            reason = err.reason
        return "refused", f"{url} refused this daemon: HTTP {err.code}: {reason}", None
    except (OSError, ValueError) as err:
        return "unreachable", f"{url} unreachable ({getattr(err, 'reason', err)})", None
    rtt_ms = (time.perf_counter() - t0) * 1000
    detail = (
        f"{url}: {health.get('sessions')}/{health.get('max_sessions')} session(s) on "
        f"{health.get('device')}, round trip {rtt_ms:.0f} ms"
    )
    return "ok", detail, rtt_ms
