"""``streamv2v serve``: the engine on a GPU box, for daemons on other machines, over WebRTC.

One aiohttp application: ``POST /offer`` (WebRTC signalling: an SDP offer in, the answer out),
``GET /health`` (JSON), ``GET /metrics`` (Prometheus text) and ``POST /admin/drain``. All check
the bearer token (constant time) before anything else, the offer's body is bounded and validated,
and past ``max_sessions`` (or while draining) an offer is refused with 503, ``Retry-After`` and
the reason (HAProxy's ``retry-on 503`` then offers it to the next box; daemon/remote/agent.py
tells HAProxy the free capacity). Each accepted offer is a session: a
video track up (camera frames), a video track back (styled frames) and a data channel of control
messages (daemon/remote/protocol.py). Engine work runs on the shared engine thread
(daemon/remote/session.py), never on the event loop. A frame that fails is never silent: the
first failure of a session is logged (then a count every :data:`FAILURE_LOG_S`) and every failure
is told to the daemon (``{"t": "failed"}``), whose status, page and log say it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from pydantic import ValidationError

from daemon.config import is_loopback
from daemon.errors import UserError
from daemon.http_errors import JsonErrorRunner
from daemon.remote.agent import RETRY_AFTER_S, Capacity, Drain
from daemon.remote.metrics import PROMETHEUS_TYPE, serve_metrics_text
from daemon.remote.protocol import (
    MAX_OFFER_BYTES,
    TIME_BASE,
    BadMessage,
    LatestFrameTrack,
    decode_message,
    encode_message,
    read_token_file,
)
from daemon.remote.session import EngineSession, SharedModel
from daemon.styles.presets import Preset
from streamv2v import EngineConfig

log = logging.getLogger("streamv2v.serve")

_CLIENT_MESSAGES = frozenset({"preset", "steps", "reset", "ping"})
#: A session that sends nothing (no frame, no ping) for this long is closed (its daemon is gone).
IDLE_CLOSE_S = 5.0
#: While a session's frames fail, how often the log says how many failed.
FAILURE_LOG_S = 10.0


@dataclass(frozen=True)
class ServeLimits:
    token: str  #: "" for none (only on loopback)
    max_sessions: int


class StyledTrack(LatestFrameTrack):
    """The track back to the daemon; its first frame's pts is sent as the daemon's origin."""

    def __init__(self, session: PeerSession) -> None:
        super().__init__()
        self.session = session
        self._first = True

    def on_send(self, frame: VideoFrame) -> VideoFrame:
        if self._first:
            self._first = False
            self.session.send({"t": "origin", "pts": frame.pts})
        return frame


class PeerSession:
    """One daemon: its peer connection, its engine session, and the tasks that feed them."""

    def __init__(self, server: RemoteServer, number: int) -> None:
        self.server = server
        self.number = number
        self.pc = RTCPeerConnection()
        self.engine = EngineSession(server.model, number)
        self.failures = 0  # frames that failed
        self.failing = False  # its last frame failed
        self._failure_logged = 0.0  # when the log last counted them
        self.styled = StyledTrack(self)
        self.channel: Any = None
        self.latest_in: VideoFrame | None = None
        self.frame_ready = asyncio.Event()
        self.last_heard = time.monotonic()
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.has_video = False
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    def send(self, message: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(encode_message(message))

    def _on_track(self, track: Any) -> None:
        if track.kind != "video":
            return
        self.pc.addTrack(self.styled)
        self.has_video = True
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    def _on_datachannel(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", self._on_message)

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def _read(self, track: Any) -> None:
        """Keep only the newest camera frame (the engine may be slower than the camera)."""
        try:
            while True:
                self.latest_in = await track.recv()
                self.last_heard = time.monotonic()
                self.frame_ready.set()
        except MediaStreamError:
            pass

    async def run(self) -> None:
        """Restyle the newest frame, one at a time, on the engine thread; close when idle."""
        loop = asyncio.get_running_loop()
        executor = self.server.model.executor
        while not self.closed:
            try:
                await asyncio.wait_for(self.frame_ready.wait(), 1.0)
            except asyncio.TimeoutError:
                if time.monotonic() - self.last_heard > IDLE_CLOSE_S:
                    log.info(
                        "session %d: nothing heard for %.0f s; closed", self.number, IDLE_CLOSE_S
                    )
                    await self.close()
                continue
            self.frame_ready.clear()
            frame, self.latest_in = self.latest_in, None
            if frame is None:
                continue
            try:
                out, pts, cost_ms = await loop.run_in_executor(executor, self._process, frame)
            except Exception as err:  # told to the daemon and logged (first, then counted)
                self._failed(err)
                continue
            self.failing = False
            cfg = self.engine.engine.config if self.engine.engine is not None else None
            self.send(
                {
                    "t": "done",
                    "pts": frame.pts,
                    "ms": round(cost_ms, 2),
                    "out": out is not None,
                    "steps": cfg.steps if cfg else None,
                    "stream_batch": cfg.stream_batch if cfg else None,
                }
            )
            if out is not None:
                out.pts, out.time_base = pts, TIME_BASE
                self.publish(out)

    def publish(self, frame: VideoFrame) -> None:
        """A styled frame for the client (WHIP sessions also feed their viewers: whip.py)."""
        self.styled.put(frame)

    def _failed(self, err: Exception) -> None:
        """A frame failed: the daemon hears why at once; the log says the first failure,
        then how many failed every FAILURE_LOG_S."""
        self.failures += 1
        self.failing = True
        reason = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
        now = time.monotonic()
        if self.failures == 1:
            log.error(
                "session %d: the engine fails: %s (the daemon is told; further failures are "
                "counted)",
                self.number,
                reason,
                exc_info=not isinstance(err, RuntimeError | ValueError),
            )
            self._failure_logged = now
        elif now - self._failure_logged >= FAILURE_LOG_S:
            log.error("session %d: %d frames failed (%s)", self.number, self.failures, reason)
            self._failure_logged = now
        self.send({"t": "failed", "error": reason, "count": self.failures})

    def _process(self, frame: VideoFrame) -> tuple[VideoFrame | None, int, float]:
        """Engine thread: decode to RGB, restyle, wrap for the encoder."""
        styled, pts, cost_ms = self.engine.process(frame.to_ndarray(format="rgb24"), frame.pts)
        if styled is None:
            return None, pts, cost_ms
        return VideoFrame.from_ndarray(styled, format="rgb24"), pts, cost_ms

    async def _on_message(self, data: str | bytes) -> None:
        self.last_heard = time.monotonic()
        try:
            message = decode_message(data, _CLIENT_MESSAGES)
            kind = message["t"]
            if kind == "ping":
                self.send({"t": "pong", "id": message.get("id")})
                return
            call = self._control_call(kind, message)
        except (BadMessage, ValidationError, TypeError, KeyError) as err:
            text = str(err).splitlines()[0]
            log.warning("session %d: bad control message (%s)", self.number, text)
            self.send({"t": "error", "error": f"bad control message: {text}"})
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.server.model.executor, call)
        except Exception as err:  # a preset the engine cannot run: said to the daemon
            log.warning("session %d: %s failed (%s)", self.number, kind, err)
            self.send({"t": "error", "error": f"{kind} failed: {err}"})
            return
        notice = self.engine.notice
        if kind == "preset" and notice:  # it runs, without what the server could not load
            log.warning("session %d: %s", self.number, notice)
            self.send({"t": "error", "error": notice})

    def _control_call(self, kind: str, message: dict[str, Any]) -> Any:
        """The engine-thread call a control message asks for (validated here, on the loop)."""
        session = self.engine
        if kind == "preset":
            base = EngineConfig.model_validate(message["base"])
            preset = Preset.model_validate(message["preset"])
            log.info("session %d: preset %s", self.number, preset.name)
            return lambda: session.apply(base, preset)
        if kind == "steps":
            steps, batch = message["steps"], message["stream_batch"]
            if not isinstance(steps, int) or not 1 <= steps <= 50 or not isinstance(batch, bool):
                raise TypeError("steps must be 1..50 and stream_batch true or false")
            return lambda: session.set_steps(steps, batch)
        return session.reset

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.frame_ready.set()
        for task in self.tasks:
            task.cancel()
        self.styled.stop()
        self.server.sessions.pop(self.number, None)
        failed = f", {self.failures} frames failed" if self.failures else ""
        log.info("session %d: ended (%d open%s)", self.number, len(self.server.sessions), failed)
        self.server.drain.check(len(self.server.sessions))
        with contextlib.suppress(Exception):
            await self.pc.close()
        # What only this session used (its ControlNets, the LoRAs no other session named) is
        # freed on the engine thread, after the frame it may be running.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # (the executor is gone: the server stops)
            await loop.run_in_executor(self.server.model.executor, self.engine.close)


class RemoteServer:
    """The signalling application and the sessions it accepted."""

    def __init__(self, model: SharedModel, limits: ServeLimits) -> None:
        self.model = model
        self.limits = limits
        self.sessions: dict[int, PeerSession] = {}
        self._numbers = itertools.count(1)
        self.drain = Drain(lambda: None)  # serve() gives it the stop
        self.app = web.Application(client_max_size=MAX_OFFER_BYTES)
        self.app.router.add_post("/offer", self.offer)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/admin/drain", self.admin_drain)
        self.app.on_shutdown.append(self._close_all)

    def _authorized(self, request: web.Request) -> bool:
        token = self.limits.token
        if not token:
            return True
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # Compared as bytes: a non-ASCII header is just a wrong token, never an exception.
        value_bytes = value.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and hmac.compare_digest(value_bytes, token.encode())

    def capacity(self) -> Capacity:
        """What the agent tells HAProxy: failing when every session's last frame failed."""
        sessions = list(self.sessions.values())
        failing = bool(sessions) and all(s.failing for s in sessions)
        return Capacity(
            "failing" if failing else "ready",
            len(sessions),
            self.limits.max_sessions,
            self.drain.active,
        )

    def no_room(self) -> web.Response | None:
        """503 + Retry-After for a new session on a full or draining box (None: room)."""
        if self.drain.active:
            reason = "the server is draining (it takes no new sessions); try another"
        elif len(self.sessions) >= self.limits.max_sessions:
            reason = (
                f"the server runs {len(self.sessions)} session(s), its limit "
                f"(streamv2v serve --max-sessions {self.limits.max_sessions}); try again later"
            )
        else:
            return None
        return web.json_response(
            {"error": reason}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    async def admin_drain(self, request: web.Request) -> web.Response:
        """``POST /admin/drain`` (token; no body read): what SIGUSR1 does."""
        if not self._authorized(request):
            return _refuse(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        self.drain.start(len(self.sessions), "POST /admin/drain")
        return web.json_response({"draining": True, "sessions": len(self.sessions)})

    def figures(self) -> dict[str, Any]:
        """The sessions, the free capacity, each session's figures and what is loaded."""
        sessions = list(self.sessions.values())
        return {
            "ok": True,
            "sessions": len(sessions),
            "max_sessions": self.limits.max_sessions,
            "free_sessions": max(0, self.limits.max_sessions - len(sessions)),
            "draining": self.drain.active,
            "device": str(self.model.weights.device),
            "engines": [
                {"session": s.number, "failed_frames": s.failures, **s.engine.figures()}
                for s in sessions
            ],
            "loaded": self.model.figures(),
        }

    async def health(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _refuse(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        return web.json_response(self.figures())

    async def metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _refuse(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        text = serve_metrics_text(self.figures())
        return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_TYPE})

    async def offer(self, request: web.Request) -> web.Response:
        # The token first, then the session limit: neither reads the body.
        if not self._authorized(request):
            return _refuse(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        refusal = self.no_room()
        if refusal is not None:
            return refusal
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return _refuse(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
        try:
            body = await request.read()  # bounded by client_max_size
        except web.HTTPRequestEntityTooLarge:
            return _refuse(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _refuse(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}')
        if (
            not isinstance(data, dict)
            or data.get("type") != "offer"
            or not isinstance(data.get("sdp"), str)
        ):
            return _refuse(400, 'the body must be {"sdp": "...", "type": "offer"}')
        number = next(self._numbers)
        session = PeerSession(self, number)
        self.sessions[number] = session  # counted at once, so concurrent offers respect the limit
        try:
            await session.pc.setRemoteDescription(RTCSessionDescription(data["sdp"], "offer"))
            if not session.has_video or session.pc.sctp is None:
                raise ValueError("it must carry a video track and a data channel")
            await session.pc.setLocalDescription(await session.pc.createAnswer())
        except Exception as err:  # a malformed SDP: the client's mistake
            await session.close()
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            return _refuse(400, f"unusable SDP offer ({reason})")
        session.tasks.append(asyncio.ensure_future(session.run()))
        peer = request.remote or "?"
        log.info("session %d: %s connected (%d open)", number, peer, len(self.sessions))
        answer = session.pc.localDescription
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    async def _close_all(self, _: web.Application) -> None:
        for session in list(self.sessions.values()):
            await session.close()


def _refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


@dataclass(frozen=True)
class ServeOptions:
    """What ``streamv2v serve`` was asked for (daemon/cli parses them)."""

    model: str
    listen: str = "127.0.0.1"
    port: int = 8770
    token_file: Path | None = None
    max_sessions: int = 4
    device: str | None = None
    vae: str | None = None
    loras: tuple[str, ...] = ()
    allow_pickle: bool = False
    # WHIP/WHEP and the page (daemon/remote/browser.py)
    presets: Path | None = None  #: folder of presets for WHIP sessions (beside the bundled)
    ice_servers: tuple[str, ...] = ()  #: STUN/TURN URLs offered to WHIP/WHEP clients (Link)
    agent_port: int | None = None  #: HAProxy agent-check port (daemon/remote/agent.py)


def serve_token(options: ServeOptions) -> str:
    """The token, read once; UserError when --listen leaves loopback without one."""
    token = ""
    if options.token_file is not None:
        try:
            token = read_token_file(options.token_file)
        except OSError as err:
            raise UserError(
                f"--token-file {options.token_file}: cannot read it ({err.strerror or err})"
            ) from None
        if not token:
            raise UserError(f"--token-file {options.token_file}: the file is empty")
    if not token and not is_loopback(options.listen):
        raise UserError(
            f"--listen {options.listen} serves other machines: give it a token with "
            "--token-file FILE (e.g. `python -c 'import secrets; print(secrets.token_hex(32))' "
            "> token && chmod 600 token`, the same file on the daemon's side as engine.token_file)"
        )
    return token


def serve_runner(app: web.Application) -> web.AppRunner:
    """The runner ``serve`` runs ``app`` on: aiohttp's own parser errors answered as ours
    (JSON, nothing of the request echoed; daemon/http_errors.py)."""
    return JsonErrorRunner(app, access_log=None, handle_signals=False)
