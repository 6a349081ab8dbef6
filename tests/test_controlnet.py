"""ControlNet in the stream batch, on the tiny model with a real ControlNet built from its UNet
(``ControlNetModel.from_unet``), saved and loaded back through ``from_pretrained``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from long_run_helpers import encode_each_image_once
from pydantic import ValidationError

from streamv2v import ControlSpec, EngineConfig, ModelLoadError, StreamV2V, UnsafeWeightsError
from streamv2v.attention import FeatureBankAttnProcessor
from streamv2v.testing import save_tiny_controlnet, save_tiny_depth_model

SIZE = {"width": 64, "height": 64}
OFF = {"enabled": False}


@pytest.fixture(scope="module")
def controlnet(tiny_model, tmp_path_factory):
    return save_tiny_controlnet(tmp_path_factory.mktemp("cn") / "canny", tiny_model)


def make(model, controlnet, dtype=None, preprocess="canny", **cfg) -> StreamV2V:
    spec = {"model": str(controlnet), "preprocess": preprocess, **cfg.pop("spec", {})}
    config = EngineConfig(vae="model", control=[spec], **{**SIZE, **cfg})
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu", dtype=dtype)
    engine.set_prompt("the cat and the dog", "a dog")
    return engine


def scenes(n: int, seed: int = 1) -> list[np.ndarray]:
    """Frames with shapes (so Canny finds edges) that move from frame to frame."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = np.full((64, 64, 3), 40, np.uint8)
        x, y = (5 + 7 * i) % 40, (11 + 5 * i) % 40
        f[y : y + 20, x : x + 20] = rng.integers(150, 256, 3)
        f[40:60, (3 * i) % 50 : (3 * i) % 50 + 12] = rng.integers(0, 120, 3)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def pair(tiny_model, controlnet):
    """A stream-batch and a sequential engine, reconfigured per case (no reload)."""
    batched = make(tiny_model, controlnet, bank=OFF, stream_batch=True)
    sequential = make(tiny_model, controlnet, bank=OFF, stream_batch=False)
    return batched, sequential


@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
def test_stream_batch_equals_sequential_with_control_in_every_guidance_mode(
    pair, guidance, one_torch_thread
):
    frames = scenes(6)
    for k in (1, 2, 4):
        outs = []
        for engine in pair:
            update = {"steps": k, "strength": 0.8, "guidance": guidance, "guidance_scale": 1.6}
            engine.set_config(engine.config.model_copy(update=update))
            outs.append([engine(f, output_type="latent") for f in frames])
        got, want = outs
        assert got[: k - 1] == [None] * (k - 1)
        for t in range(len(frames) - (k - 1)):
            diff = (got[t + k - 1] - want[t]).abs().max().item()
            assert diff <= 1e-4, f"{guidance}, k={k}, frame {t}: max latent difference {diff}"
    # Not vacuous: the control moves the output. The same frames from a reset stream, at
    # scale 1 and at scale 0 (the UNet alone).
    batched = pair[0]

    def replay(scale: float) -> torch.Tensor:
        batched.set_control_scales([scale])
        batched.reset()
        return [batched(f, output_type="latent") for f in frames[:4]][-1]  # (k = 4: frame 0)

    with_control, without = replay(1.0), replay(0.0)
    batched.set_control_scales([1.0])
    assert (with_control - without).abs().max().item() > 1e-2


def test_each_slot_receives_its_own_frames_control_image(tiny_model, controlnet):
    k = 3
    engine = make(
        tiny_model, controlnet, preprocess="image", steps=k, strength=0.9, guidance="full",
        guidance_scale=1.5, bank=OFF,
    )  # fmt: skip
    seen: list[torch.Tensor] = []
    net = engine.control.nets[0]
    hook = net.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True
    )
    frames = scenes(6)
    for f in frames:
        engine(f)
    hook.remove()
    own = [engine._to_model_input(f) * 0.5 + 0.5 for f in frames]  # "image": the frame in [0, 1]
    assert len(seen) == len(frames)  # one ControlNet call per frame, all slots batched
    for t, cond in enumerate(seen):
        assert cond.shape[0] == 2 * k  # conditional rows, then their guidance rows
        for slot in range(min(t + 1, k)):
            # Slot i holds the frame of i calls ago, with that frame's control image...
            torch.testing.assert_close(cond[slot : slot + 1], own[t - slot], atol=0, rtol=0)
            # ...and its guidance row the same control.
            assert torch.equal(cond[k + slot], cond[slot])
    assert not torch.equal(seen[-1][0], seen[-1][1])  # the frames (and controls) differ


