"""The person mask on real photos (tests/data: scikit-image's astronaut, public domain, and
camera-man, CC0) with the real shipped segmenter (MediaPipe selfie segmentation, ai-edge-litert):
the daemon plays them as a looped video file camera, styles only the person or only the room,
and the composite uses the mask of the very frame each output came from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.dataplane.frames import Frame
from daemon.masking.segmenter import PersonSegmenter
from daemon.masking.worker import MaskWorker
from daemon.styles.presets import Preset

DATA = Path(__file__).parent / "data"
SIZE = 128
# (y0, y1, x0, x1) at 128x128: inside the face, and a corner of the room.
REGIONS = {
    "astronaut": ((28, 46, 52, 64), (0, 28, 0, 28)),
    "camera": ((24, 34, 44, 52), (0, 24, 96, 128)),
}


def photo(name: str, size: int = SIZE) -> np.ndarray:
    bgr = cv2.imread(str(DATA / f"{name}.png"))
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 20.0) -> list[np.ndarray]:
    """An MJPG clip of ``frames``; returns the frames as a camera decodes them."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    capture, decoded = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return decoded


def run_daemon(tiny_model, clip: Path, preset: str, vcam, frames: int, **settings) -> Daemon:
    """The daemon on ``clip`` with the preset file ``preset`` active, until ``frames`` masked
    frames were published; returns the stopped daemon."""
    folder = clip.parent / "presets"
    folder.mkdir(exist_ok=True)
    (folder / "masked.toml").write_text(preset)
    cfg = demo_config(
        tiny_model,
        camera={"source": str(clip), "fps": 20.0},
        presets={"dir": str(folder), "startup": "masked"},
    )
    data = cfg.model_dump()
    data["engine"]["settings"].update({"width": SIZE, "height": SIZE, **settings})
    daemon = Daemon(type(cfg).model_validate(data))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.masks.masked_frames >= frames, 90), daemon.status()
    finally:
        daemon.stop()
    return daemon


def published_masked(daemon: Daemon, vcam) -> list[np.ndarray]:
    """The virtual camera's last frames (all composited: masked_frames were counted first)."""
    cam = vcam.instances[-1]
    return [f.reshape(SIZE, SIZE, 3) for f in cam.frames[-5:]]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255)


@pytest.fixture(scope="module")
def segmenter() -> PersonSegmenter:
    return PersonSegmenter()


def test_the_shipped_segmenter_finds_the_people_in_the_photos(segmenter):
    for name, ((y0, y1, x0, x1), (b0, b1, c0, c1)) in REGIONS.items():
        person = cv2.resize(segmenter(photo(name)), (SIZE, SIZE))
        assert person[y0:y1, x0:x1].min() > 0.9, name  # the face is the person's
        assert person[b0:b1, c0:c1].max() < 0.05, name  # the corner is the room


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "camera"])
@pytest.mark.parametrize("mode", ["background", "person"])
def test_only_the_room_or_only_the_person_is_styled(tiny_model, memory_vcam, tmp_path, name, mode):
    # (The codec decodes the clip's first frame a little differently from the rest: compare
    # with the camera frame each output is closest to.)
    cameras = write_clip(tmp_path / "still.avi", [photo(name)] * 10)
    preset = f'prompt = "a painting"\nmask = "{mode}"\nmask_feather = 1\n'
    daemon = run_daemon(tiny_model, tmp_path / "still.avi", preset, memory_vcam, 6, steps=1)
    (y0, y1, x0, x1), (b0, b1, c0, c1) = REGIONS[name]
    kept, styled = (slice(y0, y1), slice(x0, x1)), (slice(b0, b1), slice(c0, c1))
    if mode == "person":
        kept, styled = styled, kept
    for out in published_masked(daemon, memory_vcam):
        camera = min(cameras, key=lambda c: mad(out[kept], c[kept]))
        kept_mad, styled_mad = mad(out[kept], camera[kept]), mad(out[styled], camera[styled])
        print(f"{name} mask={mode}: kept region MAD {kept_mad * 255:.2f}/255, "
              f"styled region MAD {styled_mad * 255:.1f}/255")
        assert kept_mad <= 3 / 255, kept_mad  # the camera as it is
        assert styled_mad > 15 / 255, styled_mad  # the style: 5x the kept bound and more
    assert daemon.masks.missed == 0
