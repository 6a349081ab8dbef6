"""The control-plane server's parts on their own: bounded JSON, the login codes and sessions,
and the preview's one-encode-per-frame sharing on a real event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest

from daemon.control.auth import COOKIE, Auth, Refused, session_cookie
from daemon.control.bounded_json import (
    MAX_DEPTH,
    MAX_NUMBER_CHARS,
    BodyError,
    nesting_depth,
    parse_body,
)
from daemon.control.mjpeg import FrameStore


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),  # brackets inside a string do not count
        (b'["\\"[[[", [1]]', 2),  # nor after an escaped quote
        (b'["\\\\", [[1]]]', 3),  # an escaped backslash ends the escape
        (b"1", 0),
    ],
)
def test_nesting_depth_reads_strings_and_escapes(raw, depth):
    assert nesting_depth(raw) == depth


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested more than"),
        (b"[" * 60_000, "nested more than"),
        (b'{"n": ' + b"9" * (MAX_NUMBER_CHARS + 1) + b"}", "characters"),
        (b'{"n": 1.' + b"5" * 5000 + b"}", "characters"),
        (b'{"n": NaN}', "NaN is not JSON"),
        (b'{"n": "\xff"}', "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"x" * (64 * 1024 + 1), "at most"),
    ],
)
def test_bodies_outside_the_bounds_are_body_errors(raw, reason):
    with pytest.raises(BodyError, match=reason):
        parse_body(raw)


def test_bodies_within_the_bounds_parse():
    deep = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_body(deep) is not None
    assert parse_body(b'{"name": "anime", "n": 12, "x": 1.5}') == {
        "name": "anime",
        "n": 12,
        "x": 1.5,
    }
    assert parse_body(b"  ") is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_login_code_works_once_and_only_for_a_minute():
    clock = Clock()
    auth = Auth(clock=clock)
    code = auth.new_login_code()
    session = auth.redeem(code)
    assert session is not None and auth.session_ok(session)
    assert auth.redeem(code) is None  # spent
    late = auth.new_login_code()
    clock.now += 61
    assert auth.redeem(late) is None  # expired
    clock.now += 12 * 3600
    assert not auth.session_ok(session)  # the session expired too
    assert auth.redeem("made-up") is None and not auth.session_ok("made-up")


def test_changes_need_the_token_or_a_session_from_the_page_itself():
    auth = Auth(token="secret-token")
    session = auth.redeem(auth.new_login_code())
    assert auth.bearer_ok("Bearer secret-token") and auth.bearer_ok("bearer  secret-token ")
    for header in ("Bearer secret-tokeN", "Bearer é", "Bearer \udcff", "Basic x", "", None):
        assert not auth.bearer_ok(header)
    host = "127.0.0.1:8766"
    cookie = f"other=1; {COOKIE}={session}"
    assert session_cookie(cookie) == session and session_cookie("a=b") is None
    auth.check_change({"Authorization": "Bearer secret-token"}, "f")  # no Origin needed
    auth.check_change({"Cookie": cookie, "Host": host, "Origin": f"http://{host}"}, "f")
    for origin in (None, "http://evil.example", "null", f"http://{host}0"):
        headers = {"Cookie": cookie, "Host": host}
        if origin is not None:
            headers["Origin"] = origin
        with pytest.raises(Refused) as refused:
            auth.check_change(headers, "f")
        assert refused.value.status == 403
    with pytest.raises(Refused) as refused:
        auth.check_change({"Cookie": f"{COOKIE}=forged", "Origin": f"http://{host}"}, "the-file")
    assert refused.value.status == 401 and "the-file" in refused.value.reason


def test_many_clients_share_one_encode_per_frame_and_publish_never_waits():
    store = FrameStore(quality=80)
    frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)

    async def crowd() -> list:
        store.open(asyncio.get_running_loop())
        waiting = [asyncio.ensure_future(store.newer(0, timeout=5)) for _ in range(50)]
        await asyncio.sleep(0.05)  # all 50 wait for the first frame
        publisher = threading.Thread(target=store.publish, args=(frame,))
        publisher.start()
        got = await asyncio.gather(*waiting)
        publisher.join()
        latest = await store.latest()
        store.close()
        return [*got, latest]

    answers = asyncio.run(crowd())
    assert {seq for seq, _ in answers} == {1}
    assert len({id(jpeg) for _, jpeg in answers}) == 1  # the very same bytes for everyone
    assert store.frames_encoded == 1


def test_a_stalled_viewer_is_cut_off_and_the_others_keep_watching(monkeypatch):
    import socket
    import time

    import cv2

    from daemon.control import guard
    from daemon.control.preview import PreviewServer

    monkeypatch.setattr(guard, "CLIENT_TIMEOUT_S", 1.0)
    noise = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    stop = threading.Event()

    def publish(server: PreviewServer) -> None:
        i = 0
        while not stop.is_set():  # ~100 KB frames: far more than the stalled socket holds
            server.publish(np.roll(noise, i, axis=1))
            i += 1
            time.sleep(0.03)

    with PreviewServer(port=0) as server:
        publisher = threading.Thread(target=publish, args=(server,), daemon=True)
        publisher.start()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", server.bound_port))
        stalled.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        capture = cv2.VideoCapture(server.stream_url, cv2.CAP_FFMPEG)
        try:
            assert capture.read()[0] and server.clients == 2
            end = time.monotonic() + 5
            while server.clients > 1 and time.monotonic() < end:
                assert capture.read()[0]  # the healthy viewer keeps getting frames
            assert server.clients == 1, "the stalled viewer was never dropped"
            assert capture.read()[0]
            stalled.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                while stalled.recv(1 << 16):
                    pass  # what was buffered, then the end: the server cut it
        finally:
            stop.set()
            publisher.join(timeout=2)
            capture.release()
            stalled.close()
