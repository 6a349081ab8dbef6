"""The feature bank's layer shapes read off the UNet's blocks, against the UNet pass on fake
tensors that finds them for any structure: the tiny SD model, the shipped tiny style model and
the tiny SDXL model (whose first down block has no attention), at even, odd and non-square latent
sizes (odd ones round up at each downsampler)."""

from __future__ import annotations

import pytest
import torch

from daemon.models.registry import tiny_sdxl_dir, tiny_styles_dir
from streamv2v import EngineConfig, StreamV2V
from streamv2v.attention import (
    _shapes_from_structure,
    self_attention_layers,
    self_attention_shapes,
    shapes_by_fake_pass,
)

SIZES = [(8, 8), (9, 12), (5, 7), (13, 3), (1, 1), (64, 96)]


@pytest.fixture(scope="module", params=["tiny", "tiny-styles", "tiny-sdxl"])
def engine(request, tmp_path_factory):
    if request.param == "tiny":
        from streamv2v.testing import save_tiny_model

        model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    else:
        model = tiny_styles_dir() if request.param == "tiny-styles" else tiny_sdxl_dir()
    config = EngineConfig(vae="model", width=64, height=64, steps=1)
    return StreamV2V.from_pretrained(model, config=config, device="cpu")


@pytest.mark.parametrize("latent_hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_the_shapes_read_off_the_blocks_are_those_of_a_unet_pass(engine, latent_hw):
    call = engine._calls[0]
    added = call.unet_kwargs().get("added_cond_kwargs")
    read = _shapes_from_structure(engine.unet, latent_hw)
    passed = shapes_by_fake_pass(engine.unet, latent_hw, call.embeds[:1], added)
    engine.set_config(engine.config)  # (the pass left plain processors: the bank's back)
    assert read is not None and read == passed
    assert set(read) == set(self_attention_layers(engine.unet))
    # Different levels see different sizes (the check is not of one number everywhere).
    if latent_hw[0] * latent_hw[1] > 4:
        assert len({tokens for tokens, _ in read.values()}) > 1, read


def test_another_structure_falls_back_to_the_pass(engine):
    """A UNet the reader does not know (here: its downsamplers' convolutions padded otherwise)
    gets its shapes from the pass, not from a guess."""
    unet = engine.unet
    convs = [b.downsamplers[0].conv for b in unet.down_blocks if b.downsamplers]
    before = [c.padding for c in convs]
    try:
        for conv in convs:
            conv.padding = (0, 0)
        assert _shapes_from_structure(unet, (9, 12)) is None
    finally:
        for conv, padding in zip(convs, before):
            conv.padding = padding
    assert _shapes_from_structure(unet, (9, 12)) is not None


def test_an_engine_at_a_new_size_runs_no_unet_pass(engine):
    passes = []
    hook = engine.unet.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        shapes = self_attention_shapes(engine.unet, (11, 7), torch.zeros(1))
    finally:
        hook.remove()
    assert passes == [] and len(shapes) == len(self_attention_layers(engine.unet))
