"""The engine's Canny equals the annotators' (``cv2.Canny(rgb, low, high)``) on real photos:
scikit-image's bundled astronaut, coffee, chelsea and rocket at 512 and 256 px, three threshold
pairs, in float32 and in float16 (the engine's dtype on a GPU)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from streamv2v import ControlSpec
from streamv2v.preprocess import canny, make_preprocessor

skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image (test extra)")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZES = (512, 256)
THRESHOLDS = ((100, 200), (50, 150), (150, 300))  # the annotators' default first
MIN_F1 = 0.95


@pytest.fixture(scope="module")
def photos() -> dict[tuple[str, int], np.ndarray]:
    """Each photo resized (area) so its long side is 512 or 256: RGB uint8."""
    out = {}
    for name in PHOTOS:
        image = getattr(skimage_data, name)()
        h, w = image.shape[:2]
        for size in SIZES:
            s = size / max(h, w)
            out[name, size] = cv2.resize(
                image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA
            )
    return out


def model_input(rgb: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """An RGB uint8 frame as the engine's model input: [1, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return x.to(dtype)


def edges_of(rgb: np.ndarray, low: float, high: float, dtype=torch.float32) -> np.ndarray:
    spec = ControlSpec(
        model="canny-net", preprocess="canny", low_threshold=low, high_threshold=high
    )
    prep = make_preprocessor(spec, device="cpu", dtype=dtype)
    out = prep(model_input(rgb, dtype))
    assert out.dtype == dtype and out.shape == (1, 3, *rgb.shape[:2])
    assert torch.equal(out[0, 0], out[0, 2])
    return out[0, 0].float().numpy() > 0.5


def f1_within_1px(ours: np.ndarray, ref: np.ndarray) -> float:
    """F1 of precision (our edge pixels within 1 px, 8-neighbourhood, of an OpenCV edge) and
    recall (OpenCV's within 1 px of ours)."""
    kernel = np.ones((3, 3), np.uint8)
    near_ref = cv2.dilate(ref.astype(np.uint8), kernel) > 0
    near_ours = cv2.dilate(ours.astype(np.uint8), kernel) > 0
    if not ours.any() or not ref.any():
        return float(ours.any() == ref.any())
    precision = near_ref[ours].mean()
    recall = near_ours[ref].mean()
    return float(2 * precision * recall / max(precision + recall, 1e-9))


@pytest.mark.slow
def test_canny_equals_opencv_on_photos(photos):
    scores = {}
    for (name, size), rgb in photos.items():
        for low, high in THRESHOLDS:
            ref = cv2.Canny(rgb, low, high) > 0
            ours = edges_of(rgb, low, high)
            assert ref.sum() > 1000  # real photos, real edges: the comparison is not vacuous
            scores[name, size, low, high] = f1_within_1px(ours, ref)
    worst = min(scores.items(), key=lambda kv: kv[1])
    assert worst[1] >= MIN_F1, worst


def test_canny_in_float16_equals_float32_and_opencv(photos):
    rgb = photos["astronaut", 256]
    ref = cv2.Canny(rgb, 100, 200) > 0
    half = edges_of(rgb, 100, 200, torch.float16)
    assert np.array_equal(half, edges_of(rgb, 100, 200))
    assert f1_within_1px(half, ref) >= MIN_F1


def test_enough_hysteresis_steps_give_opencvs_pixels_exactly(photos):
    """With growth steps to spare the fixed-count hysteresis reaches every weak chain's end:
    pixel for pixel OpenCV's, so every difference at the default count is a cut chain."""
    for name in ("coffee", "rocket"):
        rgb = photos[name, 256]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        for low, high in THRESHOLDS:
            ours = canny(x, low, high, hysteresis_steps=256)[0, 0].numpy() > 0.5
            assert np.array_equal(ours, cv2.Canny(rgb, low, high) > 0), (name, low, high)


def test_colour_edges_of_equal_brightness_are_found():
    """Shapes that differ from the background by colour only: the grey image has no edge;
    OpenCV on RGB (the per-pixel channel of the largest gradient) and ours find the outline."""
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:] = (120, 120, 120)
    frame[16:48, 16:48] = (170, 100, 100)  # a red of the grey's luminance
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    assert np.ptp(grey) <= 2 and not (cv2.Canny(grey, 100, 200) > 0).any()
    ref = cv2.Canny(frame, 100, 200) > 0
    ours = edges_of(frame, 100, 200)
    assert ref.sum() >= 100 and np.array_equal(ours, ref)


def test_thresholds_in_the_old_units_are_refused_with_the_new_ones_named():
    with pytest.raises(ValidationError, match=r"old 0-1 units.*low_threshold = 100"):
        ControlSpec(model="m", preprocess="canny", low_threshold=0.1, high_threshold=0.2)
    spec = ControlSpec(model="m", preprocess="canny")
    assert (spec.low_threshold, spec.high_threshold) == (100.0, 200.0)
    # Other preprocessors do not read them: no refusal there.
    ControlSpec(model="m", preprocess="image", low_threshold=0.1, high_threshold=0.2)
