"""Where finished frames go: the virtual camera (pyvirtualcam) and an optional recording.

Both take uint8 RGB frames of one fixed size from the output thread, which does the pacing: the
virtual camera never sleeps here, so one slow output cannot stretch the frame interval of another.
The MJPEG preview lives in ``daemon.control.preview``.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

import cv2
import numpy as np

from daemon.dataplane.video import CloseOnExit, VideoOutputError, VideoWriter

if TYPE_CHECKING:
    import pyvirtualcam

#: Pixel formats a virtual camera can be fed, by the name used in the configuration.
PIXEL_FORMATS: tuple[str, ...] = ("rgb", "bgr", "yuyv", "uyvy", "nv12", "i420")

#: Formats whose chroma is subsampled 2x horizontally (all YUV ones) and also vertically (4:2:0).
_HALF_WIDTH_CHROMA = frozenset({"yuyv", "uyvy", "nv12", "i420"})
_HALF_HEIGHT_CHROMA = frozenset({"nv12", "i420"})

#: Longest tail of pyvirtualcam's own error text kept in our message (it can list every backend).
_TAIL_CHARS = 300

LINUX_HINT = (
    "run `sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=streamv2v` "
    "(exclusive_caps=1 is needed by Chrome/Zoom and other WebRTC apps to list the camera, so start "
    "streamv2v before opening the camera there; some apps only see the device with "
    "exclusive_caps=0 instead; if modprobe finds no module, install it first, e.g. "
    "`sudo apt install v4l2loopback-dkms`; your user must be allowed to write the device, "
    "usually group `video`)"
)
WINDOWS_HINT = (
    "install OBS Studio (26 or newer), click 'Start Virtual Camera' once and stop it again so the "
    "camera is registered, then start streamv2v (OBS itself must not be using the virtual camera)"
)
MACOS_HINT = (
    "install OBS Studio (30 or newer for the camera extension), click 'Start Virtual Camera' once, "
    "and allow the OBS camera extension in System Settings (Privacy & Security, or General > Login "
    "Items & Extensions > Camera Extensions); then start streamv2v"
)


class VirtualCameraUnavailable(RuntimeError):
    """No virtual camera could be opened; the message says what to do on this platform."""


def _short(text: str) -> str:
    """One line, at most a few hundred characters: pyvirtualcam's error as a tail, not a wall."""
    line = " ".join(str(text).split())
    return line if len(line) <= _TAIL_CHARS else line[: _TAIL_CHARS - 3] + "..."


def unavailable_message(
    error: BaseException | str, *, device: str | None, backend: str | None
) -> str:
    """What to tell the user when pyvirtualcam could not open a camera (``error`` is its error)."""
    system = platform.system()
    if backend not in (None, "v4l2loopback", "obs"):
        # A third-party backend: we do not know its set-up steps, so do not guess.
        advice = f"virtual camera backend {backend!r} could not open a camera"
    elif system == "Linux":
        where = f" at {device}" if device else ""
        advice = f"no v4l2loopback device{where}: {LINUX_HINT}"
    elif system == "Windows":
        advice = f"no OBS virtual camera: {WINDOWS_HINT}"
    elif system == "Darwin":
        advice = f"no OBS virtual camera: {MACOS_HINT}"
    else:
        advice = f"pyvirtualcam has no virtual camera backend for {system or 'this platform'}"
    return f"{advice} (pyvirtualcam: {_short(str(error))})"


def _check_pixel_format(pixel_format: str, width: int, height: int) -> str:
    fmt = pixel_format.lower()
    if fmt not in PIXEL_FORMATS:
        raise ValueError(
            f"unknown virtual camera pixel format {pixel_format!r}: use one of "
            + ", ".join(PIXEL_FORMATS)
        )
    # YUV formats share one chroma sample between 2 (or 2x2) pixels: odd sizes have no layout.
    if fmt in _HALF_WIDTH_CHROMA and width % 2:
        raise ValueError(f"pixel format {fmt} needs an even width, got {width}")
    if fmt in _HALF_HEIGHT_CHROMA and height % 2:
        raise ValueError(f"pixel format {fmt} needs an even height, got {height}")
    return fmt


