"""The SDXL family on a tiny SDXL (diffusers' own tests' config, random weights), loaded through
from_pretrained from a real StableDiffusionXL pipeline folder: equal to diffusers' SDXL img2img,
stream batch == sequential, hundreds of float16 frames with the bank on SDXL's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamv2v import EngineConfig, StreamV2V
from streamv2v.families import SD, SDXL, family_of_index, family_of_unet
from streamv2v.testing_sdxl import save_tiny_sdxl_model

SIZE = {"width": 128, "height": 128}
PROMPT = "the cat and the dog"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def make_engine(model, dtype=None, **cfg) -> StreamV2V:
    config = EngineConfig(vae="model", **{**SIZE, **cfg})
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu", dtype=dtype)
    engine.set_prompt(PROMPT)
    return engine


def _pipeline(model):
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_read_from_the_model_config(tiny_sdxl, tiny_model):
    import json

    from diffusers import UNet2DConditionModel

    assert family_of_unet(UNet2DConditionModel.load_config(tiny_sdxl / "unet")) is SDXL
    assert family_of_unet(UNet2DConditionModel.load_config(tiny_model / "unet")) is SD
    assert family_of_index(json.loads((tiny_sdxl / "model_index.json").read_text())) is SDXL
    assert family_of_index(json.loads((tiny_model / "model_index.json").read_text())) is SD
    # The default tiny VAE means the family's own TAESD.
    assert SDXL.vae_for(EngineConfig().vae) == "madebyollin/taesdxl"
    assert SD.vae_for(EngineConfig().vae) == EngineConfig().vae
    assert SDXL.vae_for("model") == "model"


def test_prompt_embeddings_equal_diffusers_sdxl_encode_prompt(tiny_sdxl):
    engine = make_engine(tiny_sdxl, steps=1, bank={"enabled": False})
    pipe = _pipeline(tiny_sdxl)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    cond, uncond = engine.prompt_embeds
    hidden, got_pooled = SDXL.split(cond, pooled.shape[-1])
    assert hidden.shape == emb.shape == (1, 77, 64)
    assert torch.allclose(hidden, emb, atol=1e-6)
    assert torch.allclose(got_pooled, pooled, atol=1e-6)
    # SDXL forces zeros for an empty negative prompt (force_zeros_for_empty_prompt).
    assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(uncond) == 0
    assert torch.count_nonzero(neg_pooled) == 0


@pytest.mark.parametrize("steps", [1, 2])
def test_one_frame_bank_off_equals_diffusers_sdxl_img2img(tiny_sdxl, steps):
    """The engine (sequential, bank off) == StableDiffusionXLImg2ImgPipeline with the same LCM
    scheduler, timesteps, noise and embeddings, in float32."""
    engine = make_engine(
        tiny_sdxl, steps=steps, strength=0.5, stream_batch=False, bank={"enabled": False}
    )
    pipe = _pipeline(tiny_sdxl)
    frame = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    got = engine(frame, output_type="latent")
    timesteps = [int(t) for t in engine._schedule.timesteps]
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    emb, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    # The engine's fixed noise is the seed's first draw on the CPU; for k steps it draws all k
    # slots at once, and the first slot's noise is what noises the frame.
    gen = torch.Generator("cpu").manual_seed(engine.config.seed)
    want = pipe(
        prompt_embeds=emb,
        pooled_prompt_embeds=pooled,
        image=image,
        timesteps=timesteps,
        strength=1.0,
        guidance_scale=0.0,
        generator=gen,
        output_type="latent",
    ).images
    # (with two steps the scheduler's second draw is the engine's second slot's noise)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"max abs latent difference {diff}"
    assert want.abs().max().item() > 0.1  # not a vacuous comparison
