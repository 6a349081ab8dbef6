"""Capture with real parts: a video file written by OpenCV, an HTTP MJPEG camera served by the
test itself (stopped and restarted on the same port), the test pattern; plus the slot and the
frame helpers the capture thread relies on."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from daemon.config import CameraConfig
from daemon.dataplane.camera import CameraSource
from daemon.dataplane.frames import Frame, fit_to, unavailable_frame
from daemon.dataplane.frames import test_pattern as make_pattern
from daemon.dataplane.slots import LatestSlot

RED = (210, 40, 40)
BLUE = (40, 60, 210)


def solid(rgb: tuple[int, int, int], width: int = 80, height: int = 60) -> np.ndarray:
    return np.full((height, width, 3), rgb, np.uint8)


def close_to(image: np.ndarray, rgb: tuple[int, int, int], tol: float = 12) -> bool:
    # JPEG (and MJPG) shift flat colours by a few levels.
    return float(np.abs(image.reshape(-1, 3).mean(0) - rgb).max()) < tol


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def collect(slot: LatestSlot[Frame], seconds: float) -> list[Frame]:
    frames, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        frame = slot.get(timeout=left)
        if frame is not None:
            frames.append(frame)
    return frames


def next_frame(slot: LatestSlot[Frame], kind: str, timeout: float) -> Frame | None:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        frame = slot.get(timeout=left)
        if frame is not None and frame.kind == kind:
            return frame
    return None


def stopped_within(camera: CameraSource) -> float:
    start = time.monotonic()
    camera.stop(timeout=2.0)
    return time.monotonic() - start


class MjpegCamera:
    """An IP camera on 127.0.0.1: one solid colour as multipart MJPEG at ``fps``."""

    def __init__(self, rgb: tuple[int, int, int], port: int = 0, fps: float = 20) -> None:
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(solid(rgb), cv2.COLOR_RGB2BGR))
        assert ok
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (
            len(jpeg),
            jpeg.tobytes(),
        )
        self.connections: list[socket.socket] = []
        self._closing = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                camera.connections.append(self.connection)
                try:
                    while not camera._closing.is_set():
                        self.wfile.write(part)
                        camera._closing.wait(1 / fps)
                except OSError:
                    pass  # the client went away, or close() cut the connection

            def log_message(self, *args: object) -> None:
                pass

        # HTTPServer sets SO_REUSEADDR, so a restart can take the same port at once.
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        """The camera vanishes: no listening socket, and open streams cut off."""
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


def test_http_camera_is_read_shows_unavailable_when_gone_and_resumes_when_back():
    first = MjpegCamera(RED)
    second = None
    slot: LatestSlot[Frame] = LatestSlot()
    config = CameraConfig(source=f"http://127.0.0.1:{first.port}/stream.mjpg", fps=20)
    camera = CameraSource(config, slot, unavailable_size=(64, 48))
    camera.start()
    try:
        frame = next_frame(slot, "camera", timeout=10)
        assert frame is not None and camera.state == "live"
        assert frame.image.shape == (60, 80, 3) and close_to(frame.image, RED)

        first.close()
        assert wait_for(lambda: camera.state == "lost", 5), camera.state
        # 2 s down: long enough for the reconnect backoff to reach its maximum.
        frames = collect(slot, 2.0)
        unavailable = [f for f in frames if f.kind == "unavailable"]
        # The configured 20 fps, give or take scheduling on a busy machine.
        assert 30 <= len(unavailable) <= 48, len(unavailable)
        assert unavailable[-1].image.shape == (48, 64, 3)
        assert all(b.seq > a.seq for a, b in itertools.pairwise(frames))

        second = MjpegCamera(BLUE, port=first.port)
        back_at = time.monotonic()
        frame = next_frame(slot, "camera", timeout=3.0)
        assert frame is not None, f"no camera frame within 3 s (state {camera.state})"
        assert time.monotonic() - back_at < 3.0 and close_to(frame.image, BLUE)
        assert camera.state == "live" and camera.reconnects == 1
    finally:
        took = stopped_within(camera)
        for server in (first, second):
            if server is not None:
                server.close()
    assert took < 2.0 and camera.state == "stopped"


def write_clip(path, frames: int, fps: float) -> None:
    """An MJPG .avi: red on the left half, blue on the right."""
    image = np.concatenate([solid(RED, 40, 48), solid(BLUE, 40, 48)], axis=1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (80, 48))
    assert writer.isOpened()
    for _ in range(frames):
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.mark.parametrize("mirror", [False, True])
def test_video_file_loops_at_its_own_rate_as_rgb(tmp_path, mirror):
    clip = tmp_path / "clip.avi"
    write_clip(clip, frames=10, fps=50)
    slot: LatestSlot[Frame] = LatestSlot()
    camera = CameraSource(
        CameraConfig(source=str(clip), mirror=mirror), slot, unavailable_size=(64, 48)
    )
    camera.start()
    frames = collect(slot, 0.6)
    took = stopped_within(camera)
    # 50 fps for 0.6 s: ~30 frames, so the 10-frame file looped, and was not read flat out.
    assert 16 <= camera.frames_read <= 40, camera.frames_read
    assert frames and all(f.kind == "camera" for f in frames)
    image = frames[-1].image
    assert image.flags.c_contiguous and image.dtype == np.uint8 and image.shape == (48, 80, 3)
    left, right = (BLUE, RED) if mirror else (RED, BLUE)
    assert close_to(image[:, 5:35], left) and close_to(image[:, 45:75], right)
    assert took < 2.0


def test_missing_file_publishes_the_unavailable_frame_at_rate(tmp_path):
    slot: LatestSlot[Frame] = LatestSlot()
    config = CameraConfig(source=str(tmp_path / "missing.mp4"), fps=25)
    camera = CameraSource(config, slot, unavailable_size=(64, 48))
    camera.start()
    frames = collect(slot, 0.6)
    assert camera.state == "lost"
    took = stopped_within(camera)
    assert 9 <= len(frames) <= 19, len(frames)
    assert all(f.kind == "unavailable" for f in frames)
    assert frames[0].image is unavailable_frame(64, 48)
    assert took < 2.0 and camera.state == "stopped"


def test_test_pattern_moves_at_the_configured_fps():
    slot: LatestSlot[Frame] = LatestSlot()
    config = CameraConfig(source="testpattern", width=64, height=48, fps=30)
    camera = CameraSource(config, slot, unavailable_size=(64, 48))
    camera.start()
    frames = collect(slot, 1.0)
    assert camera.state == "live"
    took = stopped_within(camera)
    assert 24 <= len(frames) <= 34, len(frames)
    assert frames[0].image.shape == (48, 64, 3)
    assert not np.array_equal(frames[0].image, frames[-1].image)
    assert took < 0.5 and camera.state == "stopped"


def test_latest_slot_keeps_only_the_newest():
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    slot.put(2)
    assert slot.get(timeout=0) == 2 and slot.dropped == 1
    assert slot.latest() == 2
    assert slot.get(timeout=0.05) is None  # nothing newer than what was got
    slot.put(3)
    assert slot.get() == 3 and slot.dropped == 1


def test_latest_slot_close_wakes_a_waiting_get():
    slot: LatestSlot[int] = LatestSlot()
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(slot.get(timeout=10)))
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    slot.close()
    waiter.join(2)
    assert got == [None] and time.monotonic() - start < 0.5 and slot.closed
    slot.put(4)
    assert slot.get(timeout=0) is None


def test_fit_to_center_crops_then_resizes():
    image = np.zeros((50, 100, 3), np.uint8)
    image[:, 25:75] = 255  # the centre square
    assert fit_to(image, 100, 50) is image
    square = fit_to(image, 20, 20)
    assert square.shape == (20, 20, 3) and square.min() == 255  # only the centre survived
    grown = fit_to(image[:, 25:75], 64, 64)
    assert grown.shape == (64, 64, 3) and grown.flags.c_contiguous
    tall = fit_to(image, 30, 60)
    assert tall.shape == (60, 30, 3)


def test_unavailable_frame_is_cached_dark_and_has_text():
    frame = unavailable_frame(320, 240)
    assert frame is unavailable_frame(320, 240) and frame.shape == (240, 320, 3)
    assert not frame.flags.writeable
    assert np.median(frame) < 60 and frame.max() > 180  # dark grey with light text
    assert unavailable_frame(320, 240, "starting...") is not frame


def test_test_pattern_is_cheap():
    make_pattern(640, 480, 0.0)  # builds the cached background
    start = time.perf_counter()
    for i in range(50):
        make_pattern(640, 480, i / 30)
    per_frame = (time.perf_counter() - start) / 50
    assert per_frame < 0.004, per_frame  # ~0.3 ms here; generous for a loaded machine
