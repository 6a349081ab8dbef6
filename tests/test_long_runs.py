"""States carried from frame to frame, over hundreds of frames and in float16: residual CFG's
stock noise, stream batch against sequential denoising, Dynamic Merging's precision, and the
similar-image filter on slow motion. Short runs never see these fail (NaN by frame 15 in float16
before the residual-CFG fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from long_run_helpers import encode_each_image_once, moving_clip, texture

from streamv2v import BankConfig, EngineConfig, StreamV2V
from streamv2v.bank import merge_tokens
from streamv2v.stream import StreamSchedule, update_stock_noise

GUIDANCE = ("none", "self", "initialize", "full")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(model, dtype=torch.float32, **cfg) -> StreamV2V:
    config = EngineConfig(vae="model", width=64, height=64, **cfg)
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu", dtype=dtype)
    engine.set_prompt("the cat and the dog", negative_prompt="a blurry photo")
    return engine


# ------------------------------------------------------------------------- residual CFG
def test_residual_cfg_update_matches_a_hand_computed_two_slot_case():
    """est_i = (x_coef_i * beta_i * stock_i + pred_coef_i * guided_i) * next_ratio_i
    + next_noise_i, with the numbers worked out by hand."""

    def col(*v):
        return torch.tensor(v, dtype=torch.float64).view(-1, 1, 1, 1)

    sched = StreamSchedule(
        timesteps=torch.tensor([10, 20]),
        alpha=col(0.6, 0.8),
        beta=col(0.8, 0.6),
        x_coef=col(1.5, 1.25),
        pred_coef=col(-2.0, -0.75),
        next_ratio=col(0.8 / 0.6, 1.0),
    )
    stock, guided, next_noise = col(1.0, 2.0), col(0.5, -1.0), col(0.1, -0.2)
    est = update_stock_noise(stock, guided, sched, slice(0, 2), next_noise)
    # slot 0: (1.5*0.8*1.0 - 2.0*0.5) * 4/3 + 0.1 = 0.2*4/3 + 0.1
    # slot 1: (1.25*0.6*2.0 + 0.75*1.0) * 1 - 0.2 = 2.05
    torch.testing.assert_close(est.flatten(), torch.tensor([0.2 * 4 / 3 + 0.1, 2.05]).double())


@torch.inference_mode()
def test_engine_moves_each_stock_estimate_one_slot_on_with_its_frame(tiny_model):
    """k=2, "self": after a call slot 1 holds the estimate slot 0 made for its frame, slot 0 the
    fixed noise; the next call's slot-1 prediction is guided by exactly that estimate."""
    engine = make_engine(
        tiny_model, steps=2, guidance="self", guidance_scale=1.5, bank={"enabled": False}
    )
    s, delta, scale = engine._schedule, engine.config.guidance_delta, 1.5
    seen: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        seen["x"] = args[0].clone()

    def post(_m, _a, _kw, out):
        seen["out"] = out[0].clone()

    engine.unet.register_forward_pre_hook(pre, with_kwargs=True)
    engine.unet.register_forward_hook(post, with_kwargs=True)
    frames = moving_clip(3)
    engine(frames[0], output_type="latent")
    stock0 = engine._noise[0:1].clone()  # what slot 0 used
    cond0 = seen["out"][0:1]
    guided0 = stock0 * delta + scale * (cond0 - stock0 * delta)
    b0, r0 = s.beta[0], s.next_ratio[0]
    want = (s.x_coef[0] * b0 * stock0 + s.pred_coef[0] * guided0) * r0 + engine._noise[1:2]
    torch.testing.assert_close(engine._stock[1:2], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine._stock[0:1], engine._noise[0:1])

    latent = engine(frames[1], output_type="latent")  # slot 1 now holds frame 0
    cond1, x1 = seen["out"][1:2], seen["x"][1:2]
    guided1 = want * delta + scale * (cond1 - want * delta)
    x0 = s.x_coef[1] * x1 + s.pred_coef[1] * guided1
    torch.testing.assert_close(latent, x0, atol=1e-5, rtol=1e-5)


