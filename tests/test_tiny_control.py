"""The shipped tiny canny ControlNet (streamv2v/models/tiny-canny): it ships in the package, its
condition is the engine's own canny preprocessing, its training script is reproducible (a few
steps here, never a whole training)."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daemon.models.registry import tiny_styles_dir
from daemon.offline.quality import measure, source_edges
from streamv2v import EngineConfig, StreamV2V
from streamv2v.scenes import SIZE, STYLES, random_scene, render
from streamv2v.tiny.control import Recipe, canny_condition, held_aside_clip, train

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CANNY = ROOT / "streamv2v" / "models" / "tiny-canny"


def test_the_shipped_controlnet_is_small_fp16_safetensors_and_in_the_package_data():
    from diffusers import ControlNetModel

    files = sorted(p for p in CANNY.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= names
    assert sum(p.stat().st_size for p in files) < 4 * 2**20
    weights = load_file(CANNY / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    # Every file of the folder is matched by the package data: it ships in a wheel.
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["streamv2v"]
    for p in files:
        rel = p.relative_to(ROOT / "streamv2v").as_posix()
        if p.suffix in (".json", ".safetensors", ".md"):
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs)
    net = ControlNetModel.from_pretrained(CANNY)
    unet_config = json.loads((tiny_styles_dir() / "unet" / "config.json").read_text())
    # It serves the style model's UNet: the same blocks, channels and cross-attention width.
    for key in ("block_out_channels", "cross_attention_dim", "down_block_types"):
        assert list(np.atleast_1d(net.config[key])) == list(np.atleast_1d(unet_config[key]))


def test_the_condition_is_the_engines_canny_preprocessing():
    """Trained on exactly what the engine's canny preprocessor (ControlSpec defaults) makes of
    a frame: the model input in [-1, 1] -> edges in [0, 1]."""
    from streamv2v import ControlSpec
    from streamv2v.preprocess import make_preprocessor

    spec = ControlSpec(model="tiny-canny", preprocess="canny")
    engine_canny = make_preprocessor(spec, device="cpu", dtype=torch.float32)
    frames = [*held_aside_clip(3), render(random_scene(np.random.default_rng(9)), "plain")]
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    for image in images:
        ours = canny_condition(image[None])
        assert torch.equal(ours, engine_canny(image[None] * 2 - 1))


def test_the_condition_is_binary_edges_on_the_shapes_outlines():
    frames = held_aside_clip(2)
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    edges = canny_condition(images)
    assert edges.shape == (2, 3, SIZE, SIZE)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 2])
    assert 0.005 < edges.mean() < 0.1  # outlines, not texture
    assert not torch.equal(edges[0], edges[1])  # the clip moves


def test_training_a_few_steps_is_reproducible_and_saves_a_controlnet(tmp_path):
    micro = Recipe(scenes=6, steps=3, batch=3, held_out=4, threads=1)
    figures = [
        train(tmp_path / name, micro, tiny_styles_dir(), log=lambda _: None) for name in "ab"
    ]
    assert figures[0]["held_out_x0_error"] == figures[1]["held_out_x0_error"]
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The zero-initialised output convolutions moved: it trained (the check can fail).
    assert any(k.startswith("controlnet_down_blocks") and a[k].abs().max() > 0 for k in a)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "3 steps of batch 3" in card and "| 0.8 (799) |" in card
    other = train(tmp_path / "c", Recipe(**{**micro.__dict__, "seed": 1}), tiny_styles_dir())
    assert other["held_out_x0_error"] != figures[0]["held_out_x0_error"]


def test_the_held_aside_clip_is_no_training_scene():
    rng = np.random.default_rng(Recipe.seed + 1)  # the training scenes' seed
    clip = held_aside_clip(1)[0]
    assert all(
        np.abs(render(random_scene(rng), "plain").astype(int) - clip).mean() > 5 for _ in range(200)
    )


# --------------------------------------------------------------------------- in the engine
#: Structure (edge F1 against the source, daemon/offline/quality.py) that the ControlNet must
#: reach, and its least gain over the model alone, at strength 0.8 (chosen from the measured
#: figures in the README's ControlNet table, with margin).
MIN_F1_ON = 0.25
MIN_GAIN = 0.2
FRAMES = 16


@pytest.fixture(scope="module")
def controlled():
    """The style model with the shipped ControlNet, loaded once (through the daemon's name)."""
    from daemon.models.engine_config import engine_config
    from streamv2v import BankConfig, ControlSpec

    control = ControlSpec(model="tiny-canny", preprocess="canny", scale=1.0)
    off = BankConfig(enabled=False)
    settings = EngineConfig(steps=1, strength=0.8, control=(control,), bank=off)
    config = engine_config("tiny-styles", settings, size=(SIZE, SIZE))
    assert Path(config.control[0].model).resolve() == CANNY.resolve()  # the name resolved
    return StreamV2V.from_pretrained(tiny_styles_dir(), config=config, device="cpu")


def structure(engine: StreamV2V, clip: list[np.ndarray], prompt: str, scale: float) -> float:
    engine.set_control_scales([scale])  # a tensor write: the same loaded engine
    engine.set_prompt(prompt)
    engine.reset()
    outputs = [engine(f) for f in clip]
    return measure(outputs, edges=source_edges(clip), skip=2).edge_f1


def test_on_a_held_aside_clip_at_strength_08_the_controlnet_keeps_the_shapes(controlled):
    clip = held_aside_clip(FRAMES)
    off = structure(controlled, clip, STYLES["warm"], 0.0)
    on = structure(controlled, clip, STYLES["warm"], 1.0)
    assert on >= MIN_F1_ON and on >= off + MIN_GAIN, (off, on)


@pytest.mark.parametrize("style", [s for s in STYLES if s != "warm"])
def test_the_shapes_hold_in_every_style(controlled, style):
    clip = held_aside_clip(FRAMES)[::2]
    f1 = structure(controlled, clip, STYLES[style], 1.0)
    assert f1 >= MIN_F1_ON - 0.1, (style, f1)
