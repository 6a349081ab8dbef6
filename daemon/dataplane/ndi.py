"""NDI in and out of the daemon, through the optional extra ``ndi`` (cyndilib, whose wheels bundle
the NDI runtime; the NDI SDK's licence applies to that runtime: README, "NDI").

Out: :class:`NdiSink` publishes the output as an NDI source beside the virtual camera. The output
thread paces it like every sink; ``send`` only copies the frame into a latest-frame slot, and a
thread of the sink's own hands it to NDI, so a slow network never stretches the output interval.

In: ``camera.source = "ndi:NAME"`` opens :class:`NdiCapture`, which reads like an OpenCV
capture (``read() -> (ok, BGR image)``, ``release()``), so the capture thread's loss, "camera
unavailable" frame and reconnect with backoff apply to it unchanged. NAME is the source's full
NDI name ("HOST (stream)") or its stream part.

Discovery is NDI's own (mDNS, which needs avahi-daemon on Linux, or the "extra IPs" / discovery
server of the NDI configuration file that ``NDI_CONFIG_DIR`` points to).
"""

from __future__ import annotations

import logging
import threading
import time
from fractions import Fraction
from typing import Any

import numpy as np

from daemon.dataplane.slots import LatestSlot

log = logging.getLogger("streamv2v")

PREFIX = "ndi:"
INSTALL_HINT = "pip install 'streamv2v[ndi]' (cyndilib, which bundles the NDI runtime)"
#: How long an open looks for the named source before the camera counts as unavailable.
FIND_TIMEOUT_S = 2.0
#: Without a frame for this long a connected source counts as lost (the capture reopens it).
READ_TIMEOUT_S = 1.5
_POLL_S = 0.004
_WAIT_MS = 2


def ndi_problem() -> str | None:
    """Why NDI cannot be used here (one line with the fix), or None when it can."""
    try:
        import cyndilib  # noqa: F401
    except ImportError as err:
        return f"NDI needs the optional extra: {INSTALL_HINT} ({err})"
    return None


def source_name(source: str) -> str:
    """The NDI name in ``camera.source = "ndi:NAME"``."""
    return source[len(PREFIX) :].strip()


def _matches(full: str, wanted: str) -> bool:
    """``wanted`` names ``full`` ("HOST (stream)"): the whole name or the stream part."""
    if full == wanted:
        return True
    return full.endswith(")") and "(" in full and full[full.index("(") + 1 : -1] == wanted


class NdiSink:
    """The output as an NDI source called ``name``: uint8 RGB frames of one size, sent by a
    thread of its own (the newest frame wins; the output thread never waits for NDI)."""

    def __init__(self, name: str, width: int, height: int, fps: float) -> None:
        problem = ndi_problem()
        if problem is not None:
            raise RuntimeError(problem)
        from cyndilib.sender import Sender
        from cyndilib.video_frame import VideoSendFrame
        from cyndilib.wrapper.ndi_structs import FourCC

        self.name, self.width, self.height = name, width, height
        frame = VideoSendFrame()
        frame.set_resolution(width, height)
        frame.set_frame_rate(Fraction(fps).limit_denominator(1001))
        frame.set_fourcc(FourCC.RGBX)
        self._sender = Sender(name, clock_video=False)  # the output thread paces
        self._sender.set_video_frame(frame)
        self._sender.open()
        self._slot: LatestSlot[np.ndarray] = LatestSlot()
        self._rgbx = np.full((height, width, 4), 255, np.uint8)  # reused: no per-frame alloc
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="ndi-out", daemon=True)
        self._thread.start()

    def send(self, rgb: np.ndarray) -> None:
        """Hand one HxWx3 uint8 RGB frame to the NDI thread (returns at once)."""
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"frame of shape {rgb.shape} and dtype {rgb.dtype} does not fit the "
                f"{self.width}x{self.height} NDI output (uint8 RGB expected)"
            )
        self._slot.put(rgb)

    def connections(self) -> int:
        return int(self._sender.get_num_connections(0.0))

    def _run(self) -> None:
        while True:
            rgb = self._slot.get(timeout=0.5)
            if rgb is None:
                if self._slot.closed:
                    return
                continue
            self._rgbx[..., :3] = rgb
            try:
                self._sender.write_video_async(self._rgbx.reshape(-1))
            except Exception as err:  # a sender that failed: said once, the thread ends
                log.error("NDI output %s failed (%s)", self.name, err)
                return
            self.sent += 1

    def close(self) -> None:
        self._slot.close()
        self._thread.join(2.0)
        self._sender.close()


class NdiCapture:
    """An NDI source read like an OpenCV capture (BGR frames); see :func:`open_ndi`."""

    def __init__(self, finder: Any, receiver: Any, frame: Any, name: str) -> None:
        self._finder, self._receiver, self._frame = finder, receiver, frame
        self.name = name
        self._buffer = np.empty(0, np.uint8)

    def isOpened(self) -> bool:  # OpenCV's name: the capture thread calls it
        return self._receiver is not None

    def read(self) -> tuple[bool, np.ndarray | None]:
        """The next frame (BGR), or (False, None) when none came for READ_TIMEOUT_S."""
        from cyndilib.receiver import ReceiveFrameType

        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            # cyndilib 0.1 holds the GIL while NDI waits for a frame: wait briefly (NDI hands
            # out nothing with no wait at all) and sleep in Python between asks, or the engine
            # thread starves.
            got = self._receiver.receive(ReceiveFrameType.recv_video, _WAIT_MS)
            if not got & ReceiveFrameType.recv_video:
                time.sleep(_POLL_S)
                continue
            frame = self._frame
            size = frame.get_data_size()
            if self._buffer.size != size:
                self._buffer = np.empty(size, np.uint8)
            if not frame.fill_p_data(self._buffer):
                continue
            width, height = frame.xres, frame.yres
            stride = frame.get_line_stride() or width * 4
            rows = self._buffer[: stride * height].reshape(height, stride)
            return True, rows[:, : width * 4].reshape(height, width, 4)[..., :3]
        return False, None

    def get(self, _prop: int) -> float:
        return 0.0

    def release(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.disconnect()
        if self._finder is not None:
            self._finder.close()
            self._finder = None


def open_ndi(source: str, timeout_s: float = FIND_TIMEOUT_S) -> NdiCapture | None:
    """Connect to the NDI source ``ndi:NAME`` (None when it is not found within ``timeout_s``
    or NDI is not installed: the capture thread then retries with its backoff)."""
    if ndi_problem() is not None:
        return None
    from cyndilib.finder import Finder
    from cyndilib.receiver import Receiver
    from cyndilib.video_frame import VideoRecvFrame
    from cyndilib.wrapper.ndi_recv import RecvBandwidth, RecvColorFormat

    wanted = source_name(source)
    finder = Finder()
    finder.open()
    deadline = time.monotonic() + timeout_s
    found = None
    while found is None and time.monotonic() < deadline:
        finder.update_sources()  # no waiting inside cyndilib (it would hold the GIL)
        found = next((n for n in finder.get_source_names() if _matches(n, wanted)), None)
        if found is None:
            time.sleep(0.05)
    if found is None:
        finder.close()
        return None
    receiver = Receiver(color_format=RecvColorFormat.BGRX_BGRA, bandwidth=RecvBandwidth.highest)
    frame = VideoRecvFrame()
    receiver.set_video_frame(frame)
    receiver.set_source(finder.get_source(found))
    return NdiCapture(finder, receiver, frame, found)
