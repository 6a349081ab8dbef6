"""The feature bank: pure tensor functions on hand-made tensors, the processor against explicit
SDPA, and the engine-level properties on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from streamv2v import BankConfig, EngineConfig, StreamV2V
from streamv2v.attention import FeatureBankAttnProcessor, install_bank, self_attention_layers
from streamv2v.bank import (
    FeatureBank,
    fuse_features,
    merge_pairs,
    merge_tokens,
    oldest_frame_split,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- merge_tokens
def merge_by_loops(kvo: torch.Tensor, num_src: int, seed: int) -> torch.Tensor:
    """An independent, loop-by-loop reading of Dynamic Merging (same random split)."""
    g, _, t, _ = kvo.shape
    order = torch.rand((g, t), generator=gen(seed)).argsort(dim=-1)
    out = []
    for gi in range(g):
        src, dst = order[gi, :num_src].tolist(), order[gi, num_src:].tolist()
        members = {d: [d] for d in dst}
        for s in src:
            k = F.normalize(kvo[gi, 0], dim=-1)
            best = max(dst, key=lambda d, s=s, k=k: float(k[s] @ k[d]))
            members[best].append(s)
        out.append(torch.stack([kvo[gi, :, members[d]].mean(dim=1) for d in dst], dim=1))
    return torch.stack(out)


def test_merge_takes_2n_tokens_to_n_with_mean_semantics():
    torch.manual_seed(0)
    kvo = torch.randn(3, 3, 8, 5)
    merged = merge_tokens(kvo, 4, gen(11))
    assert merged.shape == (3, 3, 4, 5)
    torch.testing.assert_close(merged, merge_by_loops(kvo, 4, 11))


def test_merge_of_hand_made_pairs_averages_each_pair():
    # Tokens come in pairs with near-identical keys; whichever of a pair is the source, it must
    # merge into its partner, and the result is the pair's mean.
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    keys = torch.cat([base, base + 0.01])  # token i and i+3 are partners
    kvo = torch.stack([keys, keys * 10, keys * 100])[None]  # V, O tied to K
    # Find a seed whose split puts exactly one of each pair in the sources.
    for seed in range(200):
        order = torch.rand((1, 6), generator=gen(seed)).argsort(dim=-1)[0]
        if sorted(i % 3 for i in order[:3].tolist()) == [0, 1, 2]:
            break
    merged = merge_tokens(kvo, 3, gen(seed))[0]
    pair_means = sorted(((keys[:3] + keys[3:]) / 2).tolist())
    torch.testing.assert_close(torch.tensor(sorted(merged[0].tolist())), torch.tensor(pair_means))
    # K, V and O went through the same matching: V = 10 K and O = 100 K still hold.
    torch.testing.assert_close(merged[1], merged[0] * 10)
    torch.testing.assert_close(merged[2], merged[0] * 100)


def test_merge_is_deterministic_under_a_seed():
    kvo = torch.randn(2, 3, 16, 4)
    a = merge_tokens(kvo, 8, gen(5))
    b = merge_tokens(kvo, 8, gen(5))
    c = merge_tokens(kvo, 8, gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_the_stable_split_merges_the_oldest_frame_and_keeps_every_other_place():
    # One banked frame of 3 tokens + the new frame: the bank merges into the new frame.
    src, dst = oldest_frame_split(6, 3, 0, torch.device("cpu"))
    assert src.tolist() == [0, 1, 2] and dst.tolist() == [3, 4, 5]
    # Three banked frames of 2 tokens (ring position 1 is the oldest) + the new frame: frames 0
    # and 2 stay where they are, the new frame (tokens 6, 7) takes position 1's place.
    src, dst = oldest_frame_split(8, 2, 1, torch.device("cpu"))
    assert src.tolist() == [2, 3]
    assert dst.tolist() == [0, 1, 6, 7, 4, 5]


def test_stable_merge_averages_matches_and_forgets_tokens_below_the_threshold():
    keys = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # old 0: the same content as new 0
            [0.0, 1.0, 0.1],  # old 1: close to new 1 (cosine 0.995)
            [0.0, 0.0, 1.0],  # old 2: like nothing in the new frame (best cosine 0.0)
            [1.0, 0.0, 0.0],  # new 0
            [0.0, 1.0, 0.0],  # new 1
            [0.5, 0.0, -0.1],  # new 2: no old token has it as its best match
        ]
    )
    kvo = torch.stack([keys, keys * 10, keys * 100])[None]
    src, dst = oldest_frame_split(6, 3, 0, torch.device("cpu"))
    merged = merge_pairs(kvo, src[None], dst[None], threshold=0.9)[0]
    torch.testing.assert_close(merged[0, 0], (keys[0] + keys[3]) / 2)
    torch.testing.assert_close(merged[0, 1], (keys[1] + keys[4]) / 2)
    torch.testing.assert_close(merged[0, 2], keys[5])  # old 2 matched nothing: forgotten
    torch.testing.assert_close(merged[1:], torch.stack([merged[0] * 10, merged[0] * 100]))
    # Without a threshold old 2 is averaged into its best match, whatever it is.
    unmasked = merge_pairs(kvo, src[None], dst[None])[0]
    assert not torch.allclose(unmasked[0], merged[0])


# --------------------------------------------------------------------------- fuse_features
def test_fusion_blends_above_threshold_with_the_exact_strength_and_leaves_the_rest():
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    bank = torch.tensor([[[2.0, 0.0], [1.0, -1.0]]])  # token 0 matches bank 0 at cosine 1
    fused, mask = fuse_features(out, bank, threshold=0.98, strength=0.8)
    assert mask.tolist() == [[True, False, False]]
    torch.testing.assert_close(fused[0, 0], 0.2 * out[0, 0] + 0.8 * bank[0, 0])
    assert torch.equal(fused[0, 1:], out[0, 1:])  # bitwise untouched
    fused_low, mask_low = fuse_features(out, bank, threshold=0.5, strength=0.3)
    # token 2 ([1, 1]) has cosine 0.707 with bank 0: fused at threshold 0.5, to bank 0
    assert mask_low.tolist() == [[True, False, True]]
    torch.testing.assert_close(fused_low[0, 2], 0.7 * out[0, 2] + 0.3 * bank[0, 0])


# --------------------------------------------------------------------------- the processor
def attention_module(dim: int = 8, heads: int = 2) -> Attention:
    torch.manual_seed(1)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()


def explicit_extended_attention(attn: Attention, x: torch.Tensor, bank_x: torch.Tensor | None):
    """EA by the book: K/V of the frame concatenated with the bank's (each banked frame once),
    then SDPA at the layer's own scale, then to_out."""
    q = attn.to_q(x)
    ctx = x if bank_x is None else torch.cat([x, bank_x], dim=1)
    k, v = attn.to_k(ctx), attn.to_v(ctx)
    b, heads = x.shape[0], attn.heads

    def split(t):
        return t.view(b, t.shape[1], heads, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
    o = o.transpose(1, 2).reshape(b, x.shape[1], -1)
    return attn.to_out[1](attn.to_out[0](o))


@torch.inference_mode()
def test_extended_attention_empty_bank_is_plain_then_attends_over_bank_and_frame():
    attn = attention_module()
    cfg = BankConfig(feature_fusion=False, interval=1)
    bank = FeatureBank(cfg, slots=2, seed=0, device=torch.device("cpu"))
    proc = FeatureBankAttnProcessor(bank, "attn1", fusion=False)
    x1, x2 = torch.randn(2, 6, 8), torch.randn(2, 6, 8)

    bank.begin_frame(0)
    bank.begin_call(slice(0, 2), fill_rows=(0, 1))
    first = proc(attn, x1)
    bank.end_frame()
    torch.testing.assert_close(first, AttnProcessor2_0()(attn, x1), atol=1e-6, rtol=1e-5)

    bank.begin_frame(1)
    bank.begin_call(slice(0, 2), fill_rows=())
    second = proc(attn, x2)
    torch.testing.assert_close(second, explicit_extended_attention(attn, x2, x1))
    assert not torch.allclose(second, AttnProcessor2_0()(attn, x2), atol=1e-4)


@torch.inference_mode()
def test_the_layers_own_attention_scale_is_used():
    torch.manual_seed(2)
    attn = Attention(query_dim=8, heads=2, dim_head=4, scale_qk=False).eval()  # scale 1, not 1/2
    bank = FeatureBank(
        BankConfig(feature_fusion=False), slots=1, seed=0, device=torch.device("cpu")
    )
    proc = FeatureBankAttnProcessor(bank, "attn1", fusion=False)
    x = torch.randn(1, 6, 8) * 3
    bank.begin_frame(0)
    bank.begin_call(slice(0, 1), fill_rows=(0,))
    got = proc(attn, x)
    torch.testing.assert_close(got, explicit_extended_attention(attn, x, None))
    # diffusers' own SDPA processor ignores attn.scale: the two really differ here
    assert not torch.allclose(got, AttnProcessor2_0()(attn, x), atol=1e-3)


@torch.inference_mode()
def test_a_fifo_bank_counts_each_real_frame_once_while_it_fills():
    """A 3-frame FIFO starts as 3 copies of its first frame; until real frames replace them,
    EA must weigh the copies as the one frame they are."""
    attn = attention_module()
    cfg = BankConfig(feature_fusion=False, mode="fifo", max_frames=3, interval=1)
    bank = FeatureBank(cfg, slots=1, seed=0, device=torch.device("cpu"))
    proc = FeatureBankAttnProcessor(bank, "attn1", fusion=False)
    xs = [torch.randn(1, 6, 8) for _ in range(5)]
    outs = []
    for i, x in enumerate(xs):
        bank.begin_frame(i)
        bank.begin_call(slice(0, 1), fill_rows=(0,) if i == 0 else ())
        bank.call.store_out = True
        outs.append(proc(attn, x))
        bank.end_frame()
    # frame 1 sees frame 0 once; frame 2 sees frames 1 and 0; frame 3 sees 2, 1, 0; frame 4 sees
    # 3, 2, 1 (frame 0 has left the ring)
    cat = torch.cat
    torch.testing.assert_close(outs[1], explicit_extended_attention(attn, xs[1], xs[0]))
    torch.testing.assert_close(outs[2], explicit_extended_attention(attn, xs[2], cat(xs[:2], 1)))
    torch.testing.assert_close(outs[3], explicit_extended_attention(attn, xs[3], cat(xs[:3], 1)))
    torch.testing.assert_close(outs[4], explicit_extended_attention(attn, xs[4], cat(xs[1:4], 1)))
    three_copies = explicit_extended_attention(attn, xs[1], cat([xs[0]] * 3, 1))
    assert not torch.allclose(outs[1], three_copies, atol=1e-4)  # what the unweighted bank gave


@torch.inference_mode()
def test_each_stream_slot_only_sees_its_own_bank():
    attn = attention_module()
    bank = FeatureBank(
        BankConfig(feature_fusion=False), slots=2, seed=0, device=torch.device("cpu")
    )
    proc = FeatureBankAttnProcessor(bank, "attn1", fusion=False)
    x1, x2 = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    bank.begin_frame(0)
    bank.begin_call(slice(0, 2), fill_rows=(0, 1))
    proc(attn, x1)
    bank.end_frame()
    bank.begin_frame(1)
    bank.begin_call(slice(1, 2), fill_rows=())  # a call for slot 1 alone
    out = proc(attn, x2[1:])
    torch.testing.assert_close(out, explicit_extended_attention(attn, x2[1:], x1[1:]))


def test_installs_on_self_attention_only_and_fuses_in_the_reference_layers(tiny_model):
    engine = StreamV2V.from_pretrained(tiny_model, config=EngineConfig(vae="model", steps=1))
    procs = engine.unet.attn_processors
    attn1 = set(self_attention_layers(engine.unet))
    assert attn1 and all(
        isinstance(procs[f"{n}.processor"], FeatureBankAttnProcessor) for n in attn1
    )
    others = [p for k, p in procs.items() if k.removesuffix(".processor") not in attn1]
    assert others and all(isinstance(p, AttnProcessor2_0) for p in others)
    assert sorted(engine.fusion_layers) == sorted(
        n for n in attn1 if "mid_block" in n or "up_blocks.1" in n
    )
    assert install_bank(engine.unet, None) == []
    assert all(isinstance(p, AttnProcessor2_0) for p in engine.unet.attn_processors.values())


# --------------------------------------------------------------------------- on the tiny model
def engine_for(model, bank: dict | None = None, **cfg) -> StreamV2V:
    size = {"width": 128, "height": 128}
    config = EngineConfig(vae="model", bank=BankConfig(**(bank or {})), **{**size, **cfg})
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu")
    engine.set_prompt("the cat")
    return engine


def test_identical_inputs_give_the_bank_off_output_on_the_second_call(tiny_model, frames):
    on = engine_for(tiny_model, steps=1, stream_batch=False)
    off = engine_for(tiny_model, {"enabled": False}, steps=1, stream_batch=False)
    on(frames[0])
    off(frames[0])
    a = on(frames[0], output_type="latent")
    b = off(frames[0], output_type="latent")
    assert (a - b).abs().max().item() <= 1e-5
    assert on.stats()["fused_fraction"] == pytest.approx(1.0)  # every token matched its copy


def test_bank_off_output_is_independent_of_history_bank_on_is_not(tiny_model, frames):
    def last_of(bank, history):
        engine = engine_for(tiny_model, bank, steps=1, stream_batch=False)
        for f in history:
            engine(f)
        return engine(frames[5], output_type="latent")

    off = {"enabled": False}
    assert torch.equal(last_of(off, frames[:3]), last_of(off, []))
    assert (last_of(None, frames[:3]) - last_of(None, [])).abs().max().item() > 1e-4


def test_same_seed_same_output_across_merges_other_seed_differs(tiny_model, frames):
    def run(seed):
        engine = engine_for(tiny_model, {"interval": 2}, steps=2, seed=seed)
        return [engine(f, output_type="latent") for f in frames * 2][-1]

    a, b = run(3), run(3)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(4))


