"""The demo LyCORIS file: a LoHa style ("noir") for the tiny style model, in the key form
LyCORIS/kohya write (``lora_unet_<path>.hada_w1_a`` ... ``.alpha``), read here by peft's own LoHa
layers (their ``merge()`` writes each delta into the base weight): it turns the picture black
and white, its shapes kept, as trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from daemon.models.registry import tiny_styles_dir
from daemon.styles.presets import bundled_presets_dir, load_preset_file
from streamv2v import EngineConfig, StreamV2V
from streamv2v.scenes import STYLES, random_scene, render
from streamv2v.tiny.loha import (
    HADA,
    NOIR_PROMPT,
    LohaRecipe,
    loha_config,
    noir,
    noir_error,
    peft_state,
    train,
)
from streamv2v.tiny.lora import sepia, sepia_error

SHIPPED = tiny_styles_dir().parent / "tiny-styles-loras" / "noir.safetensors"


def test_the_statistic_tells_black_and_white_from_the_colourful_styles_and_sepia():
    scene = random_scene(np.random.default_rng(3))
    plain = render(scene, "plain")
    assert noir_error(noir(plain)) < 1.0
    for style in ("plain", "warm", "cool"):
        assert noir_error(render(scene, style)) > 30.0
    assert noir_error(render(scene, "outline")) < 1.0  # (black lines on white: the LoHa test
    # compares the same prompt with and without the LoHa, and the shapes kept)
    assert noir_error(sepia(plain)) > 10.0 and sepia_error(noir(plain)) > 10.0


@pytest.mark.slow
def test_the_loha_training_script_writes_a_lycoris_file_reproducibly(tmp_path):
    recipe = LohaRecipe(steps=2, scenes=4, batch=2, size=64)
    a = train(tiny_styles_dir(), tmp_path / "a" / "c.safetensors", recipe, log=lambda _: None)
    train(tiny_styles_dir(), tmp_path / "b" / "c.safetensors", recipe, log=lambda _: None)
    ta, tb = (load_file(tmp_path / d / "c.safetensors") for d in ("a", "b"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # LyCORIS's key form: four Hadamard factors and an alpha per module, nothing else.
    stems = {k.rsplit(".", 1)[0] for k in ta}
    assert all(s.startswith("lora_unet_") for s in stems)
    assert set(ta) == {f"{s}.{f}" for s in stems for f in (*HADA, "alpha")}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in stems  # convs adapted too
    assert all(ta[f"{s}.alpha"].item() == recipe.rank for s in stems)
    assert a["bytes"] < 300_000
    # The shipped file is the same recipe at full length: the same modules, the same form.
    shipped = load_file(SHIPPED)
    assert shipped.keys() == ta.keys() and SHIPPED.stat().st_size < 300_000
    with safe_open(SHIPPED, "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"


def merged_by_peft(engine: StreamV2V, state: dict[str, torch.Tensor]) -> int:
    """The LoHa file merged into ``engine``'s UNet by peft's own LoHa layers; the rank."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.loha import LoHaLayer

    rank = next(v.shape[1] for k, v in state.items() if k.endswith(".hada_w1_a"))
    assert all(v.item() == rank for k, v in state.items() if k.endswith(".alpha"))
    unet = engine.unet
    inject_adapter_in_model(loha_config(rank), unet)
    result = set_peft_model_state_dict(unet, peft_state(state, unet))
    assert not result.unexpected_keys
    layers = [m for m in unet.modules() if isinstance(m, LoHaLayer)]
    assert len(layers) == len(state) // 5
    for layer in layers:
        layer.merge()
    return rank


@pytest.mark.slow
def test_the_shipped_loha_turns_the_picture_noir(one_torch_thread):
    """The demo preset's settings on rendered scenes of every style, the same prompt, with and
    without the LoHa merged (by peft): with it, the frames lie near the noir tone line."""
    preset = load_preset_file(bundled_presets_dir("demo") / "noir.toml")
    assert preset.prompt == NOIR_PROMPT
    assert Path(preset.loras[0].id).resolve() == SHIPPED.resolve()
    config = EngineConfig(
        vae="model", width=128, height=128, steps=2, strength=preset.strength, stream_batch=False
    )
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(2)]
    frames = [render(scene, s) for s in STYLES for scene in scenes]
    targets = [noir(render(scene, "plain")) for _ in STYLES for scene in scenes]

    def outputs(with_loha: bool | str) -> list[np.ndarray]:
        engine = StreamV2V.from_pretrained(tiny_styles_dir(), config=config, device="cpu")
        if with_loha == "in place":  # the preset's path: the LyCORIS reader, switched in place
            engine.adapters.load("noir", str(SHIPPED))
            assert engine.set_loras({"noir": 1.0}) > 0
        elif with_loha:
            state = load_file(SHIPPED)
            rank = merged_by_peft(engine, state)
            # peft's merge is LyCORIS's formula: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
            stem, layer = "lora_unet_mid_block_attentions_0_proj_in", "mid_block.attentions.0"
            w = {f: state[f"{stem}.{f}"].float() for f in HADA}
            delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
            base = StreamV2V.from_pretrained(tiny_styles_dir(), config=config, device="cpu")
            got = engine.unet.get_submodule(f"{layer}.proj_in").base_layer.weight
            want = base.unet.get_submodule(f"{layer}.proj_in").weight
            alpha = state[f"{stem}.alpha"].item()
            torch.testing.assert_close(got, want + delta.view_as(want) * alpha / rank)
        engine.set_prompt(NOIR_PROMPT)
        out = []
        for frame in frames:
            engine.reset_bank()
            engine(frame)
            out.append(engine(frame))
        return out

    def kept(outs: list[np.ndarray]) -> float:
        """How well the output's brightness follows the scene's (its noir render)."""
        return float(
            np.mean(
                [
                    np.corrcoef(o.max(axis=-1).ravel(), t.max(axis=-1).ravel())[0, 1]
                    for o, t in zip(outs, targets)
                ]
            )
        )

    base, loha = outputs(False), outputs(True)
    # The demo preset's own path (the in-place LoHa reader) gives peft's picture.
    for ours, peft in zip(outputs("in place"), loha):
        assert np.abs(ours.astype(int) - peft.astype(int)).max() <= 1
    plain = np.mean([noir_error(o) for o in base])
    styled = np.mean([noir_error(o) for o in loha])
    assert styled < 0.3 * plain, (styled, plain)
    # ...and the shapes stay as well as the model keeps them without it (at strength 0.3 the
    # tiny model redraws a scene in its style: the brightness follows it only in part).
    assert kept(loha) > 0.2 and kept(loha) > kept(base) - 0.15, (kept(loha), kept(base))