def test_the_bank_stays_on_the_unet_and_the_controlnet_keeps_plain_attention(
    tiny_model, controlnet
):
    engine = make(tiny_model, controlnet, steps=2)
    outs = [engine(f, output_type="latent") for f in scenes(6)]
    unet_procs = engine.unet.attn_processors.values()
    net_procs = engine.control.nets[0].attn_processors.values()
    assert any(isinstance(p, FeatureBankAttnProcessor) for p in unet_procs)
    assert not any(isinstance(p, FeatureBankAttnProcessor) for p in net_procs)
    assert engine.stats()["bank_enabled"] and all(torch.isfinite(o).all() for o in outs[1:])


def test_scale_zero_equals_no_controlnet_and_scales_change_live(tiny_model, controlnet):
    plain = StreamV2V.from_pretrained(
        tiny_model, config=EngineConfig(vae="model", steps=2, **SIZE), device="cpu"
    )
    plain.set_prompt("the cat and the dog", "a dog")
    engine = make(tiny_model, controlnet, steps=2, spec={"scale": 0.0, "name": "edges"})
    frames = scenes(6)
    for f in frames[:3]:
        a, b = plain(f, output_type="latent"), engine(f, output_type="latent")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    calls = engine._calls
    engine.set_control_scales({"edges": 1.2})  # by name; the stream keeps running
    assert engine._calls is calls and engine.config.control[0].scale == 1.2
    out = engine(frames[3], output_type="latent")
    assert out is not None and (out - plain(frames[3], output_type="latent")).abs().max() > 1e-2
    with pytest.raises(ValueError, match="no ControlNet has that name"):
        engine.set_control_scales({"depth": 1.0})
    with pytest.raises(ValueError, match="2 control scales for 1 ControlNets"):
        engine.set_control_scales([1.0, 1.0])
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        engine.set_control_scales([-1.0])
    with pytest.raises(ValueError, match="needs a reload"):
        other = engine.config.control[0].model_copy(update={"preprocess": "image"})
        engine.set_config(engine.config.model_copy(update={"control": (other,)}))
    with pytest.raises(ValueError, match="no ControlNet"):
        plain.set_control_scales([1.0])


def test_canny_follows_the_shapes_and_its_thresholds(tiny_model, controlnet):
    engine = make(tiny_model, controlnet, steps=1)
    frame = np.full((64, 64, 3), 30, np.uint8)
    frame[16:48, 16:48] = 220  # a bright square
    frame[2:12, 50:60] = 90  # a faint one (a step of 60: OpenCV's gradient 240)
    image = engine._to_model_input(frame)
    edges = engine.control.preprocess(image)[0]
    assert edges.shape == (1, 3, 64, 64) and set(edges.unique().tolist()) <= {0.0, 1.0}
    ring = edges[0, 0, 12:52, 12:52].clone()
    ring[6:34, 6:34] = 0
    assert ring.sum() >= 100  # the bright square's outline
    assert edges[0, 0, 22:42, 22:42].sum() == 0 and edges[0, 0, 56:].sum() == 0
    assert edges[0, 0, 0:14, 48:62].sum() >= 20  # the faint one's at the default thresholds
    strict = make(
        tiny_model, controlnet, steps=1, spec={"low_threshold": 300.0, "high_threshold": 500.0}
    )
    strict_edges = strict.control.preprocess(image)[0]
    assert strict_edges[0, 0, 0:14, 48:62].sum() == 0  # the faint square is gone
    assert strict_edges[0, 0, 12:52, 12:52].sum() >= 100  # the bright one stays


def test_depth_preprocessor_through_a_transformers_model_folder(tiny_model, controlnet, tmp_path):
    depth = save_tiny_depth_model(tmp_path / "depth")
    engine = make(
        tiny_model, controlnet, preprocess="depth", steps=2, spec={"depth_model": str(depth)}
    )
    frames = scenes(4)
    maps = [engine.control.preprocess(engine._to_model_input(f))[0] for f in frames]
    for m in maps:
        assert m.shape == (1, 3, 64, 64) and m.min() >= 0 and m.max() <= 1 and m.max() > 0
    assert not torch.equal(maps[0], maps[1])
    outs = [engine(f, output_type="latent") for f in frames]
    assert all(o is None or torch.isfinite(o).all() for o in outs)


