"""A tiny TRAINED style model: synthetic scenes in four styles, and the recipe that trains a tiny
autoencoder, text encoder and UNet on a CPU to restyle one into another.

    python -m streamv2v.tiny.styles --out streamv2v/models/tiny-styles     # ~1 h on 2 cores

The scenes are a few shapes on a background; every scene can be rendered in every style, so a
style is the only thing that differs between two renders of one scene, and a prompt names it.
Plain DDPM training alone teaches the UNet to ignore the prompt (a half-noised latent already
shows its style), so half of the training samples are translation pairs: the noisy latent is
made from the scene in another style and the target is the prompted style's render, which is
what img2img asks of the model. Everything is seeded and runs fixed step counts, so a re-run on
the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamv2v.scenes import SIZE, STYLES, random_scene, render


# --------------------------------------------------------------------------- the model
def build_components(seed: int) -> dict:
    """Untrained components (diffusers/transformers classes, so the folder loads anywhere)."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from streamv2v.testing import tiny_lcm_scheduler, tiny_text_encoder

    torch.manual_seed(seed)
    # SD1.5's layout in miniature: attention at the two lower resolutions (8x8 and 4x4 latents
    # for 128 px), in the mid block and in up_blocks.1, where the reference fuses features.
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderTiny(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    text_encoder = tiny_text_encoder()  # (after the UNet and VAE: the seed's draw order)
    scheduler = tiny_lcm_scheduler()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Recipe:
    """Every number the training uses: the same recipe gives the same weights."""

    seed: int = 0
    ae_steps: int = 1200
    ae_batch: int = 24
    ae_crop: int = 64
    scenes: int = 2000  #: scenes encoded once for the UNet (x 4 styles)
    unet_steps: int = 5000
    unet_batch: int = 48
    lr: float = 1e-3
    translate: float = 0.6  #: share of translation pairs
    translate_t: tuple[int, int] = (250, 800)
    uncond: float = 0.1  #: share of empty prompts (so guidance has an unconditional branch)
    threads: int = 2


def train(out: Path, recipe: Recipe, log=print) -> dict:
    """Train all parts and save a diffusers folder at ``out``; returns the training figures."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from streamv2v.testing import write_tiny_tokenizer

    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    parts = build_components(recipe.seed)
    figures: dict = {"recipe": recipe.__dict__ | {"translate_t": list(recipe.translate_t)}}
    t0 = time.monotonic()
    figures["ae"] = _train_autoencoder(parts["vae"], recipe, log)
    latents = _encode_scenes(parts["vae"], recipe)
    scale = 1.0 / float(latents.std())
    parts["vae"].register_to_config(scaling_factor=scale)
    figures["latent_scale"] = scale
    figures["unet"] = _train_unet(parts, tokenizer, latents * scale, recipe, log)
    figures["minutes"] = (time.monotonic() - t0) / 60
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(torch.float16).eval()
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(figures))
    return figures


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))


def _train_autoencoder(vae, recipe: Recipe, log) -> dict:
    rng = np.random.default_rng(recipe.seed + 1)
    torch.manual_seed(recipe.seed + 1)
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.lr)
    vae.train()
    styles = list(STYLES)
    c = recipe.ae_crop
    for step in range(recipe.ae_steps):
        images = []
        for _ in range(recipe.ae_batch):
            full = render(random_scene(rng), styles[int(rng.integers(0, 4))])
            y, x = rng.integers(0, SIZE - c + 1, 2)
            images.append(full[y : y + c, x : x + c])
        batch = to_tensor(images)
        recon = vae.decode(vae.encode(batch).latents).sample
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.ae_steps, recipe.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == recipe.ae_steps - 1:
            log(f"autoencoder step {step:5d}  loss {loss.item():.4f}")
    vae.eval()
    return {"psnr_db": autoencoder_psnr(vae, recipe.seed + 999)}


@torch.no_grad()
def autoencoder_psnr(vae, seed: int, n: int = 32) -> float:
    """PSNR (dB, 0..255) of full 128 px held-out renders through the autoencoder."""
    rng = np.random.default_rng(seed)
    styles = list(STYLES)
    images = [render(random_scene(rng), styles[i % 4]) for i in range(n)]
    batch = to_tensor(images).to(vae.dtype)
    recon = vae.decode(vae.encode(batch).latents).sample.float()
    mse = F.mse_loss((recon.clamp(-1, 1) + 1) * 127.5, (batch.float() + 1) * 127.5).item()
    return 10 * math.log10(255**2 / mse)


@torch.no_grad()
def _encode_scenes(vae, recipe: Recipe) -> torch.Tensor:
    """[scenes, 4 styles, 4, 16, 16] latents of fixed training scenes."""
    rng = np.random.default_rng(recipe.seed + 2)
    scenes = [random_scene(rng) for _ in range(recipe.scenes)]
    out = []
    for start in range(0, len(scenes), 64):
        chunk = scenes[start : start + 64]
        images = [render(s, style) for s in chunk for style in STYLES]
        lat = vae.encode(to_tensor(images)).latents
        out.append(lat.view(len(chunk), len(STYLES), *lat.shape[1:]))
    return torch.cat(out)


def _train_unet(parts: dict, tokenizer, latents: torch.Tensor, recipe: Recipe, log) -> dict:
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    rng = np.random.default_rng(recipe.seed + 3)
    torch.manual_seed(recipe.seed + 3)
    prompts = [*STYLES.values(), ""]
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    alphas = scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    unet.train()
    text_encoder.train()
    n, b = latents.shape[0], recipe.unet_batch
    losses = []
    for step in range(recipe.unet_steps):
        scene = torch.from_numpy(rng.integers(0, n, b))
        target = torch.from_numpy(rng.integers(0, 4, b))
        translate = torch.from_numpy(rng.random(b) < recipe.translate)
        # Translation sources: plain half the time (a camera), any other style otherwise.
        other = (target + torch.from_numpy(rng.integers(1, 4, b))) % 4
        plain = torch.from_numpy(rng.random(b) < 0.5)
        source = torch.where(translate, torch.where(plain & (target != 0), 0, other), target)
        lo, hi = recipe.translate_t
        t = torch.where(
            translate,
            torch.from_numpy(rng.integers(lo, hi, b)),
            torch.from_numpy(rng.integers(0, 1000, b)),
        )
        drop = torch.from_numpy(rng.random(b) < recipe.uncond) & ~translate
        prompt = torch.where(drop, len(STYLES), target)
        z_src, z_tgt = latents[scene, source], latents[scene, target]
        noise = torch.from_numpy(rng.standard_normal(z_src.shape).astype(np.float32))
        ab = alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z_src + (1 - ab).sqrt() * noise
        # The epsilon whose x0 estimate is the target render (= noise when source == target).
        eps = (x_t - ab.sqrt() * z_tgt) / (1 - ab).sqrt()
        hidden = text_encoder(ids[prompt])[0]
        pred = unet(x_t, t, encoder_hidden_states=hidden).sample
        snr = ab / (1 - ab)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR: the x0 error, capped at low noise
        loss = (weight * (pred - eps) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.unet_steps, recipe.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step:5d}  loss {np.mean(losses[-250:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return {"final_loss": float(np.mean(losses[-250:]))}


def _model_card(figures: dict) -> str:
    styles = "\n".join(f'- `{name}`: prompt "{prompt}"' for name, prompt in STYLES.items())
    return f"""# streamv2v tiny style model (trained)

A tiny SD-family model (UNet {SIZE // 8}x{SIZE // 8} latents, tiny autoencoder, tiny CLIP text
encoder; fp16 safetensors) trained on this project's synthetic scenes by
`python -m streamv2v.tiny.styles`. It restyles a scene into one of four styles:

{styles}

It knows nothing but these scenes and styles: it is a witness for tests and the demo, not an
art model. Training figures: see `training.json` (autoencoder PSNR
{figures["ae"]["psnr_db"]:.1f} dB, {figures["minutes"]:.0f} minutes).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-steps", type=int, default=Recipe.ae_steps)
    p.add_argument("--unet-steps", type=int, default=Recipe.unet_steps)
    p.add_argument("--scenes", type=int, default=Recipe.scenes)
    args = p.parse_args()
    recipe = Recipe(
        seed=args.seed, ae_steps=args.ae_steps, unet_steps=args.unet_steps, scenes=args.scenes
    )
    t0 = time.monotonic()
    figures = train(args.out, recipe, log=lambda m: print(f"[{time.monotonic() - t0:7.0f}s] {m}"))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
