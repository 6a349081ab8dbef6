"""The person kept by a mask is as sharp as the camera, at outputs larger than the engine.

The daemon styles a 128x128 engine frame and publishes 2x and 2.5x that size; the camera is a
non-square clip (4:3, the astronaut photo in its centre: what the engine's crop keeps). The kept
region of each published frame must be the camera's own pixels (cropped like the engine's input,
resized once to the output), not the camera squeezed through the engine's size and blown up.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_daemon import demo_config, wait_for
from test_mask import REGIONS, SIZE, mad, photo, write_clip

from daemon.app import Daemon
from daemon.dataplane.frames import Frame, crop_to_aspect, fit_to
from daemon.masking.worker import MaskWorker
from daemon.styles.presets import Preset


def wide_camera(side: int) -> np.ndarray:
    """A 4:3 frame whose centre square (side x side) is the astronaut; the sides mirror it."""
    centre = photo("astronaut", side)
    pad = side // 6
    return cv2.copyMakeBorder(centre, 0, 0, pad, pad, cv2.BORDER_REFLECT)


def kept_slices(out_side: int) -> tuple[slice, slice]:
    """The face (the person: kept under mask = "background") at the output's size."""
    (y0, y1, x0, x1), _ = REGIONS["astronaut"]
    k = out_side / SIZE
    return slice(round(y0 * k), round(y1 * k)), slice(round(x0 * k), round(x1 * k))


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2.0, 2.5])
def test_the_kept_person_is_the_camera_at_the_outputs_resolution(
    tiny_model, memory_vcam, tmp_path, scale
):
    out_side = round(SIZE * scale)
    # A camera with more pixels than the output (as a 1280x720 camera with a 512 engine).
    clip = tmp_path / "wide.avi"
    cameras = write_clip(clip, [wide_camera(out_side + 64)] * 10)
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "masked.toml").write_text(
        'prompt = "a painting"\nmask = "background"\nmask_feather = 2\n'
    )
    cfg = demo_config(
        tiny_model,
        camera={"source": str(clip), "fps": 20.0},
        presets={"dir": str(folder), "startup": "masked"},
    )
    data = cfg.model_dump()
    data["engine"]["settings"].update({"width": SIZE, "height": SIZE, "steps": 1})
    data["output"]["virtual_camera"].update({"width": out_side, "height": out_side})
    daemon = Daemon(type(cfg).model_validate(data))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.masks.masked_frames >= 6, 90), daemon.status()
    finally:
        daemon.stop()
    published = [f.reshape(out_side, out_side, 3) for f in memory_vcam.instances[-1].frames[-4:]]
    face = kept_slices(out_side)
    room = (slice(0, out_side // 5), slice(0, out_side // 5))
    expected = [fit_to(c, out_side, out_side) for c in cameras]  # crop + one resize
    worst = 0.0
    for out in published:
        camera = min(expected, key=lambda c: mad(out[face], c[face]))
        worst = max(worst, mad(out[face], camera[face]))
        # (the room is styled: the composite did not just pass the camera through)
        assert mad(out[room], camera[room]) > 10 / 255
    print(f"output {scale}x the engine ({out_side}px): kept region MAD {worst * 255:.2f}/255")
    assert worst <= 3 / 255, worst * 255


@pytest.mark.parametrize(
    ("engine", "output"),
    [((160, 128), (400, 320)), ((128, 128), (320, 180))],
    ids=["non-square-engine-2.5x", "square-engine-wide-output"],
)
def test_the_mask_follows_the_outputs_crop_and_feathers_in_output_pixels(engine, output):
    """Outputs 2.5x the engine: the kept camera is the engine's crop at the output's size; the
    mask maps onto the output as the engine's frame does (cropped alike when the output is
    wider), and its feather is as wide in x as in y, in output pixels."""
    (ew, eh), (ow, oh) = engine, output
    worker = MaskWorker(engine, output)
    rng = np.random.default_rng(3)
    camera = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # 4:3
    # A person mask standing in for the segmenter: a vertical and a horizontal edge.
    person = np.zeros((256, 256), np.float32)
    person[96:, 128:] = 1.0
    crop = crop_to_aspect(camera, ew, eh)  # the engine's crop

    class Stub:
        def __call__(self, image: np.ndarray) -> np.ndarray:
            assert image.shape == crop.shape  # the engine's crop of the camera, unresized
            return person.copy()

    worker._segmenter = Stub()  # (the shipped segmenter is tested in test_mask.py)
    preset = Preset(name="p", prompt="x", mask="person", mask_feather=8, mask_smoothing=0)
    masked = worker.process(Frame(camera, 1.0, 1, "camera"), preset, restart=True)
    assert masked is not None
    assert np.array_equal(masked.camera, fit_to(crop, ow, oh))  # one resize, never via engine
    weight = cv2.resize(masked.weight, (ow, oh), interpolation=cv2.INTER_LINEAR)
    # Where the mask's edges land on the output: the output shows the centre of the engine's
    # frame with its own aspect.
    ch, cw = crop_to_aspect(np.empty((eh, ew, 0)), ow, oh).shape[:2]
    edge_y = (96 / 256 * eh - (eh - ch) / 2) / ch * oh
    edge_x = (128 / 256 * ew - (ew - cw) / 2) / cw * ow
    col, row = weight[:, round(edge_x + 60)], weight[round(edge_y + 60), :]

    def width(profile: np.ndarray) -> int:  # pixels between 10% and 90% of the step
        return int(((profile > 0.1) & (profile < 0.9)).sum())

    assert abs(np.argmin(np.abs(col - 0.5)) - edge_y) <= 2
    assert abs(np.argmin(np.abs(row - 0.5)) - edge_x) <= 2
    wx, wy = width(row), width(col)
    print(f"engine {engine} -> output {output}: feather 10-90% {wx} px in x, {wy} px in y")
    assert abs(wx - wy) <= 2, (wx, wy)  # feathered alike in both output axes
    assert 16 <= wx <= 26, wx  # sigma 8 output px: 10-90% spans ~2.56 sigma ~ 20 px
