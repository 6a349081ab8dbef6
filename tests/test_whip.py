"""WHIP in, WHEP out, on `streamv2v serve` in a real subprocess (the shipped tiny style model),
with real aiortc clients over real HTTP and WebRTC on 127.0.0.1: a publisher sending frames of a
known colour (sendrecv: the styled video comes back on its own connection) and two WHEP viewers.
The demo presets change colour measurably (warm: red over blue, cool: blue over red). And every
RFC 9725 answer to a wrong request, with its status code; the token in no log, header or URL.

One `serve` for the module (--max-sessions 1, so "full" is one session away).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_daemon import wait_for
from test_remote import free_port
from whip_helpers import Loop, Publisher, Viewer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "whip-test-token-5e3c1a"
GREY = (128, 128, 128)
STUN = "stun:stun.example.net:3478"


class Serve:
    """`streamv2v serve` with WHIP/WHEP, its log in a file the tests read."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "token").write_text(TOKEN + "\n")
        presets = tmp / "presets"
        presets.mkdir()
        (presets / "hot.toml").write_text('description = "warmer"\nprompt = "a warm scene"\n')
        self.port = free_port()
        self.log_path = tmp / "serve.log"
        code = "import sys; from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["serve", "--port", str(self.port), "--token-file", str(tmp / "token")]
        args += ["--max-sessions", "1", "--presets", str(presets), "--ice-server", STUN]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, cwd=ROOT, stdout=self.log, stderr=self.log
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict | None = None,
        token: str | None = TOKEN,
    ) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=all_headers)
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            conn.close()

    def stop(self) -> str:
        self.proc.terminate()  # a clean exit takes seconds on a loaded machine: not waited for
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    server = Serve(tmp_path_factory.mktemp("whip"))
    try:
        ready = lambda: server.proc.poll() is None and _up(server)  # noqa: E731
        assert wait_for(ready, 90, 0.2), server.log_path.read_text()
        yield server
    finally:
        log = server.stop()
        assert TOKEN not in log  # the token never reaches the log, whatever the module did


def _up(server: Serve) -> bool:
    try:
        return server.request("GET", "/presets")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def loop():
    loop = Loop()
    yield loop
    loop.close()


def offer_of(loop: Loop, direction: str = "sendrecv") -> str:
    """A real aiortc offer (video in ``direction``)."""
    from aiortc import RTCPeerConnection
    from whip_helpers import ColourTrack

    async def make() -> str:
        pc = RTCPeerConnection()
        track = ColourTrack(GREY) if direction != "recvonly" else "video"
        pc.addTransceiver(track, direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return loop.run(make())


SDP = {"Content-Type": "application/sdp"}


def test_wrong_requests_get_the_rfc_answers(serve, loop):
    offer = offer_of(loop)
    # 401 without or with a wrong token; the body is not read (a huge declared body answered
    # at once, the connection not waiting for bytes that never come).
    for token in (None, "wrong"):
        status, headers, _ = serve.request("POST", "/whip", offer, SDP, token=token)
        assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=5)
    conn.putrequest("POST", "/whip")
    conn.putheader("Content-Type", "application/sdp")
    conn.putheader("Content-Length", str(50_000_000))
    conn.endheaders()
    t0 = time.monotonic()
    assert conn.getresponse().status == 401 and time.monotonic() - t0 < 2
    conn.close()
    # 415 for another content type, 400 for text that is no SDP or sends no video.
    status, headers, _ = serve.request("POST", "/whip", offer, {"Content-Type": "text/plain"})
    assert status == 415 and headers["Accept-Post"] == "application/sdp"
    assert serve.request("POST", "/whip", "hello", SDP)[0] == 400
    assert serve.request("POST", "/whip", offer_of(loop, "recvonly"), SDP)[0] == 400
    assert serve.request("POST", "/whip", "v=0\r\n" + "x" * 70_000, SDP)[0] == 413
    # An unknown preset: 400 naming the ones there are.
    status, _, body = serve.request("POST", "/whip?preset=nope", offer, SDP)
    assert status == 400 and "warm" in json.loads(body)["error"]
    # 404 for sessions and viewers that do not exist; /whep with no session running.
    for method, path in (
        ("DELETE", "/whip/0123abcd"),
        ("PATCH", "/whip/0123abcd"),
        ("GET", "/whip/0123abcd"),
        ("PUT", "/whip/0123abcd/preset"),
        ("POST", "/whep/0123abcd"),
        ("POST", "/whep"),
        ("DELETE", "/whep/0123abcd/89ef"),
    ):
        body = offer if method == "POST" else '{"name": "warm"}'
        status, headers, reply = serve.request(method, path, body, SDP)
        assert status == 404, (method, path, status)
        assert json.loads(reply)["error"]
    # CORS preflight: no credentials needed, the SDP type accepted, the headers a page reads.
    status, headers, _ = serve.request("OPTIONS", "/whip", token=None)
    assert status == 204 and headers["Accept-Post"] == "application/sdp"
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Location" in headers["Access-Control-Expose-Headers"]