def test_reset_empties_the_bank(tiny_model, frames):
    used = engine_for(tiny_model, {"interval": 1}, steps=2)
    for f in frames:
        used(f)
    used.reset()
    fresh = engine_for(tiny_model, {"interval": 1}, steps=2)
    got = [used(f, output_type="latent") for f in frames[:3]]
    want = [fresh(f, output_type="latent") for f in frames[:3]]
    assert got[0] is None and want[0] is None
    assert all(torch.equal(g, w) for g, w in zip(got[1:], want[1:]))


def test_reset_bank_mid_stream_refills_from_the_next_frame_without_a_warm_up(tiny_model, frames):
    # Sequential, one step: a frame's output depends only on the frame, the fixed noise and the
    # bank, so after reset_bank() it must equal a fresh engine's first output of that frame.
    used = engine_for(tiny_model, {"interval": 1}, steps=1, stream_batch=False)
    for f in frames[:5]:
        used(f)
    kept = used(frames[5], output_type="latent")
    used.reset_bank()
    refilled = used(frames[5], output_type="latent")
    fresh = engine_for(tiny_model, {"interval": 1}, steps=1, stream_batch=False)
    want = fresh(frames[5], output_type="latent")
    assert refilled is not None  # no warm-up after a bank reset
    assert (refilled - want).abs().max().item() <= 1e-5
    assert (kept - want).abs().max().item() > 1e-4  # the history mattered before the reset


