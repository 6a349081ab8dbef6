"""A tiny random-weight SDXL model, saved as a real diffusers folder (the StableDiffusionXL pipeline
layout: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler), for tests.

Its UNet is the tiny SDXL of diffusers' own tests: two levels (32, 64 channels), one transformer
per block at the first level and two at the second (SDXL's "several per block"), attention heads
(2, 4), ``addition_embed_type="text_time"`` with 8-wide time embeddings, and the projection input
``6 * 8 + 32`` (six time ids and the second encoder's 32-wide pooled embedding). Random weights:
for mechanics and exactness, never for image quality (streamv2v.tiny.sdxl trains one for that).
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamv2v.testing import (
    TINY_MODEL_NOTE,
    tiny_lcm_scheduler,
    tiny_vocab_size,
    write_tiny_tokenizer,
)


def tiny_sdxl_unet(**overrides):
    """The tiny SDXL UNet (random weights); ``overrides`` change its config."""
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + the 32-wide pooled embed
        cross_attention_dim=64,  # the two 32-wide encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    return UNet2DConditionModel(**{**cfg, **overrides})


def tiny_sdxl_text_encoders(hidden: int = 32, layers: int = 2):
    """SDXL's two text encoders in miniature: a CLIPTextModel and a CLIPTextModelWithProjection
    (projection ``hidden`` wide), over the tiny tokenizer's vocabulary (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, bos, eos = tiny_vocab_size()
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)


def tiny_sdxl_vae():
    """A tiny AutoencoderTiny (TAESDXL's layout: 4 latent channels, scaling factor 1)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """The tiny SDXL's components in memory (random weights, fixed by ``seed``)."""
    torch.manual_seed(seed)
    unet = tiny_sdxl_unet()
    vae = tiny_sdxl_vae()
    te1, te2 = tiny_sdxl_text_encoders()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": te1,
        "text_encoder_2": te2,
        "scheduler": tiny_lcm_scheduler(),
    }


def save_sdxl_pipeline(path: Path, parts: dict, *, safe_serialization: bool = True) -> Path:
    """Save SDXL ``parts`` (unet, vae, both text encoders, scheduler) as a StableDiffusionXL
    pipeline folder with the tiny offline tokenizer as both tokenizers."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    pipe = StableDiffusionXLPipeline(**parts, tokenizer=tok, tokenizer_2=tok)
    pipe.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def save_tiny_sdxl_model(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny random SDXL as a diffusers folder and return it. Load it with
    ``StreamV2V.from_pretrained(path, config=EngineConfig(vae="model"))``."""
    path = save_sdxl_pipeline(Path(path), build_tiny_sdxl_components(seed))
    note = f"# streamv2v tiny SDXL test model\n\nWARNING: {TINY_MODEL_NOTE}.\n"
    (path / "README.md").write_text(note)
    return path


def save_tiny_sdxl_controlnet(path: str | Path, model: str | Path, *, seed: int = 0) -> Path:
    """An SDXL ControlNet for the tiny SDXL: the tiny model's recipe
    (:func:`streamv2v.testing.save_tiny_controlnet`), whose ``ControlNetModel.from_unet`` of
    an SDXL UNet carries SDXL's added conditioning."""
    from streamv2v.testing import save_tiny_controlnet

    return save_tiny_controlnet(path, model, seed=seed)
