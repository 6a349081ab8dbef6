"""Frames as they travel through the daemon, and the few images the daemon makes itself.

Every frame is uint8 RGB (OpenCV's BGR stops at the camera and the outputs) and carries the
monotonic time it was captured, so glass-to-glass latency can be measured at the output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

#: What a :class:`Frame` can be: from the camera, a stand-in while the camera is gone, the engine's
#: output, or a camera frame passed through while the engine is not ready.
FRAME_KINDS = ("camera", "unavailable", "styled", "passthrough")


@dataclass(frozen=True, slots=True)
class Frame:
    """One image on its way from the camera to the outputs."""

    image: np.ndarray  # HxWx3 uint8 RGB, C-contiguous
    captured_at: float  # time.monotonic() when the camera delivered it (synthetic: when made)
    seq: int  # increasing per source
    kind: str  # one of FRAME_KINDS


def crop_to_aspect(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The centre of ``image`` with the aspect of ``width`` x ``height`` (a view: no copy)."""
    h, w = image.shape[:2]
    # Compare aspects with integers (w / h vs width / height) so equal aspects never crop a pixel.
    if w * height > width * h:
        crop_w = max(1, round(h * width / height))
        x0 = (w - crop_w) // 2
        return image[:, x0 : x0 + crop_w]
    if w * height < width * h:
        crop_h = max(1, round(w * height / width))
        y0 = (h - crop_h) // 2
        return image[y0 : y0 + crop_h]
    return image


def fit_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` center-cropped to the aspect of ``width`` x ``height``, then resized to it.

    Cropping instead of letterboxing keeps the whole output filled, as a webcam's picture is;
    the input itself is returned when it already has the size (the common, free case).
    """
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    image = crop_to_aspect(image, width, height)
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(image)
    # INTER_AREA averages when shrinking (no aliasing shimmer); it blurs when growing, so LINEAR.
    shrinking = w > width or h > height
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


_BACKGROUND = (38, 40, 44)  # dark grey, slightly cool: calm, and clearly not a broken picture
_TEXT = (225, 225, 225)
_SUBTEXT = (150, 152, 158)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@functools.lru_cache(maxsize=16)
def unavailable_frame(width: int, height: int, text: str = "camera unavailable") -> np.ndarray:
    """A dark-grey ``width`` x ``height`` frame saying ``text``, with "reconnecting..." below.

    Cached (it is shown every frame while the camera is gone) and therefore read-only: copy it
    before drawing on it.
    """
    image = np.empty((height, width, 3), np.uint8)
    image[:] = _BACKGROUND
    (text_w, text_h), _ = cv2.getTextSize(text, _FONT, 1.0, 2)
    # Text spans ~60% of the width, but never taller than a tenth of the height.
    scale = min(0.6 * width / max(text_w, 1), 0.1 * height / max(text_h, 1))
    thickness = max(1, round(2 * scale))
    _put_centered(image, text, scale, thickness, _TEXT, height / 2)
    sub_scale = 0.5 * scale
    _put_centered(
        image,
        "reconnecting...",
        sub_scale,
        max(1, round(2 * sub_scale)),
        _SUBTEXT,
        height / 2 + 1.6 * text_h * scale,
    )
    image.setflags(write=False)
    return image


def _put_centered(
    image: np.ndarray,
    text: str,
    scale: float,
    thickness: int,
    color: tuple[int, int, int],
    center_y: float,
) -> None:
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    origin = ((image.shape[1] - w) // 2, round(center_y + h / 2))
    cv2.putText(image, text, origin, _FONT, scale, color, thickness, cv2.LINE_AA)


# Seven SMPTE-style bars: white, yellow, cyan, green, magenta, red, blue (75% intensity).
_BARS = np.array(
    [
        (191, 191, 191),
        (191, 191, 0),
        (0, 191, 191),
        (0, 191, 0),
        (191, 0, 191),
        (191, 0, 0),
        (0, 0, 191),
    ],
    np.uint8,
)


@functools.lru_cache(maxsize=4)
def _pattern_background(width: int, height: int) -> np.ndarray:
    """Colour bars over the top two thirds, a grey ramp below: built once per size."""
    image = np.empty((height, width, 3), np.uint8)
    bar_of_column = np.minimum(np.arange(width) * len(_BARS) // max(width, 1), len(_BARS) - 1)
    split = height * 2 // 3
    image[:split] = _BARS[bar_of_column][None]
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    image[split:] = ramp[None, :, None]
    image.setflags(write=False)
    return image


def test_pattern(width: int, height: int, t: float) -> np.ndarray:
    """A moving test pattern at time ``t`` (seconds): a camera stand-in for demos and tests.

    Colour bars (so colour swaps are obvious), a disc gliding across them and a bar sweeping
    the grey ramp (so motion and its smoothness are visible). Cheap: one copy and two shapes.
    """
    image = _pattern_background(width, height).copy()
    side = min(width, height)
    radius = max(2, side // 8)
    cx = round(width / 2 + (width / 2 - radius) * math.sin(2 * math.pi * t / 4.0))
    cy = round(height / 3 + (height / 6) * math.sin(2 * math.pi * t / 2.5))
    cv2.circle(image, (cx, cy), radius, (240, 240, 240), -1, cv2.LINE_AA)
    cv2.circle(image, (cx, cy), max(1, radius // 3), (20, 20, 20), -1, cv2.LINE_AA)
    split = height * 2 // 3
    x = round((t / 3.0 % 1.0) * (width - 1))
    image[split:, max(0, x - 1) : x + 2] = (255, 60, 60)
    return image


# Its name starts with "test_": tell pytest it is not a test when a test module imports it.
test_pattern.__test__ = False  # type: ignore[attr-defined]
