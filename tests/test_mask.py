"""The person mask on real photos (tests/data: scikit-image's astronaut, public domain, and
camera-man, CC0) with the real shipped segmenter (MediaPipe selfie segmentation, ai-edge-litert):
the daemon plays them as a looped video file camera, styles only the person or only the room,
and the composite uses the mask of the very frame each output came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.control.tables import preset_table, status_table
from daemon.dataplane.frames import Frame, unavailable_frame
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
    return cv2.cvtColor(
        cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )


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
    daemon.mask_pairs = watch_mask_pairs(daemon.masks)
    daemon.start()
    try:
        assert wait_for(lambda: daemon.masks.masked_frames >= frames, 90), daemon.status()
    finally:
        daemon.stop()
    return daemon


def watch_mask_pairs(masks: MaskWorker) -> list[tuple[float, float]]:
    """(styled frame's tag, tag of the mask it was composited with) of every composite the
    output thread makes from now on (the worker's ``last_pair``, read right after each)."""
    pairs: list[tuple[float, float]] = []
    composite = masks.composite

    def watched(styled: Frame, image: np.ndarray, timeout: float) -> np.ndarray:
        masks.last_pair = None
        out = composite(styled, image, timeout)
        if masks.last_pair is not None:
            assert masks.last_pair[0] == styled.captured_at
            pairs.append(masks.last_pair)
        return out

    masks.composite = watched
    return pairs


def foreign(pairs: list[tuple[float, float]]) -> int:
    """Composites made with another frame's mask."""
    return sum(styled != mask for styled, mask in pairs)


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
        print(
            f"{name} mask={mode}: kept region MAD {kept_mad * 255:.2f}/255, "
            f"styled region MAD {styled_mad * 255:.1f}/255"
        )
        assert kept_mad <= 3 / 255, kept_mad  # the camera as it is
        assert styled_mad > 15 / 255, styled_mad  # the style: 5x the kept bound and more
    assert daemon.masks.missed == 0
    # /status, `streamv2v status`, `streamv2v presets` and the page's listing say the mask.
    status = daemon.status()["mask"]
    assert status["mode"] == mode and status["feather"] == 1
    assert status["segment_ms_p50"] > 0 and status["composite_ms_p50"] > 0
    assert f"styles only the {mode}" in status_table(daemon.status())
    (row,) = [r for r in daemon.preset_listing()["presets"] if r["name"] == "masked"]
    assert row["mask"] == mode
    lines, _ = preset_table(daemon.preset_listing(), running=False)
    assert any(f"[styles only the {mode}]" in line for line in lines if "masked" in line)


def code_of(image: np.ndarray) -> int:
    """The frame number drawn by :func:`moving_clip` (5 bits, 6x6 blocks, top left)."""
    bits = [image[1:5, 6 * i + 1 : 6 * i + 5].mean() > 128 for i in range(5)]
    return sum(bit << i for i, bit in enumerate(bits))


def moving_clip(base: np.ndarray, n: int, step: int) -> list[np.ndarray]:
    """The photo shifted ``step`` px a frame right and back (a loop), numbered in the corner."""
    frames = []
    for i in range(n):
        dx = step * min(i, n - i)
        shifted = cv2.warpAffine(
            base,
            np.float32([[1, 0, dx], [0, 1, 0]]),
            base.shape[1::-1],
            borderMode=cv2.BORDER_REPLICATE,
        )
        for bit in range(5):
            shifted[0:6, 6 * bit : 6 * bit + 6] = 255 if i >> bit & 1 else 0
        frames.append(shifted)
    return frames


@pytest.mark.slow
def test_each_output_is_composited_with_its_own_frames_mask(
    tiny_model, memory_vcam, tmp_path, segmenter
):
    """3-step stream batch: each output leaves the engine two frames after its input. The ghost
    band is the room at frame t where the person is two frames earlier or later (where a mask
    two frames off, or one that trails, would put the style); the ghost measure is the output's
    MAD there against its own camera frame, next to the styled level (the same MAD over the
    person, which is styled)."""
    cameras = write_clip(tmp_path / "moving.avi", moving_clip(photo("astronaut"), 24, 3))
    preset = 'prompt = "a painting"\nmask = "person"\nmask_feather = 1\n'
    daemon = run_daemon(
        tiny_model, tmp_path / "moving.avi", preset, memory_vcam, 30, steps=3, strength=0.6
    )
    assert daemon.engine.engine.config.stream_batch and daemon.engine.engine.latency_frames == 2
    # Every output was composited with its own frame's mask (found by its tag), on a clip that
    # moves: a mask of another frame would put the person elsewhere.
    assert len(daemon.mask_pairs) >= 30 and foreign(daemon.mask_pairs) == 0, daemon.mask_pairs
    assert daemon.masks.missed == 0
    n = len(cameras)
    person = [cv2.resize(segmenter(c), (SIZE, SIZE)) for c in cameras]
    sent = memory_vcam.instances[-1].frames[-200:]
    distinct = {f.tobytes(): f for f in sent}.values()  # the output repeats a frame till a new one
    starting = unavailable_frame(SIZE, SIZE, "starting...")
    ghost, styled = [], []
    for out in (f.reshape(SIZE, SIZE, 3) for f in distinct):
        if np.array_equal(out, starting):
            continue  # published before the first camera frame
        t = code_of(out)  # the room is the camera's: its number says which frame this is
        body = person[t % n] > 0.9
        if t >= n or mad(out[body], cameras[t][body]) < 2 / 255:
            continue  # passthrough while the engine loaded: nothing composited
        near = np.maximum(person[(t + 2) % n], person[(t - 2) % n])
        band = (near > 0.9) & (person[t] < 0.05)
        if band.sum() < 20:
            continue  # the person was turning round: no band
        ghost.append(mad(out[band], cameras[t][band]))
        styled.append(mad(out[body], cameras[t][body]))
    print(
        f"ghost band MAD {np.mean(ghost) * 255:.1f}/255 (max {np.max(ghost) * 255:.1f}); "
        f"styled level {np.mean(styled) * 255:.1f}/255; {len(ghost)} outputs"
    )
    assert len(ghost) >= 5
    # The room at the person's other places is the camera's, up to the soft edge and what the
    # smoothing (motion-adaptive: it lets big changes through) keeps of the last frames.
    assert np.mean(ghost) <= 16 / 255
    assert np.mean(ghost) < 0.2 * np.mean(styled)  # a mask two frames off would style the band


def noisy_still(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    base = photo("astronaut").astype(np.int16)
    return [
        Frame(
            np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), i, i, "camera"
        )
        for i in range(n)
    ]


def test_smoothing_halves_the_mask_edge_flicker_over_hundreds_of_frames():
    frames = noisy_still(200)
    flicker = {}
    for smoothing in (0.0, 0.9):
        worker = MaskWorker((SIZE, SIZE), (SIZE, SIZE))
        preset = Preset(
            name="p", prompt="x", mask="person", mask_feather=0, mask_smoothing=smoothing
        )
        masks = [worker.process(f, preset, restart=i == 0).weight for i, f in enumerate(frames)]
        masks = np.stack(masks)
        edge = (masks.mean(0) > 0.05) & (masks.mean(0) < 0.95)  # where the edge flickers
        assert np.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1
        flicker[smoothing] = float(np.abs(np.diff(masks, axis=0))[:, edge].mean())
    print(f"mask edge MAD per frame: raw {flicker[0.0]:.4f}, smoothed {flicker[0.9]:.4f}")
    assert flicker[0.9] <= 0.5 * flicker[0.0]


def test_a_switch_between_masked_and_unmasked_presets_blends():
    frames = iter(noisy_still(16))
    worker = MaskWorker((SIZE, SIZE), (SIZE, SIZE))
    plain = Preset(name="plain", prompt="x", transition_frames=2)
    room = Preset(name="room", prompt="x", mask="background", transition_frames=4)
    (y0, y1, x0, x1), _ = REGIONS["astronaut"]
    assert worker.process(next(frames), plain, restart=True) is None  # styled everywhere

    # To the room-only preset: the face's style weight goes 1 -> 0 over its 4 frames.
    def face_weight(masked):
        return cv2.resize(masked.weight, (SIZE, SIZE))[y0:y1, x0:x1].mean()

    face = [face_weight(worker.process(next(frames), room)) for _ in range(5)]
    assert np.allclose(face, [0.75, 0.5, 0.25, 0.0, 0.0], atol=0.06), face
    # And back over plain's 2 frames: half way, then no mask at all (no segmentation either).
    assert abs(face_weight(worker.process(next(frames), plain)) - 0.5) < 0.06
    assert worker.process(next(frames), plain) is None
    frame = next(frames)
    worker.offer(frame, plain)
    assert worker.lookup(frame.captured_at, 0.0) is None


def test_without_the_extra_a_masked_preset_is_refused_in_one_line_and_the_rest_works(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()  # ai-edge-litert made unimportable in the child, as if not installed
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["ai_edge_litert"] = None\n')
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "room.toml").write_text('prompt = "a painting"\nmask = "background"\n')
    (presets / "plain.toml").write_text('prompt = "a painting"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.getcwd()])}
    base = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
    sets = ["--set", f"presets.dir={presets}", "--set", "control.port=1"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=120)

    listed = run("presets", *sets)
    assert listed.returncode == 0, listed.stderr  # as for any broken preset file
    errors = [line for line in listed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, listed.stderr
    assert "line 2: mask: a person mask needs ai-edge-litert" in errors[0]
    assert "pip install 'streamv2v[mask]'" in errors[0]
    assert "plain" in listed.stdout and "room" not in listed.stdout.replace("room.toml", "")
    assert "Traceback" not in listed.stderr + listed.stdout
    started = run("run", *sets, "--set", "presets.startup=room", "--duration", "1")
    assert started.returncode == 2, started.stderr
    assert "pip install 'streamv2v[mask]'" in started.stderr
    assert "Traceback" not in started.stderr + started.stdout
