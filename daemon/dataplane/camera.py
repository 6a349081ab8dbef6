"""The capture thread: reads a camera (device, video file, network stream or test pattern) into
a :class:`~daemon.dataplane.slots.LatestSlot`, and keeps the picture going when the camera goes
away.

While the camera is lost the slot receives a "camera unavailable" frame at the camera's rate and
the source is reopened with exponential backoff; when frames come back they simply flow again.
State changes are logged once each, never per frame.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from daemon.config import CameraConfig, source_kind
from daemon.dataplane.frames import Frame, test_pattern, unavailable_frame
from daemon.dataplane.slots import LatestSlot

#: Network streams: OpenCV's FFMPEG backend otherwise waits minutes on a dead host. The read
#: timeout stays under the 2 s that stop() is allowed, since a read in progress can't be cut short.
OPEN_TIMEOUT_MS = 2000
READ_TIMEOUT_MS = 1500
_LINUX = sys.platform.startswith("linux")
#: How often the waits below look at stop() and at a pending open.
_POLL_S = 0.02


class CameraSource:
    """Reads ``config.source`` on a daemon thread named "capture" and publishes
    :class:`~daemon.dataplane.frames.Frame` objects (RGB) to ``out``.

    ``state`` is "connecting", "live", "lost" or "stopped"; ``frames_read`` counts camera frames
    and ``reconnects`` the times the camera came back after being lost.
    """

    def __init__(
        self,
        config: CameraConfig,
        out: LatestSlot[Frame],
        *,
        unavailable_size: tuple[int, int],
        log: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.frames_read = 0
        self.reconnects = 0
        self._out = out
        self._unavailable_size = unavailable_size
        self._log = log or logging.getLogger("streamv2v.camera")
        self._kind = source_kind(config.source)
        self._name = describe_source(config.source)
        self._period = 1.0 / config.fps
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "stopped"
        self._seq = 0
        self._next_unavailable = 0.0

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a CameraSource can be started once")
        if not self._log.isEnabledFor(logging.DEBUG):
            quiet_opencv()
        self._state = "connecting"
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop capturing; the thread releases the capture before it ends."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning(
                "camera: capture still blocked in OpenCV after %.1fs; it releases %s as soon as "
                "that call returns",
                timeout,
                self._name,
            )

    # -- the capture thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._kind in ("testpattern", "scene"):
                self._run_generated()
            else:
                self._run_capture()
        except Exception:  # a bug, not a camera problem: say so in the daemon's log
            self._log.exception("camera: capture thread failed")
        finally:
            self._state = "stopped"

    def _run_generated(self) -> None:
        """A generated camera: the test pattern, or a moving scene of the tiny style model's
        world (in its "plain" style, what that model restyles best)."""
        width, height = self.config.width, self.config.height
        if self._kind == "scene":
            from streamv2v.scenes import moving_scene, random_scene, render

            scene = random_scene(np.random.default_rng(7))
            side = min(width, height)
            width = height = side

            def draw(t: float) -> np.ndarray:
                return render(moving_scene(scene, t), "plain", side)
        else:

            def draw(t: float) -> np.ndarray:
                return test_pattern(width, height, t)

        self._set_live(width, height)
        start = time.monotonic()
        pacer = _Pacer(self._period)
        while not self._stop.is_set():
            now = time.monotonic()
            self._publish_camera(draw(now - start), now)
            if pacer.wait(self._stop):
                return

    def _run_capture(self) -> None:
        backoff = self.config.reconnect_min_s
        while not self._stop.is_set():
            capture = self._open()
            if capture is None:
                reason = self._open_failure()
            else:
                try:
                    reason, frames = self._read_session(capture)
                except Exception as exc:  # a decoder hiccup must not end capture for good
                    reason, frames = f"capture error: {exc}", 0
                finally:
                    capture.release()
                if reason == _REOPEN:
                    continue
                if frames:
                    backoff = self.config.reconnect_min_s
            if self._stop.is_set():
                return
            self._set_lost(reason)
            self._wait(seconds=backoff)
            backoff = min(2 * backoff, self.config.reconnect_max_s)

    def _read_session(self, capture: cv2.VideoCapture) -> tuple[str, int]:
        """Read until the source fails or stop(); returns why it ended and the frames read."""
        is_file = self._kind == "file"
        pacer = _Pacer(_file_period(capture, self._period)) if is_file else None
        frames = 0
        while not self._stop.is_set():
            ok, bgr = capture.read()
            if not _good(ok, bgr) and is_file and frames:
                ok, bgr = _rewind(capture)
                if not _good(ok, bgr):
                    return _REOPEN, frames  # can't seek this file: reopening starts it over
            if not _good(ok, bgr):
                return ("no frames from the source" if not frames else "frames stopped"), frames
            now = time.monotonic()
            image = to_rgb(bgr)
            if not frames:  # state first, so whoever sees this frame also sees "live"
                self._set_live(image.shape[1], image.shape[0])
            self._publish_camera(image, now)
            frames += 1
            if pacer is not None and pacer.wait(self._stop):
                break
        return "stopped", frames

    def _open(self) -> cv2.VideoCapture | None:
        """Open the source; network streams open on a helper thread so the unavailable frame
        keeps flowing and stop() stays prompt while a dead host times out."""
        if self._kind not in ("url", "ndi"):  # NDI: finding the source takes a moment too
            return open_capture(self.config)
        opener = _Opener(lambda: open_capture(self.config))
        self._wait(until=opener.done)
        if self._stop.is_set():
            opener.abandon()
            return None
        return opener.take()

    def _wait(self, *, seconds: float | None = None, until: threading.Event | None = None) -> None:
        """Wait ``seconds`` or until ``until`` is set (or stop()), publishing the unavailable
        frame at the camera's rate meanwhile if the camera is lost."""
        deadline = time.monotonic() + seconds if seconds is not None else float("inf")
        while not self._stop.is_set() and not (until is not None and until.is_set()):
            now = time.monotonic()
            if now >= deadline:
                return
            pause = min(_POLL_S, deadline - now)
            if self._state == "lost":
                if now >= self._next_unavailable:
                    self._publish_unavailable(now)
                pause = min(pause, max(0.0, self._next_unavailable - now))
            self._stop.wait(pause)

    # -- publishing and state -----------------------------------------------------------------

    def _publish_camera(self, image: np.ndarray, captured_at: float) -> None:
        if self.config.mirror:
            image = cv2.flip(image, 1)
        self._seq += 1
        self.frames_read += 1
        self._out.put(Frame(image, captured_at, self._seq, "camera"))

    def _publish_unavailable(self, now: float) -> None:
        self._seq += 1
        image = unavailable_frame(*self._unavailable_size)
        self._out.put(Frame(image, now, self._seq, "unavailable"))
        # Keep a steady cadence, but never try to catch up on missed ticks.
        self._next_unavailable += self._period
        if self._next_unavailable <= now:
            self._next_unavailable = now + self._period

    def _set_live(self, width: int, height: int) -> None:
        if self._state == "lost":
            self.reconnects += 1
            self._log.info("camera back: %s (%dx%d)", self._name, width, height)
        elif self._state != "live":
            self._log.info("camera live: %s (%dx%d)", self._name, width, height)
        self._state = "live"

    def _set_lost(self, reason: str) -> None:
        if self._state == "lost":
            self._log.debug("camera still unavailable: %s", reason)
            return
        what = "lost" if self._state == "live" else "unavailable"
        self._log.warning(
            "camera %s: %s: %s; showing 'camera unavailable' and retrying every %g-%gs",
            what,
            self._name,
            reason,
            self.config.reconnect_min_s,
            self.config.reconnect_max_s,
        )
        self._state = "lost"
        self._next_unavailable = time.monotonic()

    def _open_failure(self) -> str:
        source = self.config.source
        if self._kind == "file" and not Path(str(source)).expanduser().is_file():
            return "video file not found"
        if self._kind == "file":
            return "OpenCV cannot open or decode this file"
        if self._kind == "ndi":
            from daemon.dataplane.ndi import ndi_problem

            return ndi_problem() or "no NDI source of that name found (is its sender running?)"
        if self._kind == "url":
            return (
                f"cannot open the stream (no answer within {OPEN_TIMEOUT_MS / 1000:g}s, "
                "refused, or not a video stream)"
            )
        if (
            isinstance(source, str)
            and sys.platform.startswith("linux")
            and not Path(source).exists()
        ):
            return "no such device"
        return "cannot open the camera (unplugged, in use by another program, or no permission?)"