def convert_rgb(rgb: np.ndarray, pixel_format: str) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) in the memory layout pyvirtualcam expects for ``pixel_format``."""
    if pixel_format == "rgb":
        return rgb
    if pixel_format == "bgr":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if pixel_format == "yuyv":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2)
    if pixel_format == "uyvy":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY)
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    if pixel_format == "i420":
        return i420
    # OpenCV has no RGB -> NV12; NV12 is I420 with the U and V planes interleaved.
    height, width = rgb.shape[:2]
    flat = i420.reshape(-1)
    luma, quarter = width * height, width * height // 4
    nv12 = np.empty_like(flat)
    nv12[:luma] = flat[:luma]
    nv12[luma::2] = flat[luma : luma + quarter]
    nv12[luma + 1 :: 2] = flat[luma + quarter :]
    return nv12


class VirtualCameraSink(CloseOnExit):
    """Frames to a virtual webcam through pyvirtualcam, in the configured pixel format.

    Opening fails with :class:`VirtualCameraUnavailable` (whatever pyvirtualcam raised) so the
    daemon can say what to do and carry on with its other outputs.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        *,
        device: str | None = None,
        pixel_format: str = "rgb",
        backend: str | None = None,
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.pixel_format = _check_pixel_format(pixel_format, width, height)
        self._camera = self._open(device, backend)
        self.device: str = self._camera.device
        self.backend: str = self._camera.backend

    def _open(self, device: str | None, backend: str | None) -> pyvirtualcam.Camera:
        try:
            # Imported here so a broken or missing pyvirtualcam is one clear message too.
            import pyvirtualcam
            from pyvirtualcam.camera import BACKENDS

            if backend is not None and backend not in BACKENDS:
                # Checked before Camera(): its KeyError would also print a __del__ warning.
                known = ", ".join(sorted(BACKENDS)) or "none"
                raise KeyError(f"unknown backend {backend!r} (registered: {known})")
            fmt = pyvirtualcam.PixelFormat[self.pixel_format.upper()]
            return pyvirtualcam.Camera(
                self.width, self.height, self.fps, fmt=fmt, device=device, backend=backend
            )
        except Exception as error:
            message = unavailable_message(error, device=device, backend=backend)
            raise VirtualCameraUnavailable(message) from error

    def send(self, rgb: np.ndarray) -> None:
        """Publish one HxWx3 uint8 RGB frame now (no pacing here: the caller paces)."""
        if self._camera is None:
            raise RuntimeError("virtual camera is closed")
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"frame of shape {rgb.shape} and dtype {rgb.dtype} does not fit the "
                f"{self.width}x{self.height} virtual camera (uint8 RGB expected)"
            )
        self._camera.send(convert_rgb(np.ascontiguousarray(rgb), self.pixel_format))

    def close(self) -> None:
        """Release the device (apps then see the camera stop); safe to call twice."""
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.close()


class Recorder(CloseOnExit):
    """Optional recording of the output to a video file (mp4v for .mp4, MJPG for .avi).

    ``open`` fails with a ValueError that names the problem (unknown extension, missing folder,
    no permission), so a bad ``--record`` path is reported before the stream starts.
    """

    def __init__(self) -> None:
        self._writer: VideoWriter | None = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    @property
    def frames_written(self) -> int:
        return self._writer.frames_written if self._writer is not None else 0

    def open(self, path: str | os.PathLike[str], width: int, height: int, fps: float) -> None:
        """Start writing ``path`` (closing any recording in progress first)."""
        self.close()
        try:
            self._writer = VideoWriter(path, fps, (width, height))
        except VideoOutputError as error:
            raise ValueError(f"cannot record: {error}") from error

    def write(self, rgb: np.ndarray) -> None:
        """Append one HxWx3 uint8 RGB frame of the size given to ``open``."""
        if self._writer is None:
            raise RuntimeError("recorder is not open")
        self._writer.write(rgb)

    def close(self) -> None:
        """Finish the file (the container is only valid after this); safe to call twice."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
