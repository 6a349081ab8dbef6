"""The engine on the tiny model, loaded through from_pretrained from a real folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamv2v import EngineConfig, ModelLoadError, StreamV2V, UnsafeWeightsError
from streamv2v.testing import save_tiny_model

SIZE = {"width": 128, "height": 128}


def make_engine(model, dtype=None, **cfg) -> StreamV2V:
    config = EngineConfig(vae="model", **{**SIZE, **cfg})
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu", dtype=dtype)
    engine.set_prompt("the cat and the dog")
    return engine


class CallCounter:
    """Counts forward calls of a real module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_stream_batch_output_equals_sequential_denoising_of_the_same_frame(tiny_model, frames):
    k = 3
    off = {"enabled": False}  # the bank's update timing differs between the modes by design
    batched = make_engine(tiny_model, steps=k, stream_batch=True, bank=off)
    sequential = make_engine(tiny_model, steps=k, stream_batch=False, bank=off)
    got = [batched(f, output_type="latent") for f in frames]
    want = [sequential(f, output_type="latent") for f in frames]
    assert got[: k - 1] == [None] * (k - 1)
    assert all(w is not None for w in want)
    for t in range(len(frames) - (k - 1)):
        # The stream-batch output of call t+k-1 is frame t, fully denoised.
        diff = (got[t + k - 1] - want[t]).abs().max().item()
        assert diff <= 1e-4, f"frame {t}: max abs latent difference {diff}"
    # The outputs really differ between frames (the check above is not vacuous).
    assert (want[0] - want[1]).abs().max().item() > 1e-2


def test_first_k_minus_1_calls_after_reset_return_none(tiny_model, frames):
    engine = make_engine(tiny_model, steps=4, stream_batch=True)
    assert engine.latency_frames == 3
    for _ in range(2):
        outs = [engine(f) for f in frames[:5]]
        assert outs[:3] == [None, None, None]
        assert all(isinstance(o, np.ndarray) for o in outs[3:])
        engine.reset()


def test_output_is_uint8_rgb_at_the_working_size_for_any_input_size(tiny_model):
    engine = make_engine(tiny_model, steps=1, width=96, height=64)
    for shape in [(480, 640, 3), (640, 480, 3), (64, 96, 3), (37, 53, 3), (50, 50, 4)]:
        out = engine(np.full(shape, 128, np.uint8))
        assert out.shape == (64, 96, 3) and out.dtype == np.uint8


def test_bad_frames_are_rejected_with_the_shape_named(tiny_model):
    engine = make_engine(tiny_model, steps=1)
    with pytest.raises(ValueError, match=r"HxWx3 uint8.*\(4, 4\)"):
        engine(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        engine(np.zeros((4, 4, 3), np.float32))


def test_same_seed_same_output_other_seed_other_output(tiny_model, frames):
    def run(seed):
        engine = make_engine(tiny_model, steps=2, seed=seed)
        return [engine(f) for f in frames[:4]][1:]

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, z) for x, z in zip(a, c))


def test_tensor_input_gives_the_numpy_result_and_pt_output_stays_on_device(tiny_model, frames):
    a = make_engine(tiny_model, steps=1)
    b = make_engine(tiny_model, steps=1)
    out_np = a(frames[0])
    out_pt = b(torch.from_numpy(frames[0]), output_type="pt")
    assert isinstance(out_pt, torch.Tensor) and out_pt.device == b.device
    assert np.array_equal(out_np, out_pt.numpy())


def test_prompt_is_encoded_once_never_per_frame(tiny_model, frames):
    engine = make_engine(tiny_model, steps=2)
    counter = CallCounter(engine.text_encoder)
    for f in frames:
        engine(f)
    assert counter.calls == 0
    engine.set_prompt("another prompt")
    assert counter.calls == 2  # prompt and negative prompt, once each
    for f in frames:
        engine(f)
    assert counter.calls == 2