@pytest.mark.parametrize(
    ("mode", "max_frames"), [("dyme", 1), ("fifo", 3), ("dyme", 2), ("stable", 1), ("stable", 3)]
)
def test_bank_size_is_constant_after_the_first_frame(tiny_model, frames, mode, max_frames):
    bank = {"mode": mode, "max_frames": max_frames, "merge_ratio": 1 / (max_frames + 1)}
    engine = engine_for(tiny_model, {**bank, "interval": 1}, steps=2)
    engine(frames[0])
    first = engine.stats()
    tokens = first["bank_tokens_per_layer"]
    # the tiny UNet's self-attention at 128 px: 4x4 tokens (down/up) and 2x2 (mid)
    assert sorted(set(tokens.values())) == [4 * max_frames, 16 * max_frames]
    for f in frames * 2:
        engine(f)
    later = engine.stats()
    assert later["bank_bytes"] == first["bank_bytes"] > 0
    assert later["bank_tokens_per_layer"] == tokens
    assert 0.0 <= later["fused_fraction"] <= 1.0


def test_stats_report_frames_and_a_fused_fraction(tiny_model, frames):
    engine = engine_for(tiny_model, {"fusion_threshold": -1.0}, steps=1)
    for f in frames[:3]:
        engine(f)
    stats = engine.stats()
    assert stats["frames"] == 3 and stats["bank_enabled"]
    assert stats["fused_fraction"] == 1.0  # threshold -1: every token fuses
    no_ff = engine_for(tiny_model, {"feature_fusion": False}, steps=1)
    no_ff(frames[0])
    assert no_ff.stats()["fused_fraction"] is None


