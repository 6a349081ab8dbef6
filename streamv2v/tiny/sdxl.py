"""A tiny TRAINED SDXL-family model on the tiny world: the SDXL layout in miniature (two text
encoders, the second projecting a pooled embedding, ``text_time`` added conditioning with the
size/crop time ids, several transformers per block), trained like tiny-styles to restyle a scene.

    python -m streamv2v.tiny.sdxl --out streamv2v/models/tiny-sdxl
    # ~35 min on a 2-core machine shared with 7 other jobs (a few minutes on an idle one)

Its autoencoder is tiny-styles' (a TAESD-layout AutoencoderTiny already trained on these scenes:
the SDXL family's TAESDXL has that layout too), so only the UNet and both text encoders train.
Recipe as tiny-styles (streamv2v.tiny.styles): translation pairs teach the UNet to follow the
prompt; an empty prompt is trained as all-zero text conditioning (SDXL's
``force_zeros_for_empty_prompt``), which is what the engine feeds for an empty negative prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamv2v.families import SDXL
from streamv2v.scenes import SIZE, STYLES
from streamv2v.tiny.styles import Recipe as StylesRecipe
from streamv2v.tiny.styles import _encode_scenes, _lr

#: The trained tiny-styles folder whose autoencoder this model shares.
STYLES_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-styles"


def build_unet(seed: int):
    """The tiny SDXL UNet for 128 px (16x16 latents): attention at 8x8 (one transformer per
    block) and 4x4 (two per block) and in the mid block, SDXL's added conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )


@dataclass(frozen=True)
class Recipe:
    """Every number the training uses: the same recipe gives the same weights."""

    seed: int = 0
    scenes: int = 300
    unet_steps: int = 900
    unet_batch: int = 16
    warmup: int = 50
    lr: float = 1e-3
    translate: float = 0.6
    translate_t: tuple[int, int] = (250, 800)
    uncond: float = 0.1
    threads: int = 1  # (a shared machine: a second thread spins more than it helps)


def _encode(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states, concatenated, and the second's pooled embed
    (what streamv2v.families.SDXL.encode computes at run time)."""
    hidden = []
    for enc in encoders:
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, -1), out[0]


def train(out: Path, recipe: Recipe, log=print) -> dict:
    """Train the UNet and text encoders, save an SDXL diffusers folder at ``out``."""
    from diffusers import AutoencoderTiny
    from transformers import CLIPTokenizer

    from streamv2v.testing import tiny_lcm_scheduler
    from streamv2v.testing_sdxl import save_sdxl_pipeline, tiny_sdxl_text_encoders

    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(out)
    vae = AutoencoderTiny.from_pretrained(STYLES_MODEL / "vae").float().eval()
    unet = build_unet(recipe.seed)
    te1, te2 = tiny_sdxl_text_encoders()
    tokenizer = CLIPTokenizer.from_pretrained(STYLES_MODEL / "tokenizer")
    scheduler = tiny_lcm_scheduler()
    figures: dict = {"recipe": recipe.__dict__ | {"translate_t": list(recipe.translate_t)}}
    t0 = time.monotonic()
    latents = _encode_scenes(vae, StylesRecipe(seed=recipe.seed, scenes=recipe.scenes))
    latents = latents * float(vae.config.scaling_factor)
    figures["unet"] = _train_unet(unet, (te1, te2), tokenizer, scheduler, latents, recipe, log)
    figures["minutes"] = (time.monotonic() - t0) / 60
    parts = {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}
    parts = {k: v.to(torch.float16).eval() for k, v in parts.items()}
    save_sdxl_pipeline(out, {**parts, "scheduler": scheduler})
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(figures))
    return figures


def _train_unet(unet, encoders, tokenizer, scheduler, latents, recipe: Recipe, log) -> dict:
    rng = np.random.default_rng(recipe.seed + 3)
    torch.manual_seed(recipe.seed + 3)
    prompts = list(STYLES.values())
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    alphas = scheduler.alphas_cumprod.float()
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    params = list(unet.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    for m in (unet, *encoders):
        m.train()
    n, b = latents.shape[0], recipe.unet_batch
    losses = []
    for step in range(recipe.unet_steps):
        scene = torch.from_numpy(rng.integers(0, n, b))
        target = torch.from_numpy(rng.integers(0, 4, b))
        translate = torch.from_numpy(rng.random(b) < recipe.translate)
        other = (target + torch.from_numpy(rng.integers(1, 4, b))) % 4
        plain = torch.from_numpy(rng.random(b) < 0.5)
        source = torch.where(translate, torch.where(plain & (target != 0), 0, other), target)
        lo, hi = recipe.translate_t
        t = torch.where(
            translate,
            torch.from_numpy(rng.integers(lo, hi, b)),
            torch.from_numpy(rng.integers(0, 1000, b)),
        )
        keep = ~(torch.from_numpy(rng.random(b) < recipe.uncond) & ~translate)
        z_src, z_tgt = latents[scene, source], latents[scene, target]
        noise = torch.from_numpy(rng.standard_normal(z_src.shape).astype(np.float32))
        ab = alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z_src + (1 - ab).sqrt() * noise
        eps = (x_t - ab.sqrt() * z_tgt) / (1 - ab).sqrt()
        hidden, pooled = _encode(encoders, ids)  # the four prompts, once per step
        mask = keep.float()
        hidden = hidden[target] * mask.view(-1, 1, 1)  # dropped: zeros (force_zeros_for_empty)
        pooled = pooled[target] * mask.view(-1, 1)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(b, -1)}
        pred = unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        snr = ab / (1 - ab)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * (pred - eps) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.unet_steps, recipe.lr, warmup=recipe.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step:5d}  loss {np.mean(losses[-10:]):.4f}")
    return {"final_loss": float(np.mean(losses[-20:]))}


def _model_card(figures: dict) -> str:
    styles = "\n".join(f'- `{name}`: prompt "{prompt}"' for name, prompt in STYLES.items())
    return f"""# streamv2v tiny SDXL model (trained)

The {SDXL.label} family in miniature (UNet {SIZE // 8}x{SIZE // 8} latents with `text_time`
added conditioning, two tiny CLIP text encoders, the second with projection; tiny-styles'
autoencoder; fp16 safetensors), trained on this project's synthetic scenes by
`python -m streamv2v.tiny.sdxl`. It restyles a scene into one of four styles:

{styles}

A witness for tests and the demo, not an art model. Training figures: `training.json`
(final loss {figures["unet"]["final_loss"]:.4f}, {figures["minutes"]:.0f} minutes).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=Recipe.unet_steps)
    p.add_argument("--scenes", type=int, default=Recipe.scenes)
    p.add_argument("--batch", type=int, default=Recipe.unet_batch)
    args = p.parse_args()
    recipe = Recipe(
        seed=args.seed, unet_steps=args.unet_steps, scenes=args.scenes, unet_batch=args.batch
    )
    t0 = time.monotonic()
    figures = train(args.out, recipe, log=lambda m: print(f"[{time.monotonic() - t0:7.0f}s] {m}"))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