def test_a_new_prompt_changes_the_output_without_a_new_warm_up(tiny_model, frames):
    engine = make_engine(tiny_model, steps=2)
    first = [engine(frames[0]) for _ in range(3)][-1]
    engine.set_prompt("a different prompt and the end")
    after = engine(frames[0])
    assert after is not None, "a prompt switch must not restart the warm-up"
    later = engine(frames[0])
    assert not np.array_equal(first, later)


def test_float16_engine_runs_end_to_end_on_the_cpu(tiny_model, frames):
    # Catches dtype mix-ups (float32 buffers meeting float16 weights) that would only show on a GPU.
    # At 64x64: a float16 convolution takes torch's slow reference path on this CPU (128x128
    # cost 16 s here for what 64x64 shows as well).
    for guidance in ("none", "self", "initialize", "full"):
        engine = make_engine(
            tiny_model,
            dtype=torch.float16,
            steps=2,
            guidance=guidance,
            similar_filter=True,
            width=64,
            height=64,
        )
        assert engine.dtype == torch.float16
        latent = [engine(f, output_type="latent") for f in frames[:3]][-1]
        assert latent.dtype == torch.float16 and torch.isfinite(latent).all()
        out = engine(frames[3])
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("stream_batch", [True, False])
def test_guidance_modes_change_the_output_and_scale_one_is_a_no_op(
    tiny_model, frames, stream_batch
):
    def last(**cfg):
        engine = make_engine(tiny_model, steps=2, stream_batch=stream_batch, **cfg)
        return [engine(f, output_type="latent") for f in frames[:4]][-1]

    plain = last()
    for mode in ("self", "initialize", "full"):
        guided = last(guidance=mode, guidance_scale=1.5)
        assert (guided - plain).abs().max().item() > 1e-3, mode
    full_at_one = last(guidance="full", guidance_scale=1.0)
    assert torch.allclose(full_at_one, plain, atol=1e-5)


def test_full_guidance_uses_the_negative_prompt(tiny_model, frames):
    engine = make_engine(tiny_model, steps=1, guidance="full", guidance_scale=2.0)
    a = engine(frames[0], output_type="latent")
    engine.set_prompt("the cat and the dog", negative_prompt="the end")
    b = engine(frames[0], output_type="latent")
    assert (a - b).abs().max().item() > 1e-3
    # set before the guidance mode used it, the negative prompt still applies after a switch
    plain = make_engine(tiny_model, steps=1)
    plain.set_prompt("the cat and the dog", negative_prompt="the end")
    plain.set_config(plain.config.model_copy(update={"guidance": "full", "guidance_scale": 2.0}))
    fresh = make_engine(tiny_model, steps=1, guidance="full", guidance_scale=2.0)
    fresh.set_prompt("the cat and the dog", negative_prompt="the end")
    c = plain(frames[0], output_type="latent")
    assert torch.allclose(fresh(frames[0], output_type="latent"), c, atol=1e-6)


def test_similar_image_filter_skips_the_unet_for_a_bounded_run(tiny_model, frames):
    engine = make_engine(tiny_model, steps=1, similar_filter=True, similar_max_skip=3)
    counter = CallCounter(engine.unet)
    outs = [engine(frames[0]) for _ in range(6)]
    # call 1 runs, calls 2-4 are skipped (max 3 in a row), call 5 runs, call 6 is skipped
    assert counter.calls == 2
    assert all(np.array_equal(outs[0], o) for o in outs[1:4])
    engine(frames[1])
    assert counter.calls == 3


def test_similar_image_filter_never_repeats_a_frame_of_the_previous_prompt(tiny_model, frames):
    engine = make_engine(tiny_model, steps=1, similar_filter=True, similar_max_skip=100)
    old = engine(frames[0])
    engine(frames[0])  # skipped: the scene is static
    engine.set_prompt_embeds(*engine_embeds(engine, "a completely different prompt"))
    new = engine(frames[0])  # same static scene, but the prompt changed: must be recomputed
    assert not np.array_equal(old, new)