def test_sd2_style_unet_with_linear_projections_and_v_prediction_works(tiny_model, frames):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from streamv2v.loading import load_components

    parts = load_components(
        tiny_model, vae="model", device=torch.device("cpu"), dtype=torch.float32
    )
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ).eval()
    parts["scheduler"] = LCMScheduler.from_config(
        parts["scheduler"].config, prediction_type="v_prediction"
    )
    cfg = EngineConfig(vae="model", width=64, height=64, steps=1, strength=1.0)
    engine = StreamV2V(**parts, config=cfg)
    assert engine.fusion_layers  # mid_block and up_blocks.1 exist here too
    outs = [engine(f) for f in frames[:3]]
    assert all(o.shape == (64, 64, 3) for o in outs)
    assert not np.array_equal(outs[1], outs[2])


@pytest.mark.usefixtures("one_torch_thread")
def test_memory_stays_flat_over_a_thousand_frames(tiny_model, frames):
    import gc

    import psutil

    engine = engine_for(tiny_model, steps=2, width=64, height=64)
    proc = psutil.Process()
    sizes, rss = set(), {}
    for i in range(1, 1001):
        engine(frames[i % len(frames)])
        if i >= 2:
            sizes.add(engine.stats()["bank_bytes"])
        if i in (100, 1000):
            gc.collect()
            rss[i] = proc.memory_info().rss
    assert len(sizes) == 1 and sizes.pop() > 0
    assert abs(rss[1000] - rss[100]) <= 0.02 * rss[100], rss