_REOPEN = "reopen"


def open_capture(config: CameraConfig) -> cv2.VideoCapture | None:
    """An opened ``cv2.VideoCapture`` for the configured source, or None."""
    source = config.source
    kind = source_kind(source)
    if kind == "ndi":
        from daemon.dataplane.ndi import open_ndi

        return open_ndi(str(source))  # type: ignore[return-value]  # reads like a capture
    try:
        if kind == "url":
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                READ_TIMEOUT_MS,
            ]
            capture = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
        elif kind == "file":
            capture = cv2.VideoCapture(str(Path(str(source)).expanduser()))
        elif isinstance(source, str) and _LINUX:
            capture = cv2.VideoCapture(source, cv2.CAP_V4L2)
        else:
            capture = cv2.VideoCapture(source)
    except cv2.error:
        return None
    if not capture.isOpened():
        capture.release()
        return None
    if kind == "device":
        _configure_device(capture, config)
    return capture


def quiet_opencv() -> None:
    """Silence OpenCV's and FFmpeg's own stderr lines (2-3 on every failed reopen of a stream);
    our one warning per state change says it better. Variables the user set are respected."""
    # Read once, when OpenCV first initialises FFmpeg; -8 is AV_LOG_QUIET.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if "OPENCV_LOG_LEVEL" not in os.environ:
        utils_logging = getattr(getattr(cv2, "utils", None), "logging", None)
        if utils_logging is not None:
            utils_logging.setLogLevel(utils_logging.LOG_LEVEL_ERROR)