def test_bad_control_configs_fail_with_a_clear_error(tiny_model, controlnet, tmp_path):
    with pytest.raises(ValidationError, match="needs depth_model"):
        ControlSpec(model=str(controlnet), preprocess="depth")
    with pytest.raises(ValidationError, match=r"low_threshold .* must be below"):
        ControlSpec(
            model=str(controlnet), preprocess="canny", low_threshold=0.5, high_threshold=0.2
        )
    with pytest.raises(ValidationError, match="preprocess"):
        ControlSpec(model=str(controlnet), preprocess="sketch")
    with pytest.raises(ValidationError, match="extra"):
        ControlSpec(model=str(controlnet), preprocess="canny", scal=1.0)
    two = [{"model": str(controlnet), "preprocess": "canny"}] * 2
    with pytest.raises(ValidationError, match="two ControlNets are named 'canny'"):
        EngineConfig(control=two)
    with pytest.raises(ModelLoadError, match="ControlNet folder not found"):
        make(tiny_model, tmp_path / "missing")
    # A ControlNet of another model family: its residuals would not fit the UNet.
    from diffusers import ControlNetModel

    other = ControlNetModel(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
        conditioning_embedding_out_channels=(8, 8),
    )  # fmt: skip
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError, match="does not fit the model: its block_out_channels"):
        make(tiny_model, tmp_path / "other")
    ControlNetModel.from_pretrained(controlnet).save_pretrained(
        tmp_path / "pickled", safe_serialization=False
    )
    with pytest.raises(UnsafeWeightsError, match="only pickle weights"):
        make(tiny_model, tmp_path / "pickled")


@pytest.mark.slow
def test_500_frames_in_float16_with_control_and_bank_stay_finite_and_alive(
    tiny_model, controlnet, one_torch_thread
):
    engine = make(tiny_model, controlnet, dtype=torch.float16, steps=2, bank={"interval": 2})
    assert engine.dtype == torch.float16 and engine.control.nets[0].dtype == torch.float16
    frames = scenes(16, seed=4)
    encoded = encode_each_image_once(engine)  # 16 distinct frames (tests/long_run_helpers.py)
    peak = 0.0
    for i in range(500):
        if i in (150, 300):  # live scale changes along the way
            engine.set_control_scales([0.5 if i == 150 else 1.5])
        out = engine(frames[i % 16], output_type="latent")
        if out is not None:
            peak = max(peak, out.abs().max().item())
    assert np.isfinite(peak) and peak < 20, f"latents reached {peak}"
    assert len(encoded) == 16
    # Alive: two different inputs still give outputs as far apart as on a fresh stream.
    a, b = frames[0], 255 - frames[0]

    def response(e: StreamV2V) -> float:
        xa = [e(a, output_type="latent") for _ in range(2)][-1]
        xb = [e(b, output_type="latent") for _ in range(2)][-1]
        return (xa.float() - xb.float()).abs().mean().item()

    fresh = make(tiny_model, controlnet, dtype=torch.float16, steps=2, bank={"interval": 2})
    fresh.set_control_scales([1.5])
    assert response(engine) > 0.5 * response(fresh) > 0


def test_presets_set_control_scales_by_list_or_name(controlnet):
    from daemon.styles.presets import Preset

    two = [
        {"model": str(controlnet), "preprocess": "canny"},
        {"model": str(controlnet), "preprocess": "image", "name": "tile", "scale": 0.5},
    ]
    base = EngineConfig(control=two)
    as_list = Preset(name="a", prompt="x", control_scales=[0.8, 0.0]).engine_config(base)
    assert [c.scale for c in as_list.control] == [0.8, 0.0]
    by_name = Preset(name="b", prompt="x", control_scales={"tile": 1.5}).engine_config(base)
    assert [c.scale for c in by_name.control] == [1.0, 1.5]  # the other keeps the base's
    assert by_name.control_load_key() == base.control_load_key()  # a live change, no reload
    # No ControlNet loaded: the scales have nothing to act on.
    assert (
        Preset(name="c", prompt="x", control_scales=[0.8]).engine_config(EngineConfig()).control
        == ()
    )
    with pytest.raises(ValidationError, match=r"must each be in 0\.\.4"):
        Preset(name="d", prompt="x", control_scales=[5.0])
    with pytest.raises(ValueError, match="no ControlNet has that name or index"):
        Preset(name="e", prompt="x", control_scales={"depth": 1.0}).engine_config(base)
    with pytest.raises(ValueError, match="1 control scales for 2 ControlNets"):
        Preset(name="f", prompt="x", control_scales=[1.0]).engine_config(base)