def test_the_library_lists_the_demo_presets_and_the_folder(serve):
    status, _, body = serve.request("GET", "/presets")
    listing = json.loads(body)
    names = [p["name"] for p in listing["presets"]]
    assert status == 200 and {"warm", "cool", "hot", "passthrough"} <= set(names)
    assert "config" not in names
    assert serve.request("GET", "/presets", token=None)[0] == 401


def wait_warmth(receivers, sign: int, since: float, timeout: float = 20) -> bool:
    """Every receiver got a frame after ``since`` whose warmth has ``sign`` by a clear margin."""

    def seen() -> bool:
        return all(any(t > since and sign * w > 20 for t, w in r.history[-10:]) for r in receivers)

    return wait_for(seen, timeout)


@pytest.mark.slow
def test_publish_style_switch_view_and_delete(serve, loop, capsys):
    pub = Publisher(loop, serve.base, TOKEN, GREY)
    assert pub.start("?preset=warm") == 201
    headers = pub.headers
    assert headers["Content-Type"] == "application/sdp"
    assert headers["Location"].startswith("/whip/") and headers["ETag"].startswith('"')
    assert headers["Link"] == f'<{STUN}>; rel="ice-server"'
    assert TOKEN not in str(list(headers.items()))
    viewers = [Viewer(loop, serve.base, TOKEN), Viewer(loop, serve.base, TOKEN)]
    try:
        assert viewers[0].start(f"/whep/{pub.id}") == 201
        assert viewers[1].start("/whep") == 201  # the one session running
        assert viewers[0].location.startswith(f"/whep/{pub.id}/")
        receivers = [pub.back, *(v.received for v in viewers)]
        # The grey camera comes back warm, to the publisher and to both viewers.
        assert wait_warmth(receivers, +1, 0.0, 60), [r.frames for r in receivers]

        # Full: a second publisher is told to come back later; trickle ICE is not supported.
        status, headers, _ = serve.request("POST", "/whip", offer_of(loop), SDP)
        assert status == 503 and int(headers["Retry-After"]) > 0
        status, headers, _ = serve.request(
            "PATCH",
            pub.location,
            "a=candidate",
            {"Content-Type": "application/trickle-ice-sdpfrag"},
        )
        assert status == 405 and "DELETE" in headers["Allow"]

        # A live switch, seen by everyone; the frames are encoded once for the three listeners.
        t0 = time.monotonic()
        status, _, body = serve.request(
            "PUT",
            f"{pub.location}/preset",
            '{"name": "cool"}',
            {"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(body) == {"preset": "cool"}
        assert wait_warmth(receivers, -1, t0), [r.history[-3:] for r in receivers]
        figures = json.loads(serve.request("GET", pub.location)[2])
        assert figures["preset"] == "cool" and figures["viewers"] == 2
        assert figures["listeners"] == {"VP8": 3}
        encoded, styled = figures["encoded"]["VP8"], figures["engine"]["frames"]
        received = sum(r.frames for r in receivers)
        assert encoded <= styled < received, (encoded, styled, received)

        # Round trip through the server (passthrough: the colour the publisher sends, back).
        serve.request("PUT", f"{pub.location}/preset", '{"name": "passthrough"}')
        trips = []
        for colour, sign in (((200, 40, 40), 1), ((40, 40, 200), -1), ((200, 40, 40), 1)):
            t0 = time.monotonic()
            pub.set_colour(colour)
            assert wait_warmth([pub.back], sign, t0, 10)
            arrived = next(t for t, w in pub.back.history if t > t0 and sign * w > 20)
            trips.append((arrived - t0) * 1000)
        with capsys.disabled():
            print(f"\nWHIP round trip on loopback (passthrough): {statistics.median(trips):.0f} ms")

        # DELETE ends the session and both viewers.
        status, _, _ = serve.request("DELETE", pub.location)
        assert status == 200
        assert wait_for(lambda: all(v.state in ("closed", "failed") for v in viewers), 10)
        assert wait_for(lambda: pub.back.ended and all(v.received.ended for v in viewers), 10)
        assert serve.request("GET", pub.location)[0] == 404
        assert serve.request("POST", f"/whep/{pub.id}", offer_of(loop, "recvonly"), SDP)[0] == 404
    finally:
        for viewer in viewers:
            viewer.close()
        pub.close()


@pytest.mark.slow
def test_an_h264_sendonly_publisher_as_obs_sends_and_an_h264_viewer(serve, loop):
    """OBS's WHIP output offers H264 only and sendonly: nothing comes back on its connection;
    a viewer that takes H264 only gets the styled stream encoded in H264."""
    assert wait_for(
        lambda: serve.request("POST", "/whep", offer_of(loop, "recvonly"), SDP)[0] == 404, 10
    )  # the last test's session is gone
    pub = Publisher(loop, serve.base, TOKEN, GREY, back=False, codec="H264")
    viewer = Viewer(loop, serve.base, TOKEN, codec="H264")
    try:
        assert pub.start("?preset=warm") == 201
        assert viewer.start("/whep") == 201
        assert wait_warmth([viewer.received], +1, 0.0, 60), viewer.received.frames
        figures = json.loads(serve.request("GET", pub.location)[2])
        assert figures["listeners"] == {"H264": 1}  # no return track: nobody wants VP8
        assert serve.request("DELETE", pub.location)[0] == 200
    finally:
        viewer.close()
        pub.close()