def long_run_cases() -> list:
    """Every guidance mode x stream batch/sequential in float32; in float16 (where the CPU runs
    convolutions ~15x slower: 500 frames cost ~80 s) each state that is carried: the bank under
    full guidance in stream batch, the mode the daemon runs (guidance "none" with the bank: the
    500-frame float16 ControlNet run, tests/test_controlnet.py), residual CFG's stock noise
    under "self" in stream batch and under "initialize" sequentially, where the stock moves
    step by step (the same update code as in stream batch)."""
    cases = []
    for guidance in GUIDANCE:
        for stream_batch in (True, False):
            mode = "stream" if stream_batch else "sequential"
            cases.append(
                pytest.param(guidance, stream_batch, torch.float32, id=f"{guidance}-{mode}-fp32")
            )
            if (guidance, stream_batch) in (("full", True), ("self", True), ("initialize", False)):
                cases.append(
                    pytest.param(
                        guidance, stream_batch, torch.float16, id=f"{guidance}-{mode}-fp16"
                    )
                )
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("guidance", "stream_batch", "dtype"), long_run_cases())
def test_five_hundred_frames_stay_finite_bounded_and_follow_the_input(
    tiny_model, guidance, stream_batch, dtype
):
    # The state carried from frame to frame: residual CFG's stock noise (bank off, to see it
    # alone), or else the (default) feature bank.
    cfg = {"steps": 2, "guidance": guidance, "guidance_scale": 1.2, "stream_batch": stream_batch}
    cfg["bank"] = {"enabled": guidance not in ("self", "initialize")}
    engine = make_engine(tiny_model, dtype, **cfg)
    clip = moving_clip(500, period=50)  # 50 distinct frames, each encoded once (see the helper)
    encoded = encode_each_image_once(engine)
    peak = 0.0
    for f in clip:
        x = engine(f, output_type="latent")
        if x is not None:
            peak = max(peak, x.abs().max().item())
    assert len(encoded) == 50
    assert torch.isfinite(engine._stock).all() and engine._stock.abs().max().item() < 50
    assert np.isfinite(peak) and peak < 20, f"latents reached {peak}"
    # Still following the input: two different inputs give outputs as far apart as they do on a
    # fresh stream (a diverged stream gives one constant frame whatever comes in).
    a, b = clip[0], 255 - clip[0]

    def response(e: StreamV2V) -> float:
        xa = [e(a, output_type="latent") for _ in range(3)][-1]
        xb = [e(b, output_type="latent") for _ in range(3)][-1]
        return (xa.float() - xb.float()).abs().mean().item()

    fresh = make_engine(tiny_model, dtype, **cfg)
    assert response(engine) > 0.5 * response(fresh) > 0
    out = engine(a)
    assert out.dtype == np.uint8 and out.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_stream_batch_equals_sequential_for_every_guidance_mode(tiny_model, guidance, k):
    cfg = {"steps": k, "guidance": guidance, "guidance_scale": 1.5, "bank": {"enabled": False}}
    batched = make_engine(tiny_model, stream_batch=True, **cfg)
    sequential = make_engine(tiny_model, stream_batch=False, **cfg)
    clip = moving_clip(100 + k - 1)
    want = [sequential(f, output_type="latent") for f in clip[:100]]
    got = [batched(f, output_type="latent") for f in clip][k - 1 :]
    worst = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert worst <= 1e-4, f"stream batch differs from sequential by {worst}"
    assert (want[0] - want[50]).abs().max().item() > 1e-3  # not vacuous


# ------------------------------------------------------------------------- Dynamic Merging
def test_merge_is_bit_reproducible_under_a_seed_in_float16():
    kvo = torch.randn(6, 3, 512, 16).half()
    a = merge_tokens(kvo, 256, torch.Generator().manual_seed(4))
    b = merge_tokens(kvo, 256, torch.Generator().manual_seed(4))
    assert a.dtype == torch.float16 and torch.equal(a, b)
    assert not torch.equal(a, merge_tokens(kvo, 256, torch.Generator().manual_seed(5)))


def test_merge_of_thousands_of_identical_tokens_is_finite_and_exact_in_float16():
    """A flat image region: 8192 equal tokens, so thousands of sources land on few destinations.
    Summed in float16 this overflows (4096 x 100 > 65504) and counts past 2048 are inexact."""
    kvo = torch.full((2, 3, 8192, 8), 100.0, dtype=torch.float16)
    kvo[1] = -37.25
    out = merge_tokens(kvo, 4096, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4096, 8) and torch.isfinite(out).all()
    assert torch.equal(out[0], torch.full_like(out[0], 100.0))
    assert torch.equal(out[1], torch.full_like(out[1], -37.25))


@pytest.mark.parametrize("mode", ["dyme", "stable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_three_hundred_frames_of_merging_banks_stay_finite(tiny_model, dtype, mode):
    """Many merges in a row (interval 1) on a flat-ish scene, in both precisions."""
    engine = make_engine(tiny_model, dtype, steps=2, bank=BankConfig(mode=mode, interval=1))
    encode_each_image_once(engine)
    flat = np.full((96, 96, 3), 120, np.uint8)
    clip = [flat] * 150 + moving_clip(150, period=50)
    for f in clip:
        x = engine(f, output_type="latent")
    assert torch.isfinite(x).all()
    for group in engine.bank._groups:
        assert torch.isfinite(group.storage).all()


# ------------------------------------------------------------------------- similar-image filter
def longest_skip_run(engine: StreamV2V, clip: list[np.ndarray]) -> tuple[int, int]:
    calls = {"n": 0}
    engine.unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    run = longest = skipped = 0
    for f in clip:
        before = calls["n"]
        engine(f)
        if calls["n"] == before:
            run, skipped = run + 1, skipped + 1
            longest = max(longest, run)
        else:
            run = 0
    return longest, skipped


@pytest.mark.parametrize("rule", ["probabilistic", "threshold"])
def test_similar_filter_follows_slow_drift(tiny_model, rule):
    """A texture drifting 1 px a frame: each frame is >= 0.99 similar to the one before, so a
    filter comparing with the previous input skips up to max_skip frames in a row; compared
    with the last processed frame the drift adds up and the output never freezes for long."""
    tex = texture(96, 400, blur=8)
    clip = [np.ascontiguousarray(tex[:, i : i + 96]) for i in range(200)]
    engine = make_engine(
        tiny_model, steps=1, similar_filter=True, similar_max_skip=10, similar_skip=rule
    )
    longest, skipped = longest_skip_run(engine, clip)
    assert skipped >= 20, "the filter never skipped: the test would not see a freeze"
    assert longest <= 3, f"output frozen for {longest} frames in a row on slow drift"


def test_similar_filter_skips_a_static_scene_reproducibly(tiny_model):
    still = [texture(96, 96, blur=8)] * 60

    def pattern():
        engine = make_engine(tiny_model, steps=1, similar_filter=True, similar_max_skip=5)
        return longest_skip_run(engine, still)

    assert pattern() == pattern() == (5, 50)  # identical frames: skip 5, process 1, ...
