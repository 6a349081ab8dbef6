"""WHEP egress on ``serve``: receive-only viewers of a WHIP session's styled stream (an OBS
Browser Source, a second screen, a media server pulling it).

    POST   /whep/ID                 application/sdp offer (recvonly video) -> 201, answer,
                                    Location /whep/ID/VIEWER
    POST   /whep                    the same for the one WHIP session running (404 with none,
                                    409 with several: name one)
    DELETE /whep/ID/VIEWER          ends that viewer
    PATCH  /whep/ID/VIEWER          405 (no trickle ICE, no ICE restart; see whip.py)

Viewers share the session's encoded frames (relay.py): each frame is encoded once per codec in
use, whatever the number of viewers; a viewer is offered the codec the session already encodes
first. Viewers do not count against ``--max-sessions`` (no engine work); ``max_viewers`` per
session bounds them (503 + Retry-After past it).
"""

from __future__ import annotations

import logging
import secrets

from aiohttp import web
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from daemon.remote.relay import ENCODERS, PacketTrack
from daemon.remote.whip import (
    CORS,
    PREFLIGHT,
    RETRY_AFTER_S,
    SDP,
    WhipEndpoints,
    WhipSession,
    first_line,
    offer_problem,
    problem,
    read_offer,
    sent_codec,
)

log = logging.getLogger("streamv2v.serve")


class Viewer:
    """One WHEP viewer: its peer connection and the track that hands it the relay's packets."""

    def __init__(self, session: WhipSession) -> None:
        self.session = session
        self.id = secrets.token_hex(8)
        self.pc = RTCPeerConnection()
        self.track = PacketTrack()
        self.closed = False
        self.pc.on("connectionstatechange", self._on_state)

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def answer(self, sdp: str) -> str:
        """Answer ``sdp`` preferring the codec the session already encodes."""
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        used = set(self.session.relays)
        codecs = sorted(codecs, key=lambda c: c.mimeType.split("/")[-1] not in used)
        transceiver.setCodecPreferences(codecs)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        answer = self.pc.localDescription.sdp
        codec = sent_codec(answer)
        if codec is None:
            raise ValueError(f"no video codec in common (this server sends {sorted(ENCODERS)})")
        relay = self.session.relay(codec)
        relay.subscribe(self.track)
        relay.watch_keyframe_requests(transceiver.sender)
        return answer

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.track.stop()
        self.session.viewers.pop(self.id, None)
        log.info(
            "session %d: viewer left (%d left)", self.session.number, len(self.session.viewers)
        )
        await self.pc.close()


class WhepEndpoints:
    """The WHEP routes, beside the WHIP ones whose sessions they show."""

    def __init__(self, whip: WhipEndpoints) -> None:
        self.whip = whip
        router = whip.server.app.router
        router.add_route("OPTIONS", "/whep", whip.preflight)
        router.add_post("/whep", self.post)
        router.add_route("OPTIONS", "/whep/{id}", whip.preflight)
        router.add_post("/whep/{id}", self.post)
        router.add_route("OPTIONS", "/whep/{id}/{viewer}", self.preflight)
        router.add_delete("/whep/{id}/{viewer}", self.delete)
        router.add_patch("/whep/{id}/{viewer}", self.patch)

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=PREFLIGHT)

    def _session(self, request: web.Request) -> WhipSession | web.Response:
        sessions = self.whip.sessions
        wanted = request.match_info.get("id")
        if wanted is not None:
            session = sessions.get(wanted)
            if session is None:
                return problem(404, "no such WHIP session (ended, or never made here)")
            return session
        if not sessions:
            return problem(404, "no WHIP session runs: publish one first (POST /whip)")
        if len(sessions) > 1:
            return problem(409, f"{len(sessions)} WHIP sessions run: name one (POST /whep/ID)")
        return next(iter(sessions.values()))

    async def post(self, request: web.Request) -> web.Response:
        refusal = self.whip.gate.refusal(request)
        if refusal is not None:
            return refusal
        session = self._session(request)
        if isinstance(session, web.Response):
            return session
        if len(session.viewers) >= self.whip.max_viewers:
            return problem(
                503,
                f"this session has {len(session.viewers)} viewers, the most it takes",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        refusal = await offer_problem(request)
        if refusal is not None:
            return refusal
        offer = await read_offer(
            request,
            ("recvonly", "sendrecv"),
            "a WHEP offer must receive video (a recvonly video transceiver)",
        )
        if isinstance(offer, web.Response):
            return offer
        sdp, _ = offer
        viewer = Viewer(session)
        session.viewers[viewer.id] = viewer
        try:
            answer = await viewer.answer(sdp)
        except Exception as err:
            await viewer.close()
            return problem(400, f"unusable SDP offer ({first_line(err)})")
        log.info(
            "session %d: viewer %s joined (%d watching)",
            session.number,
            request.remote or "?",
            len(session.viewers),
        )
        headers = [
            ("Content-Type", SDP),
            ("Location", f"/whep/{session.id}/{viewer.id}"),
            *self.whip.link_headers(),
            *CORS.items(),
        ]
        return web.Response(status=201, body=answer.encode(), headers=headers)

    def _viewer(self, request: web.Request) -> Viewer | web.Response:
        session = self.whip.sessions.get(request.match_info["id"])
        viewer = session.viewers.get(request.match_info["viewer"]) if session else None
        if viewer is None:
            return problem(404, "no such WHEP viewer (it left, or its session ended)")
        return viewer

    async def delete(self, request: web.Request) -> web.Response:
        refusal = self.whip.gate.refusal(request)
        if refusal is not None:
            return refusal
        viewer = self._viewer(request)
        if isinstance(viewer, web.Response):
            return viewer
        await viewer.close()
        return web.Response(status=200, headers=CORS)

    async def patch(self, request: web.Request) -> web.Response:
        refusal = self.whip.gate.refusal(request)
        if refusal is not None:
            return refusal
        viewer = self._viewer(request)
        if isinstance(viewer, web.Response):
            return viewer
        return problem(
            405,
            "this server supports neither trickle ICE nor ICE restarts: its answer holds all "
            "its candidates",
            Allow="DELETE, OPTIONS",
        )


__all__ = ["SDP", "Viewer", "WhepEndpoints"]