def _configure_device(capture: cv2.VideoCapture, config: CameraConfig) -> None:
    # FOURCC first: V4L2 picks the sizes it offers per pixel format. Unsupported properties
    # are ignored by the backend, so these are requests, not guarantees.
    if config.fourcc:
        capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*config.fourcc))
    capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
    capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
    capture.set(cv2.CAP_PROP_FPS, config.fps)
    # One driver buffer: the newest frame, not one several frames old (latency).
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR (or grey, or BGRA) frame as contiguous RGB."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def describe_source(source: int | str) -> str:
    """A name for logs; passwords in URLs (rtsp://user:pw@host) are hidden."""
    kind = source_kind(source)
    if kind == "device":
        return f"camera {source}"
    if kind == "url":
        return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", str(source))
    if kind == "file":
        return f"video file {source}"
    if kind == "ndi":
        return f"NDI source {str(source)[4:].strip()}"
    return "generated scene" if kind == "scene" else "test pattern"


def _good(ok: bool, image: np.ndarray | None) -> bool:
    return bool(ok) and image is not None and image.size > 0


def _rewind(capture: cv2.VideoCapture) -> tuple[bool, np.ndarray | None]:
    if not capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
        return False, None
    return capture.read()


def _file_period(capture: cv2.VideoCapture, fallback: float) -> float:
    fps = capture.get(cv2.CAP_PROP_FPS)
    # Files without a rate report 0 or NaN (NaN fails the comparison too); absurd rates happen.
    return 1.0 / fps if 0 < fps <= 1000 else fallback


class _Pacer:
    """Sleeps so that calls happen every ``period`` seconds, without bursts after a stall."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._due = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """Wait for the next tick; True if ``stop`` was set meanwhile."""
        self._due += self.period
        now = time.monotonic()
        if self._due < now - self.period:
            self._due = now  # fell behind: restart the cadence instead of catching up
        return stop.wait(max(0.0, self._due - now))


class _Opener:
    """Runs a blocking open on its own thread. If the caller gives up (stop()), the capture is
    released by whichever side finishes last, so none is ever leaked."""

    def __init__(self, open_fn: Callable[[], cv2.VideoCapture | None]) -> None:
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._capture: cv2.VideoCapture | None = None
        self._abandoned = False
        self._open_fn = open_fn
        threading.Thread(target=self._work, name="capture-open", daemon=True).start()

    def _work(self) -> None:
        capture = self._open_fn()
        with self._lock:
            if self._abandoned and capture is not None:
                capture.release()
            else:
                self._capture = capture
        self.done.set()

    def take(self) -> cv2.VideoCapture | None:
        with self._lock:
            capture, self._capture = self._capture, None
            return capture

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()
