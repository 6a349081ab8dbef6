"""WHIP ingest on ``serve`` (RFC 9725): a browser, OBS 30+ or any WHIP client sends its camera
with one HTTP request and gets the styled video back on the same connection when its offer is
sendrecv; the session is the same one a daemon's offer makes (server.py's PeerSession, its engine
session on the shared engine thread), only its preset comes from the server's library.

    POST   /whip[?preset=NAME]   application/sdp offer -> 201, answer, Location /whip/ID, ETag
    DELETE /whip/ID              ends the session (and its WHEP viewers)
    PATCH  /whip/ID              405: no trickle ICE and no ICE restart (the answer carries all
                                 of the server's candidates; aiortc gathers before answering)
    GET    /whip/ID              the session's figures (JSON)
    PUT    /whip/ID/preset       {"name": NAME}: switched live, blended as in the daemon
    GET    /presets              the library
    OPTIONS on each              CORS preflight (no credentials needed), Accept-Post

Each call but OPTIONS needs the token (``Authorization: Bearer``) or the page's session cookie
with a same-origin Origin (daemon/control/auth.py), checked before the body is read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription
from av import VideoFrame

from daemon.control.auth import Auth, session_cookie
from daemon.dataplane.frames import fit_to
from daemon.remote.library import ServePresets
from daemon.remote.protocol import MAX_OFFER_BYTES
from daemon.remote.relay import ENCODERS, EncodedRelay, PacketTrack
from daemon.remote.server import PeerSession
from daemon.styles.presets import Preset, UnknownPreset
from streamv2v import EngineConfig

if TYPE_CHECKING:
    from daemon.remote.server import RemoteServer

log = logging.getLogger("streamv2v.serve")

SDP = "application/sdp"
RETRY_AFTER_S = 10
#: The request and response headers a page on another origin may use (CORS).
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Retry-After",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "POST, GET, PUT, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Max-Age": "600",
}


def problem(status: int, reason: str, **headers: str) -> web.Response:
    """An error answer: JSON ``{"error": reason}``, CORS-readable; nothing of the request."""
    return web.json_response({"error": reason}, status=status, headers={**CORS, **headers})


def video_direction(sdp: str) -> str | None:
    """The direction of the offer's first video section, or None when it has none (ValueError
    when the text is no SDP aiortc can read)."""
    description = SessionDescription.parse(sdp)
    for media in description.media:
        if media.kind == "video":
            return media.direction or "sendrecv"
    return None


def sent_codec(sdp: str) -> str | None:
    """The codec an answer sends video in: the first of its video section (SDP name)."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "video" and media.direction in ("sendrecv", "sendonly"):
            for codec in media.rtp.codecs:
                name = codec.mimeType.split("/")[-1]
                if name in ENCODERS:
                    return name
    return None


class Gate:
    """Who may call: the serve token as a Bearer header, or a page session (cookie + Origin)."""

    def __init__(self, token: str) -> None:
        self.open = not token
        self.auth = Auth(token or None)

    def refusal(self, request: web.Request) -> web.Response | None:
        headers = request.headers
        if self.open or self.auth.bearer_ok(headers.get("Authorization")):
            return None
        if self.auth.session_ok(session_cookie(headers.get("Cookie"))):
            origin, host = headers.get("Origin"), headers.get("Host")
            # http: or, behind a TLS proxy (what a camera page on another machine needs), https:
            if request.method in ("GET", "HEAD") or origin in (f"http://{host}", f"https://{host}"):
                return None
            return problem(403, "a browser call must come from this server's page; reload it")
        return problem(
            401,
            "missing or wrong token: send 'Authorization: Bearer TOKEN' (the first line of "
            "serve's --token-file), or log the page in",
            **{"WWW-Authenticate": 'Bearer realm="streamv2v"'},
        )


