"""Video files in and out through OpenCV, as RGB numpy frames.

OpenCV lives here (and elsewhere in the daemon), never in the engine: the engine sees uint8 RGB
arrays only. OpenCV speaks BGR, so every frame is converted at this boundary, in both directions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

#: Container extension -> FourCC that OpenCV's FFMPEG backend writes without extra codecs.
#: .mkv is FFV1, lossless: what `streamv2v eval --output` should measure (a lossy codec adds
#: its own frame-to-frame changes to the figures).
OUTPUT_CODECS: dict[str, str] = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "FFV1"}

#: Used when a file does not say its frame rate (OpenCV reports 0 or NaN then).
FALLBACK_FPS = 30.0


class CloseOnExit:
    """``with obj:`` closes ``obj`` on the way out (for anything with a ``close()``)."""

    def close(self) -> None:  # overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoError(Exception):
    """A video file could not be read or written; the message says which file and why."""


class VideoInputError(VideoError):
    """The input video is missing or cannot be decoded."""


class VideoOutputError(VideoError):
    """The output video cannot be written where or how it was asked for."""


class VideoReader(CloseOnExit):
    """Reads a video file frame by frame as uint8 RGB arrays of shape (height, width, 3).

    Opening reads the first frame right away, so an undecodable file fails here, before any
    expensive work (such as loading a model) starts.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise VideoInputError(f"input video not found: {self.path}")
        if self.path.is_dir():
            raise VideoInputError(f"input video is a directory, not a file: {self.path}")
        if not os.access(self.path, os.R_OK):
            raise VideoInputError(f"input video is not readable (permission denied): {self.path}")
        self._capture = cv2.VideoCapture(str(self.path))
        first = self._read_bgr() if self._capture.isOpened() else None
        if first is None:
            self._capture.release()
            raise VideoInputError(
                f"cannot decode input video {self.path}: not a video file OpenCV can read, "
                "or it has no frames"
            )
        self._first: np.ndarray | None = first
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        # NaN fails every comparison, so `fps > 0` also rejects it.
        self.fps: float = float(fps) if fps > 0 else FALLBACK_FPS
        height, width = first.shape[:2]
        self.size: tuple[int, int] = (width, height)

    @property
    def frame_count(self) -> int:
        """Frames the container claims to hold (an estimate for some formats; 0 if unknown)."""
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)
        return int(count) if count > 0 else 0

    def _read_bgr(self) -> np.ndarray | None:
        ok, frame = self._capture.read()
        return frame if ok else None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield every frame once, first to last, as RGB."""
        frame = self._first
        self._first = None
        while frame is not None:
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            frame = self._read_bgr()

    def close(self) -> None:
        self._capture.release()


def codec_for(path: str | os.PathLike[str]) -> str:
    """The FourCC to write ``path`` with, chosen from its extension."""
    suffix = Path(path).suffix.lower()
    try:
        return OUTPUT_CODECS[suffix]
    except KeyError:
        known = ", ".join(OUTPUT_CODECS)
        raise VideoOutputError(
            f"cannot write {path}: unknown video extension {suffix or '(none)'!r}, "
            f"use one of {known}"
        ) from None


def check_output_path(path: str | os.PathLike[str]) -> None:
    """Fail early, with a clear reason, if ``path`` cannot become a video file.

    Cheap checks only (extension, folder, permissions), so they can run before a model loads;
    opening the writer is the final word.
    """
    path = Path(path)
    codec_for(path)
    if path.is_dir():
        raise VideoOutputError(f"output path is a directory, not a file: {path}")
    folder = path.parent
    if not folder.is_dir():
        raise VideoOutputError(f"output folder does not exist: {folder}")
    if path.exists() and not os.access(path, os.W_OK):
        raise VideoOutputError(f"output file is not writable (permission denied): {path}")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise VideoOutputError(f"output folder is not writable (permission denied): {folder}")


class VideoWriter(CloseOnExit):
    """Writes uint8 RGB frames of one fixed size to a video file; use it as a context manager."""

    def __init__(self, path: str | os.PathLike[str], fps: float, size: tuple[int, int]) -> None:
        self.path = Path(path)
        self.size = size
        self.frames_written = 0
        check_output_path(self.path)
        fourcc = cv2.VideoWriter_fourcc(*codec_for(self.path))
        self._writer = cv2.VideoWriter(str(self.path), fourcc, float(fps), size)
        if not self._writer.isOpened():
            raise VideoOutputError(
                f"cannot write {self.path}: OpenCV could not open a {codec_for(self.path)} "
                f"writer at {size[0]}x{size[1]}, {fps:g} fps"
            )

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB frame; its size must be the writer's size."""
        width, height = self.size
        if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
            # OpenCV silently drops frames of the wrong size, which would shorten the video.
            raise ValueError(
                f"frame of shape {frame.shape} and dtype {frame.dtype} does not fit a "
                f"{width}x{height} uint8 RGB video"
            )
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self) -> None:
        self._writer.release()


def moving_test_pattern(frames: int, width: int, height: int) -> Iterator[np.ndarray]:
    """``frames`` RGB frames of moving shapes over a soft gradient: a camera stand-in.

    Pure numpy and deterministic, so a demo or a test sees the same motion every run.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    background = np.stack([0.25 + 0.5 * u, 0.3 + 0.3 * v, 0.7 - 0.4 * u], axis=-1)
    side = min(width, height)
    for i in range(frames):
        phase = 2 * np.pi * i / max(frames, 1)
        image = background.copy()
        # A square sliding left to right and back.
        left = int((0.5 + 0.4 * np.sin(phase)) * (width - side // 4))
        top = height // 6
        image[top : top + side // 4, left : left + side // 4] = (0.9, 0.2, 0.15)
        # A disc circling the centre.
        cx = width / 2 + 0.25 * side * np.cos(phase)
        cy = height / 2 + 0.25 * side * np.sin(phase)
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 < (side / 8) ** 2
        image[disc] = (0.15, 0.8, 0.3)
        # A bar sweeping down the frame.
        row = int((i / max(frames, 1)) * height)
        image[row : row + max(height // 32, 1), :] = (0.95, 0.95, 0.2)
        yield (image * 255).round().astype(np.uint8)