def engine_embeds(engine: StreamV2V, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return engine.encode_prompt(prompt), engine.encode_prompt("")


def test_set_config_changes_steps_without_reloading(tiny_model, frames):
    engine = make_engine(tiny_model, steps=2)
    unet = engine.unet
    engine.set_config(engine.config.model_copy(update={"steps": 3}))
    assert engine.unet is unet and engine.latency_frames == 2
    assert [engine(f) is None for f in frames[:3]] == [True, True, False]
    with pytest.raises(ValueError, match="vae"):
        engine.set_config(engine.config.model_copy(update={"vae": "other"}))


def test_output_tag_follows_its_frame_through_the_stream(tiny_model, frames):
    engine = make_engine(tiny_model, steps=3)
    tags = []
    for i, f in enumerate(frames):
        if engine(f, tag=i) is not None:
            tags.append(engine.output_tag)
    assert tags == [0, 1, 2, 3]


def test_loads_offline_from_a_local_folder(tiny_model, monkeypatch, frames):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = make_engine(tiny_model, steps=1)
    assert engine(frames[0]).shape == (128, 128, 3)


def test_pickle_only_weights_are_refused_unless_opted_in(tmp_path, frames):
    folder = save_tiny_model(tmp_path / "pickled", safe_serialization=False)
    assert list(folder.glob("unet/*.bin")) and not list(folder.glob("unet/*.safetensors"))
    with pytest.raises(UnsafeWeightsError, match="allow_pickle") as err:
        StreamV2V.from_pretrained(folder, config=EngineConfig(vae="model"), device="cpu")
    assert str(folder) in str(err.value)
    engine = StreamV2V.from_pretrained(
        folder, config=EngineConfig(vae="model", **SIZE, steps=1), device="cpu", allow_pickle=True
    )
    assert engine(frames[0]).shape == (128, 128, 3)


def test_missing_model_is_one_clear_error_naming_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        StreamV2V.from_pretrained("someone/not-a-real-model", config=EngineConfig(vae="model"))
    msg = str(err.value)
    assert "someone/not-a-real-model" in msg and "streamv2v models pull" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match="complete diffusers folder"):
        StreamV2V.from_pretrained(tmp_path, config=EngineConfig(vae="model"))
    with pytest.raises(ModelLoadError, match=r"folder not found: \./no-model-here"):
        StreamV2V.from_pretrained("./no-model-here", config=EngineConfig(vae="model"))


def test_missing_vae_names_the_vae(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="madebyollin/taesd"):
        StreamV2V.from_pretrained(tiny_model, config=EngineConfig())


def save_tiny_lora(model_dir, out_dir):
    """A random LoRA for the tiny UNet, saved the way diffusers saves LoRAs (safetensors)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(3)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers)
    return out_dir


def test_lora_is_fused_into_the_unet_at_its_scale(tiny_model, tmp_path, frames):
    from streamv2v import LoraSpec

    lora = save_tiny_lora(tiny_model, tmp_path / "lora")
    assert list(lora.glob("*.safetensors"))

    def latent(scale=None):
        loras = () if scale is None else (LoraSpec(id=str(lora), scale=scale),)
        engine = make_engine(tiny_model, steps=1, loras=loras, bank={"enabled": False})
        # Fused: plain modules remain, no adapter layers run per frame.
        assert not any("lora" in type(m).__name__.lower() for m in engine.unet.modules())
        return engine(frames[0], output_type="latent")

    base, half, full = latent(), latent(0.5), latent(1.0)
    assert (full - base).abs().max().item() > 1e-3
    assert (half - base).abs().max().item() > 1e-4
    assert (half - full).abs().max().item() > 1e-4
    zero = latent(0.0)
    assert torch.allclose(zero, base, atol=1e-5)


def test_lora_with_pickle_weights_is_refused(tiny_model, tmp_path):
    from streamv2v import LoraSpec

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.bin").write_bytes(b"not really a pickle")
    cfg = EngineConfig(vae="model", loras=[LoraSpec(id=str(folder))])
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        StreamV2V.from_pretrained(tiny_model, config=cfg, device="cpu")