class WhipSession(PeerSession):
    """A WHIP client's session: the daemon's session type, fed from the server's presets; its
    styled frames go to relays (encoded once per codec) for the client and its WHEP viewers."""

    def __init__(self, server: RemoteServer, number: int, whip: WhipEndpoints) -> None:
        super().__init__(server, number)
        self.whip = whip
        self.id = secrets.token_hex(8)
        self.etag = f'"{secrets.token_hex(8)}"'
        self.wants_back = False
        self.back: PacketTrack | None = None
        self.relays: dict[str, EncodedRelay] = {}
        self.viewers: dict[str, Any] = {}  # viewer id -> its RTCPeerConnection (whep.py)
        self.preset: Preset | None = None

    def _on_track(self, track: Any) -> None:
        if track.kind != "video":
            return
        self.has_video = True
        if self.wants_back:
            self.back = PacketTrack()
            self.pc.addTrack(self.back)
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    def relay(self, codec: str) -> EncodedRelay:
        """The relay of ``codec`` (made on first use)."""
        if codec not in self.relays:
            self.relays[codec] = EncodedRelay(codec)
        return self.relays[codec]

    def publish(self, frame: VideoFrame) -> None:
        for relay in self.relays.values():
            relay.publish(frame)

    def _process(self, frame: VideoFrame) -> tuple[VideoFrame | None, int, float]:
        """Engine thread: the client's frame at the engine's size, styled (or as it is when
        the preset is a passthrough)."""
        base = self.whip.presets.base
        image = fit_to(frame.to_ndarray(format="rgb24"), base.width, base.height)
        if self.preset is not None and self.preset.passthrough:
            return VideoFrame.from_ndarray(image, format="rgb24"), frame.pts, 0.0
        styled, pts, cost_ms = self.engine.process(image, frame.pts)
        if styled is None:
            return None, pts, cost_ms
        return VideoFrame.from_ndarray(styled, format="rgb24"), pts, cost_ms

    async def apply(self, preset: Preset) -> None:
        """Run ``preset`` on the engine thread (blended from the last one)."""
        base: EngineConfig = self.whip.presets.base
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self.server.model.executor, lambda: self.engine.apply(base, preset)
        )
        self.preset = preset
        log.info("session %d: preset %s", self.number, preset.name)

    async def start(self, preset: Preset) -> None:
        try:
            await self.apply(preset)
        except Exception as err:  # a preset the engine cannot run: the session ends
            log.warning("session %d: preset %s failed (%s)", self.number, preset.name, err)
            await self.close()
            return
        await self.run()

    async def close(self) -> None:
        if self.closed:
            return
        for viewer in list(self.viewers.values()):
            await viewer.close()
        self.viewers.clear()
        for relay in self.relays.values():
            relay.close()
        self.whip.sessions.pop(self.id, None)
        await super().close()

    def figures(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "preset": self.preset.name if self.preset is not None else None,
            "viewers": len(self.viewers),
            "engine": self.engine.figures(),
            "encoded": {c: r.frames_encoded for c, r in self.relays.items()},
            "listeners": {c: len(r.listeners) for c, r in self.relays.items()},
            "encode_ms": {
                c: round(1000 * r.encode_s / r.frames_encoded, 2)
                for c, r in self.relays.items()
                if r.frames_encoded
            },
        }


