"""Depth maps come out near = bright, as depth ControlNets were trained: a relative
(inverse-depth) model's output as it is, a metric model's distance turned around; the direction
read from each model's config, ``invert`` overriding it. Real transformers depth classes, built
tiny (streamv2v/testing.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from streamv2v import ControlSpec
from streamv2v.preprocess import make_preprocessor, outputs_distance, to_unit
from streamv2v.scenes import random_scene, render
from streamv2v.testing import save_tiny_depth_model


@pytest.fixture(scope="module")
def depth_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("depth")
    return {
        kind: str(save_tiny_depth_model(root / kind, depth_estimation_type=kind))
        for kind in ("relative", "metric")
    }


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    rgb = render(random_scene(np.random.default_rng(3)), "plain", size=64)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def prep(folder: str, invert: bool | None = None):
    spec = ControlSpec(model="depth-net", preprocess="depth", depth_model=folder, invert=invert)
    return make_preprocessor(spec, device="cpu", dtype=torch.float32)


def model_output(p, image: torch.Tensor) -> torch.Tensor:
    """The model's own predicted_depth for the frame, at the frame's size ([H, W])."""
    h, w = image.shape[-2:]
    x = F.interpolate(to_unit(image), p.input_size(h, w), mode="bilinear", align_corners=False)
    with torch.no_grad():
        raw = p.model(pixel_values=(x - p.mean) / p.std).predicted_depth
    return F.interpolate(raw[:, None], (h, w), mode="bilinear", align_corners=False)[0, 0]


def normalised(d: torch.Tensor) -> torch.Tensor:
    return (d - d.min()) / (d.max() - d.min())


@pytest.mark.slow
def test_relative_depth_stays_and_metric_distance_turns_near_bright(depth_models, frame):
    relative, metric = prep(depth_models["relative"]), prep(depth_models["metric"])
    assert not outputs_distance(relative.model.config) and outputs_distance(metric.model.config)
    with torch.no_grad():
        r = relative(frame)[0, 0]
        m = metric(frame)[0, 0]
    raw_r, raw_m = model_output(relative, frame), model_output(metric, frame)
    assert raw_m.max() > raw_m.min() and raw_r.max() > raw_r.min()  # not flat: it can bite
    # Relative: inverse depth, the largest output is the nearest: bright.
    torch.testing.assert_close(r, normalised(raw_r), atol=1e-5, rtol=0)
    assert r.flatten()[raw_r.argmax()] == 1.0
    # Metric: a distance, the smallest output is the nearest: bright after inverting.
    torch.testing.assert_close(m, 1.0 - normalised(raw_m), atol=1e-5, rtol=0)
    assert m.flatten()[raw_m.argmin()] == 1.0


@pytest.mark.slow
def test_invert_overrides_the_models_direction(depth_models, frame):
    with torch.no_grad():
        kept = prep(depth_models["metric"], invert=False)(frame)[0, 0]
        auto = prep(depth_models["metric"])(frame)[0, 0]
        turned = prep(depth_models["relative"], invert=True)(frame)[0, 0]
        plain = prep(depth_models["relative"])(frame)[0, 0]
    torch.testing.assert_close(kept, 1.0 - auto, atol=1e-5, rtol=0)
    torch.testing.assert_close(turned, 1.0 - plain, atol=1e-5, rtol=0)


def test_the_direction_of_other_transformers_depth_families_from_their_configs():
    from transformers import DPTConfig, GLPNConfig, ZoeDepthConfig

    assert not outputs_distance(DPTConfig())  # MiDaS-style relative inverse depth
    assert outputs_distance(GLPNConfig())  # metres
    assert outputs_distance(ZoeDepthConfig())  # metres


def test_invert_without_depth_is_refused():
    with pytest.raises(ValidationError, match="invert is for depth maps"):
        ControlSpec(model="m", preprocess="canny", invert=True)
