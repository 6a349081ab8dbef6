"""The shipped tiny canny ControlNet fed the annotators' Canny (OpenCV's, on RGB): shapes that
differ from the background by colour only keep their outlines, and the demo's "cool" preset
keeps every shape of the demo camera's scene. Structure is measured as the issue states it:
edge F1 of OpenCV's RGB Canny (100/200) of the source and of the output, within 2 px."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from daemon.models.engine_config import engine_config
from daemon.models.registry import tiny_styles_dir
from daemon.offline.quality import EDGE_TOLERANCE, edge_f1
from daemon.styles.presets import bundled_presets_dir, load_preset_file
from streamv2v import BankConfig, ControlSpec, EngineConfig, StreamV2V
from streamv2v.scenes import (
    SIZE,
    STYLES,
    _inside,
    colour_only_clip,
    moving_scene,
    random_scene,
    render,
)

#: The least gain in edge F1 the ControlNet brings on the colour-only clip (the issue's).
MIN_GAIN = 0.10
#: Per shape of the demo scene under the "cool" preset: the least share of the source's
#: outline (annotator edges) that the output keeps within 2 px, and the least gain over the
#: same preset without the ControlNet (measured figures in the README, with margin).
MIN_SHAPE_RECALL = 0.5
MIN_SHAPE_GAIN = 0.25


def annotator_edges(frame: np.ndarray) -> np.ndarray:
    return cv2.Canny(frame, 100, 200) > 0


@pytest.fixture(scope="module")
def cool():
    """The demo's engine (the daemon's demo settings) under its bundled "cool" preset."""
    preset = load_preset_file(bundled_presets_dir("demo") / "cool.toml")
    control = ControlSpec(model="tiny-canny", preprocess="canny", scale=1.0)
    base = engine_config(
        "tiny-styles",
        EngineConfig(steps=1, control=(control,), bank=BankConfig(enabled=False)),
        size=(SIZE, SIZE),
    )
    engine = StreamV2V.from_pretrained(
        tiny_styles_dir(), config=preset.engine_config(base), device="cpu"
    )
    assert engine.config.strength == preset.strength and engine.config.steps == 1
    return engine, preset


def run(engine: StreamV2V, clip, prompt: str, scale: float) -> list[np.ndarray]:
    engine.set_control_scales([scale])
    engine.set_prompt(prompt)
    engine.reset()
    return [engine(f) for f in clip]


@pytest.mark.slow
def test_colour_only_shapes_keep_their_outlines_with_the_controlnet(cool):
    engine, _ = cool
    clip = colour_only_clip(10)
    grey = cv2.cvtColor(clip[0], cv2.COLOR_RGB2GRAY)
    assert not (cv2.Canny(grey, 100, 200) > 0).any()  # colour only: grey Canny sees nothing
    source = [annotator_edges(f) for f in clip]
    assert all(e.sum() > 200 for e in source)

    def f1(scale: float) -> float:
        outs = run(engine, clip, STYLES["warm"], scale)[2:]
        return float(np.mean([edge_f1(annotator_edges(o), s) for o, s in zip(outs, source[2:])]))

    off, on = f1(0.0), f1(1.0)
    assert on >= off + MIN_GAIN, (off, on)


def shape_recall(scene, clip, outputs, start: int = 2) -> list[float]:
    """Per shape: the share of the source's annotator edges on its outline (within 2 px of
    it) that lie within 2 px of an output edge, over the frames from ``start``."""
    coords = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE
    xx, yy = np.meshgrid(coords, coords)
    kept: list[list[float]] = [[] for _ in scene.shapes]
    for i in range(start, len(clip)):
        out = (~annotator_edges(outputs[i])).astype(np.uint8)
        near_out = cv2.distanceTransform(out, cv2.DIST_L2, 5) <= EDGE_TOLERANCE
        src = annotator_edges(clip[i])
        for k, shape in enumerate(moving_scene(scene, i / 15).shapes):
            outline = src & (np.abs(_inside(shape, xx, yy) * SIZE) <= 2)
            if outline.sum() >= 10:
                kept[k].append(float(near_out[outline].mean()))
    return [float(np.mean(v)) for v in kept]


@pytest.mark.slow
def test_the_demo_cool_preset_keeps_the_light_green_square_and_the_grey_circle(cool):
    engine, preset = cool
    scene = random_scene(np.random.default_rng(7))  # the demo camera's scene
    kinds = [(s.kind, s.color) for s in scene.shapes]
    circle = kinds.index((0, (138, 144, 161)))  # grey circle
    square = kinds.index((1, (107, 253, 135)))  # light-green square (on the green background)
    clip = [render(moving_scene(scene, i / 15), "plain") for i in range(8)]
    with_net = shape_recall(scene, clip, run(engine, clip, preset.prompt, 1.0))
    without = shape_recall(scene, clip, run(engine, clip, preset.prompt, 0.0))
    for k in (circle, square):
        assert with_net[k] >= MIN_SHAPE_RECALL, (k, with_net, without)
        assert with_net[k] >= without[k] + MIN_SHAPE_GAIN, (k, with_net, without)