class WhipEndpoints:
    """The WHIP routes on a RemoteServer, the sessions they made, and the preset library."""

    def __init__(
        self,
        server: RemoteServer,
        presets: ServePresets,
        ice_servers: tuple[str, ...] = (),
        max_viewers: int = 8,
    ) -> None:
        self.server = server
        self.presets = presets
        self.ice_servers = ice_servers
        self.max_viewers = max_viewers
        self.gate = Gate(server.limits.token)
        self.sessions: dict[str, WhipSession] = {}
        router = server.app.router
        router.add_route("OPTIONS", "/whip", self.preflight)
        router.add_post("/whip", self.post)
        router.add_route("OPTIONS", "/whip/{id}", self.preflight)
        router.add_get("/whip/{id}", self.get, allow_head=False)
        router.add_delete("/whip/{id}", self.delete)
        router.add_patch("/whip/{id}", self.patch)
        router.add_route("OPTIONS", "/whip/{id}/preset", self.preflight)
        router.add_put("/whip/{id}/preset", self.put_preset)
        router.add_get("/presets", self.get_presets, allow_head=False)

    # ------------------------------------------------------------------ helpers
    def link_headers(self) -> list[tuple[str, str]]:
        return [("Link", f'<{url}>; rel="ice-server"') for url in self.ice_servers]

    def full(self) -> web.Response | None:
        limits, sessions = self.server.limits, self.server.sessions
        if self.server.drain.active:
            return problem(
                503,
                "the server is draining (it takes no new sessions)",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        if len(sessions) < limits.max_sessions:
            return None
        return problem(
            503,
            f"the server runs {len(sessions)} session(s), its limit (streamv2v serve "
            f"--max-sessions {limits.max_sessions}); try again later",
            **{"Retry-After": str(RETRY_AFTER_S)},
        )

    def session(self, request: web.Request) -> WhipSession | None:
        return self.sessions.get(request.match_info["id"])

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**PREFLIGHT, "Accept-Post": SDP})

    # ------------------------------------------------------------------ routes
    async def post(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request) or self.full()
        if refusal is None:
            refusal = await offer_problem(request)
        if refusal is not None:
            return refusal
        try:
            name = request.query.get("preset")
            preset = self.presets.default if name is None else self.presets.get(name)
        except UnknownPreset as err:
            return problem(400, str(err))
        offer = await read_offer(
            request,
            ("sendonly", "sendrecv"),
            "the offer must send video (a sendonly or sendrecv video track)",
        )
        if isinstance(offer, web.Response):
            return offer
        sdp, direction = offer
        number = next(self.server._numbers)
        session = WhipSession(self.server, number, self)
        session.wants_back = direction == "sendrecv"
        self.server.sessions[number] = session  # counted at once: concurrent offers see it
        self.sessions[session.id] = session
        try:
            await session.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            await session.pc.setLocalDescription(await session.pc.createAnswer())
        except Exception as err:  # a malformed SDP: the client's mistake
            await session.close()
            return problem(400, f"unusable SDP offer ({first_line(err)})")
        answer = session.pc.localDescription.sdp
        if session.back is not None:
            codec = sent_codec(answer)
            if codec is not None:
                relay = session.relay(codec)
                relay.subscribe(session.back)
                relay.watch_keyframe_requests(_sender_of(session.pc, session.back))
        session.tasks.append(asyncio.ensure_future(session.start(preset)))
        log.info(
            "session %d: WHIP client %s connected, preset %s (%d open)",
            number,
            request.remote or "?",
            preset.name,
            len(self.server.sessions),
        )
        headers = [
            ("Content-Type", SDP),
            ("Location", f"/whip/{session.id}"),
            ("ETag", session.etag),
            *self.link_headers(),
            *CORS.items(),
        ]
        return web.Response(status=201, body=answer.encode(), headers=headers)

    async def delete(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
        session = self.session(request)
        if session is None:
            return problem(404, "no such WHIP session (ended, or never made here)")
        await session.close()
        return web.Response(status=200, headers=CORS)

    async def patch(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
        if self.session(request) is None:
            return problem(404, "no such WHIP session (ended, or never made here)")
        return problem(
            405,
            "this server supports neither trickle ICE nor ICE restarts (RFC 9725 4.3.1): "
            "its answer holds all its candidates; send the offer once ICE gathering is complete",
            Allow="GET, DELETE, OPTIONS",
        )

    async def get(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
        session = self.session(request)
        if session is None:
            return problem(404, "no such WHIP session (ended, or never made here)")
        return web.json_response(session.figures(), headers=CORS)

    async def put_preset(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
        session = self.session(request)
        if session is None:
            return problem(404, "no such WHIP session (ended, or never made here)")
        name = await _json_name(request)
        if isinstance(name, web.Response):
            return name
        try:
            preset = self.presets.get(name)
        except UnknownPreset as err:
            return problem(400, str(err))
        try:
            await session.apply(preset)
        except Exception as err:  # the engine could not run it (e.g. its LoRA failed)
            return problem(422, f"preset {name} cannot run: {first_line(err)}")
        return web.json_response({"preset": preset.name}, headers=CORS)

    async def get_presets(self, request: web.Request) -> web.Response:
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
        default = self.presets.default.name
        body = {"presets": self.presets.listing(), "default": default}
        return web.json_response(body, headers=CORS)


async def offer_problem(request: web.Request) -> web.Response | None:
    """415 unless the body is declared SDP, 413 when it is declared too large (the body is
    bounded by the application's client_max_size as well)."""
    if request.content_type != SDP:
        return problem(
            415, f"the offer must be sent as Content-Type: {SDP}", **{"Accept-Post": SDP}
        )
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        return problem(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
    return None


async def read_offer(
    request: web.Request, wanted: tuple[str, ...], wrong: str
) -> tuple[str, str] | web.Response:
    """(the offer's SDP, its video direction), or the 4xx answer: 413 past the bound, 400 for
    text that is not UTF-8 or no SDP, 400 (``wrong``) for a direction not in ``wanted``."""
    try:
        sdp = await request.text()  # bounded by the application's client_max_size
    except web.HTTPRequestEntityTooLarge:
        return problem(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
    except UnicodeDecodeError:
        return problem(400, "the offer is not UTF-8 text")
    try:
        direction = video_direction(sdp)
    except Exception as err:  # aiortc's parser on text that is no SDP
        return problem(400, f"unusable SDP offer ({first_line(err)})")
    if direction not in wanted:
        return problem(400, wrong)
    return sdp, direction


async def _json_name(request: web.Request) -> str | web.Response:
    if request.content_length is not None and request.content_length > 4096:
        return problem(413, "body larger than 4096 bytes")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        return problem(400, 'the body must be JSON: {"name": "PRESET"}')
    except web.HTTPRequestEntityTooLarge:
        return problem(413, "body too large")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return problem(400, 'the body must be {"name": "PRESET"}')
    return data["name"]


def _sender_of(pc: Any, track: Any) -> Any:
    return next((s for s in pc.getSenders() if s.track is track), None)


def first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