# --------------------------------------------------------------------------- every device
def merge_by_segment_reduce(kvo, src_idx, dst_idx, threshold=None):
    """The merge as it was written before (sorted tokens, ``torch.segment_reduce``: CPU and
    CUDA kernels only), kept as the reference the device-neutral merge must equal bit for bit."""
    g, _, t, c = kvo.shape
    m = dst_idx.shape[-1]
    keys = F.normalize(kvo[:, 0].float(), dim=-1)
    src_keys = keys.gather(1, src_idx[..., None].expand(-1, -1, c))
    dst_keys = keys.gather(1, dst_idx[..., None].expand(-1, -1, c))
    best, match = (src_keys @ dst_keys.transpose(1, 2)).max(dim=-1)
    if threshold is not None:
        match = torch.where(best >= threshold, match, m)
    target = torch.empty((g, t), dtype=torch.long)
    target.scatter_(1, dst_idx, torch.arange(m).expand(g, m))
    target.scatter_(1, src_idx, match)
    counts = torch.zeros((g, m + 1), dtype=torch.long).scatter_add_(
        1, target, torch.ones_like(target)
    )
    by_target = target.sort(dim=1, stable=True).indices
    tokens = kvo.transpose(1, 2).gather(1, by_target[..., None, None].expand(-1, -1, 3, c))
    mean = torch.segment_reduce(
        tokens.reshape(g * t, 3 * c).float(), "mean", lengths=counts.flatten(), axis=0
    )
    return mean.view(g, m + 1, 3, c)[:, :m].transpose(1, 2).to(kvo.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_merge_equals_the_segment_reduce_merge_bit_for_bit(dtype):
    """The merge runs on MPS now (no segment_reduce) and gives the very same bits on the CPU:
    random splits, the stable split with and without a threshold, and a flat region where
    hundreds of sources land on one destination (float16 sums that would overflow)."""
    torch.manual_seed(3)
    cases = []
    kvo = (torch.randn(6, 3, 96, 16) * 4).to(dtype)
    cases.append((kvo, *merge_split(6, 96, 48), None))
    src, dst = oldest_frame_split(96, 32, 1, torch.device("cpu"))
    cases.append((kvo, src.expand(6, -1), dst.expand(6, -1), None))
    cases.append((kvo, src.expand(6, -1), dst.expand(6, -1), 0.2))
    flat = torch.full((2, 3, 600, 8), 200.0).to(dtype)  # one key everywhere: one destination wins
    flat[:, :, :, 0] += torch.linspace(0, 1, 600).to(dtype)
    cases.append((flat, *merge_split(2, 600, 500), None))
    for kvo, src, dst, threshold in cases:
        got = merge_pairs(kvo, src, dst, threshold)
        want = merge_by_segment_reduce(kvo, src, dst, threshold)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert torch.equal(got, want)


def merge_split(groups: int, total: int, num_src: int):
    order = torch.rand((groups, total), generator=gen(7)).argsort(dim=-1)
    return order[:, :num_src], order[:, num_src:]
