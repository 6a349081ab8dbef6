"""A tiny random-weight SD-family model, saved as a real diffusers folder, for tests and demos.

The weights are random: the images it makes are noise-like, never a style. It exists so that the
whole engine (from_pretrained, tokenizer, text encoder, UNet with self- and cross-attention, TAESD,
LCM scheduler) runs offline and fast on a CPU, through exactly the code path a hub model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_MODEL_NOTE = (
    "the tiny built-in model has RANDOM weights: its output is noise-like, not a style; "
    "it only demonstrates the pipeline"
)

# A handful of merges so that the tokenizer exercises BPE; every merge ends on a real character
# (a merge ending in a bare "</w>" is rejected by the tokenizer).
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>")]


def _byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocab_size() -> tuple[int, int, int]:
    """(vocabulary size, bos id, eos id) of the tiny offline tokenizer."""
    vocab = 2 * 256 + len(_MERGES) + 2
    return vocab, vocab - 2, vocab - 1


def write_tiny_tokenizer(folder: Path) -> None:
    """An offline byte-level BPE CLIP tokenizer (no download), saved at ``folder``."""
    from transformers import CLIPTokenizer

    raw = folder / "_raw"
    raw.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (raw / "merges.txt").write_text(merges)
    tokenizer = CLIPTokenizer.from_pretrained(raw, model_max_length=77)
    tokenizer.save_pretrained(folder)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


def tiny_text_encoder():
    """A 2-layer, 32-wide CLIP text encoder over the tiny tokenizer's vocabulary (random)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, bos, eos = tiny_vocab_size()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def tiny_lcm_scheduler():
    """SD1.5's noise schedule (scaled-linear betas, epsilon) as an LCMScheduler."""
    from diffusers import LCMScheduler

    return LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        original_inference_steps=50,
        prediction_type="epsilon",
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_components(seed: int = 0) -> dict:
    """The tiny model's components in memory (random weights, fixed by ``seed``)."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(seed)
    # SD1.5's layout in miniature: attention only at the low resolutions, present in the mid
    # block and in up_blocks.1 (the reference's feature-fusion layers), none at full resolution.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    text_encoder = tiny_text_encoder()
    scheduler = tiny_lcm_scheduler()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def save_tiny_model(path: str | Path, *, seed: int = 0, safe_serialization: bool = True) -> Path:
    """Write the tiny model as a diffusers folder (model_index.json + subfolders) and return it.

    Load it with ``StreamV2V.from_pretrained(path, config=EngineConfig(vae="model"))``. With
    ``safe_serialization=False`` the weights are written as pickle ``.bin`` files (for testing the
    engine's refusal of unsafe weights).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer")
    parts = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=safe_serialization)
    (path / "README.md").write_text(f"# streamv2v tiny test model\n\nWARNING: {TINY_MODEL_NOTE}.\n")
    return path


def save_tiny_controlnet(
    path: str | Path, model: str | Path, *, seed: int = 0, global_pool_conditions: bool = False
) -> Path:
    """A ControlNet for the tiny model (``ControlNetModel.from_unet`` of its UNet), saved as a
    diffusers folder. Its zero convolutions get random weights, so unlike a fresh ControlNet it
    really steers the UNet (random: no meaning, only an effect). ``global_pool_conditions``:
    a shuffle-like ControlNet (its residuals pooled to one value per channel)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
            conv.bias.normal_(0.0, 0.05)
        # Variance-preserving weights in the condition embedding, so the control image visibly
        # moves the features it is added to (diffusers' default init fades it out).
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
    if global_pool_conditions:
        net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(path)
    return Path(path)


def save_tiny_depth_model(
    path: str | Path, *, seed: int = 0, depth_estimation_type: str = "relative"
) -> Path:
    """A tiny random Depth-Anything model (DINOv2 backbone, 56 px input) with its image
    processor config, saved as a transformers folder. ``depth_estimation_type``: "relative"
    (inverse depth, near = large) or "metric" (a distance, near = small)."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
        patch_size=14,
        depth_estimation_type=depth_estimation_type,
    )
    model = DepthAnythingForDepthEstimation(config)
    # transformers' init (normal, std 0.02) leaves a random model's depth nearly flat (a
    # relative one's is ~1e-8 after its ReLU); torch's own conv init gives a map that varies.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    model.save_pretrained(path)
    DPTImageProcessor(
        size={"height": 56, "width": 56}, ensure_multiple_of=14, keep_aspect_ratio=True
    ).save_pretrained(path)
    return Path(path)
