"""A tiny TRAINED canny ControlNet for the tiny style model (:mod:`streamv2v.tiny.styles`): it
keeps a scene's shapes when the style model restyles it at high strength.

    python -m streamv2v.tiny.control --out streamv2v/models/tiny-canny     # ~15 min on 1 core
    python -m streamv2v.tiny.control --model streamv2v/models/tiny-sdxl \
        --out streamv2v/models/tiny-sdxl-canny --steps 300 --scenes 128 --threads 2  # SDXL's

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` of the shipped style model's
UNet, which stays frozen (as do its text encoder and autoencoder). Its condition is the Canny
edge map of the scene's PLAIN render (what the camera sees), computed exactly as the engine's
``canny`` preprocessor does (:func:`canny_condition`: OpenCV's Canny of the RGB frame written in
torch, thresholds 100/200; edges as 0/1 in three channels). The target is the same scene
rendered in the prompted style; the noisy latent is made from the plain render (img2img from the
camera) at the high noise levels img2img uses at strength 0.5-0.95, or from the target itself at
lower ones (the later steps of a multi-step schedule start from an estimate that already has the
style). Some condition frames get camera-like noise before the edge detector, as a real camera
does. Everything is seeded and runs fixed step counts: a re-run on the same machine gives the
same weights.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamv2v.families import family_of_unet
from streamv2v.scenes import SIZE, STYLES, moving_scene, random_scene, render
from streamv2v.tiny.styles import to_tensor

#: Canny thresholds in OpenCV's units (the annotators' 100/200) and the fixed hysteresis
#: growth steps: the engine's canny preprocessor's defaults, the ones the ControlNet learned.
CANNY_LOW, CANNY_HIGH = 100.0, 200.0
HYSTERESIS_STEPS = 64


def canny_condition(
    images: torch.Tensor,
    low: float = CANNY_LOW,
    high: float = CANNY_HIGH,
    hysteresis_steps: int = HYSTERESIS_STEPS,
) -> torch.Tensor:
    """RGB images ``[N, 3, H, W]`` in [0, 1] -> Canny edges ``[N, 3, H, W]`` (0 or 1, the same
    in each channel: diffusers' convention for a canny ControlNet's image), as the engine's
    canny preprocessor makes them: OpenCV's Canny of the RGB frame, in torch
    (:func:`streamv2v.preprocess.canny`)."""
    from streamv2v.preprocess import canny

    return canny(images.float(), low, high, hysteresis_steps).expand(-1, 3, -1, -1)


def held_aside_clip(frames: int, seed: int = 4242) -> list[np.ndarray]:
    """A moving scene the ControlNet never saw (its own seed), plain renders as a camera sees
    them: the clip its acceptance test and the README's figures use."""
    scene = random_scene(np.random.default_rng(seed))
    return [render(moving_scene(scene, i / 15), "plain") for i in range(frames)]


@dataclass(frozen=True)
class Recipe:
    """Every number the training uses: the same recipe gives the same weights."""

    seed: int = 0
    scenes: int = 200  #: training scenes, rendered and encoded once (x 4 styles)
    steps: int = 600
    batch: int = 12
    lr: float = 2e-3
    x0_weight_cap: float = 25.0  #: the loss is the x0 error, weighted at most this much
    #: noise levels (timesteps of 1000) when the noisy latent comes from the plain render
    source_t: tuple[int, int] = (400, 960)
    from_target: float = 0.25  #: share of samples noised from the target render (any t)
    camera_noise: float = 0.3  #: share of conditions computed on a noisy frame (sigma <= 8/255)
    uncond: float = 0.05  #: share of empty prompts (guidance's unconditional rows get control)
    embedding_channels: tuple[int, ...] = (16, 32, 64, 64)
    held_out: int = 32  #: scenes (seeded apart) for the final figures
    threads: int = 1


def load_style_model(folder: Path) -> dict:
    """The frozen parts of the tiny style model (or of the tiny SDXL: both text encoders), in
    float32 on the CPU."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def frozen(model):
        return model.float().eval().requires_grad_(False)

    unet = frozen(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    family = family_of_unet(unet.config)
    parts = {
        "unet": unet,
        "family": family,
        "vae": frozen(AutoencoderTiny.from_pretrained(folder, subfolder="vae")),
        "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler"),
    }
    for part, tok in zip(family.text_parts, family.tokenizer_parts):
        cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
        parts[part] = frozen(cls.from_pretrained(folder, subfolder=part))
        parts[tok] = CLIPTokenizer.from_pretrained(folder, subfolder=tok)
    return parts


@torch.no_grad()
def _prompt_embeds(parts: dict) -> torch.Tensor:
    """[5, tokens, dim]: the four style prompts, then the empty prompt. SDXL: as the engine
    packs them (both encoders' hidden states and the pooled row), the empty prompt zeros."""
    prompts = [*STYLES.values(), ""]
    family = parts["family"]
    if family.is_sdxl:
        encoders = [parts[p] for p in family.text_parts]
        tokenizers = [parts[t] for t in family.tokenizer_parts]
        rows = [family.encode(p, encoders, tokenizers, torch.float32) for p in prompts]
        return torch.cat([*rows[:-1], torch.zeros_like(rows[-1])])
    ids = parts["tokenizer"](
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return parts["text_encoder"](ids)[0]


def _condition(parts: dict, embeds: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """The UNet's (and ControlNet's) text condition from packed prompt rows: SDXL's added
    conditioning (pooled embedding, time ids of the renders' size, no crop) besides."""
    family = parts["family"]
    if not family.is_sdxl:
        return embeds, None
    hidden, pooled = family.split(embeds, parts["text_encoder_2"].config.projection_dim)
    ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    return hidden, {"text_embeds": pooled, "time_ids": ids.expand(len(embeds), -1)}


@torch.no_grad()
def _render_scenes(parts: dict, recipe: Recipe, count: int, seed: int) -> dict:
    """``count`` random scenes, rendered and prepared once: ``latents`` ``[count, 4 styles, 4,
    h, w]`` (scaled), ``plains`` (uint8 ``[count, 3, H, W]``) and the Canny conditions of the
    plain renders as they are (``edges``) and with camera noise (``noisy_edges``, sigma up to
    8/255), ``[count, 1, H, W]`` float16: the edge detector runs once per scene, not per step."""
    vae = parts["vae"]
    scale = float(vae.config.scaling_factor)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    latents, plains, edges, noisy_edges = [], [], [], []
    for start in range(0, count, 64):
        chunk = scenes[start : start + 64]
        images = [render(s, style) for s in chunk for style in STYLES]
        lat = vae.encode(to_tensor(images)).latents * scale
        latents.append(lat.view(len(chunk), len(STYLES), *lat.shape[1:]))
        plain = torch.from_numpy(np.stack(images[:: len(STYLES)])).permute(0, 3, 1, 2)
        plains.append(plain)
        clean = plain.float() / 255.0
        edges.append(canny_condition(clean)[:, :1].half())
        sigma = torch.rand(len(chunk), 1, 1, 1, generator=gen) * (8 / 255)
        noisy = (clean + torch.randn(clean.shape, generator=gen) * sigma).clamp(0, 1)
        noisy_edges.append(canny_condition(noisy)[:, :1].half())
    return {
        "latents": torch.cat(latents),
        "plains": torch.cat(plains),
        "edges": torch.cat(edges),
        "noisy_edges": torch.cat(noisy_edges),
    }


def _lr(step: int, peak: float, warmup: int = 50) -> float:
    """Warm-up, then constant: the weights after N steps do not depend on the total, so a run
    of N steps equals the first N steps of a longer one."""
    return peak * min(1.0, (step + 1) / warmup)


def _batch(data: dict, recipe: Recipe, rng: np.random.Generator, b: int) -> dict:
    """One training batch: noisy latents, timesteps, prompts, conditions and the target eps."""
    latents, alphas = data["latents"], data["alphas"]
    scene = torch.from_numpy(rng.integers(0, latents.shape[0], b))
    style = torch.from_numpy(rng.integers(0, len(STYLES), b))
    from_target = torch.from_numpy(rng.random(b) < recipe.from_target)
    lo, hi = recipe.source_t
    t = torch.where(
        from_target,
        torch.from_numpy(rng.integers(20, 1000, b)),
        torch.from_numpy(rng.integers(lo, hi, b)),
    )
    z_tgt = latents[scene, style]
    z_src = torch.where(from_target.view(-1, 1, 1, 1), z_tgt, latents[scene, 0])
    noise = torch.from_numpy(rng.standard_normal(z_src.shape).astype(np.float32))
    ab = alphas[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * z_src + (1 - ab).sqrt() * noise
    noisy = torch.from_numpy(rng.random(b) < recipe.camera_noise).view(-1, 1, 1, 1)
    edges = torch.where(noisy, data["noisy_edges"][scene], data["edges"][scene])
    drop = torch.from_numpy(rng.random(b) < recipe.uncond)
    return {
        "x_t": x_t,
        "t": t,
        "ab": ab,
        "prompt": torch.where(drop, len(STYLES), style),
        "cond": edges.expand(-1, 3, -1, -1).float(),
        # The epsilon whose x0 estimate is the target render.
        "eps": (x_t - ab.sqrt() * z_tgt) / (1 - ab).sqrt(),
    }


def _predict(parts: dict, controlnet, batch: dict, embeds: torch.Tensor, scale: float = 1.0):
    hidden, added = _condition(parts, embeds[batch["prompt"]])
    down, mid = controlnet(
        batch["x_t"],
        batch["t"],
        encoder_hidden_states=hidden,
        controlnet_cond=batch["cond"],
        conditioning_scale=scale,
        added_cond_kwargs=added,
        return_dict=False,
    )
    return parts["unet"](
        batch["x_t"],
        batch["t"],
        encoder_hidden_states=hidden,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        added_cond_kwargs=added,
    ).sample


@torch.no_grad()
def x0_error(parts: dict, controlnet, data: dict, embeds, t: int, scale: float) -> float:
    """Mean absolute x0 error (latent units) on held-out scenes translated from their plain
    render at timestep ``t`` into every style, with the ControlNet at ``scale``."""
    latents, alphas = data["latents"], data["alphas"]
    n = latents.shape[0]
    gen = torch.Generator().manual_seed(5)
    style = torch.arange(n) % len(STYLES)
    ab = alphas[t]
    noise = torch.randn(latents[:, 0].shape, generator=gen)
    x_t = ab.sqrt() * latents[:, 0] + (1 - ab).sqrt() * noise
    batch = {
        "x_t": x_t,
        "t": torch.full((n,), t),
        "prompt": style,
        "cond": data["edges"].expand(-1, 3, -1, -1).float(),
    }
    eps = _predict(parts, controlnet, batch, embeds, scale)
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    return float((x0 - latents[torch.arange(n), style]).abs().mean())


def train(
    out: Path, recipe: Recipe, model: Path, log=print, checkpoints: Path | None = None
) -> dict:
    """Train the ControlNet on ``model``'s frozen parts; save a diffusers ControlNet folder at
    ``out`` (float16 safetensors, config, training.json, README.md); return the figures.
    ``checkpoints``: a folder for the weights every 100 steps (to look at a long run early)."""
    from diffusers import ControlNetModel

    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    t0 = time.monotonic()
    parts = load_style_model(Path(model))
    embeds = _prompt_embeds(parts)
    alphas = parts["scheduler"].alphas_cumprod.float()
    train_data = _render_scenes(parts, recipe, recipe.scenes, recipe.seed + 1) | {"alphas": alphas}
    held = _render_scenes(parts, recipe, recipe.held_out, recipe.seed + 2) | {"alphas": alphas}
    log(f"{recipe.scenes} scenes rendered and encoded")

    controlnet = ControlNetModel.from_unet(
        parts["unet"], conditioning_embedding_out_channels=recipe.embedding_channels
    ).float()
    # The output convolutions stay zero (the UNet's own output at the start), but the condition
    # encoder's last layer starts random: with both ends zero the condition reaches the
    # features only after the output convolutions have moved, which takes thousands of steps.
    torch.manual_seed(recipe.seed + 5)
    controlnet.controlnet_cond_embedding.conv_out.reset_parameters()
    controlnet.train()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    rng = np.random.default_rng(recipe.seed + 3)
    losses = []
    for step in range(recipe.steps):
        batch = _batch(train_data, recipe, rng, recipe.batch)
        pred = _predict(parts, controlnet, batch, embeds)
        # The x0 error (eps error / snr), its weight capped at the high noise levels: the
        # shapes of a high-strength img2img step are what the ControlNet is for.
        snr = batch["ab"] / (1 - batch["ab"])
        weight = torch.clamp(1 / snr, max=recipe.x0_weight_cap)
        loss = (weight * (pred - batch["eps"]) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == recipe.steps - 1:
            log(f"controlnet step {step:5d}  loss {np.mean(losses[-25:]):.4f}")
        if checkpoints is not None and (step + 1) % 100 == 0:
            controlnet.save_pretrained(Path(checkpoints) / f"step-{step + 1}")
    controlnet.eval()
    figures: dict = {
        "recipe": recipe.__dict__
        | {
            "source_t": list(recipe.source_t),
            "embedding_channels": list(recipe.embedding_channels),
        },
        "canny": {"low": CANNY_LOW, "high": CANNY_HIGH, "hysteresis_steps": HYSTERESIS_STEPS},
        "final_loss": float(np.mean(losses[-25:])),
        "minutes": (time.monotonic() - t0) / 60,
        "model": Path(model).name,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    controlnet.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o644)  # (safetensors writes 0600: a shipped file is readable by all)
    return write_figures(out, model, figures, recipe, held=held)


#: Timesteps of the first step at strength 0.9, 0.8 and 0.6 (the 50-step LCM schedule's).
FIGURE_TIMESTEPS = {"0.9": 899, "0.8": 799, "0.6": 599}


def write_figures(
    out: Path, model: Path, figures: dict, recipe: Recipe, *, held: dict | None = None
) -> dict:
    """Measure the SAVED ControlNet at ``out`` (float16 weights, as shipped) on held-out scenes
    and write ``training.json`` and the folder's ``README.md``; returns the figures."""
    from diffusers import ControlNetModel

    torch.set_num_threads(recipe.threads)
    parts = load_style_model(Path(model))
    embeds = _prompt_embeds(parts)
    if held is None:
        alphas = parts["scheduler"].alphas_cumprod.float()
        held = _render_scenes(parts, recipe, recipe.held_out, recipe.seed + 2)
        held |= {"alphas": alphas}
    controlnet = ControlNetModel.from_pretrained(out).float().eval()
    # Held-out x0 error without (scale 0) and with the ControlNet, one step.
    figures["held_out_x0_error"] = {
        strength: {
            "t": t,
            "without": x0_error(parts, controlnet, held, embeds, t, 0.0),
            "with": x0_error(parts, controlnet, held, embeds, t, 1.0),
        }
        for strength, t in FIGURE_TIMESTEPS.items()
    }
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "README.md").write_text(model_card(figures))
    return figures


def model_card(figures: dict) -> str:
    """The folder's README.md: what the model is, how it was trained, its training figures."""
    r = figures["recipe"]
    rows = "\n".join(
        f"| {strength} ({v['t']}) | {v['without']:.3f} | {v['with']:.3f} |"
        for strength, v in figures["held_out_x0_error"].items()
    )
    canny = figures["canny"]
    model = figures.get("model", "tiny-styles")
    return f"""# streamv2v tiny canny ControlNet (trained)

A diffusers `ControlNetModel` for the tiny model `../{model}`, float16 safetensors,
trained by `python -m streamv2v.tiny.control --out DIR` (seeded: the same recipe on the same
machine gives the same weights). It keeps a scene's shapes when the style model restyles it at
high strength (0.6-0.9), where the style model alone paints blobs that ignore the camera.

- Architecture: `ControlNetModel.from_unet` of the style model's UNet (its down and mid blocks,
  zero-initialised output convolutions), a small condition encoder (channels
  {r["embedding_channels"]}).
- Condition: Canny edges of the frame, as the engine's `canny` preprocessor makes them
  (OpenCV's Canny of the RGB frame, as the annotators call it, written in torch; thresholds
  {canny["low"]:g}/{canny["high"]:g} in OpenCV's units, {canny["hysteresis_steps"]} fixed
  hysteresis steps; white edges on black, 3 channels). Use it with
  `preprocess = "canny"` and the default thresholds.
- Training: {r["steps"]} steps of batch {r["batch"]} (AdamW, lr {r["lr"]} after a 50-step
  warm-up; the loss is the x0 error, its weight capped at {r["x0_weight_cap"]}) on
  {r["scenes"]} random scenes, the style model frozen. The noisy latent is the PLAIN render (the
  camera) noised to a timestep in {r["source_t"]} (img2img at strength 0.4-0.95), or, for a
  share of {r["from_target"]}, the target itself at any timestep (the later steps of a
  multi-step schedule); the target is the scene in the prompted style; {r["camera_noise"]:.0%}
  of the conditions come from a frame with camera noise (sigma up to 8/255).
  {figures["minutes"]:.0f} minutes on {r["threads"]} CPU threads; final loss
  {figures["final_loss"]:.4f}.

Held-out scenes, translated from their plain render into every style in one step: mean
absolute error of the x0 estimate against the true style render (latent units; lower is
better), without the ControlNet (scale 0) and with it (scale 1):

| strength (timestep) | without | with |
|---|---|---|
{rows}

The structure
figures on whole clips (edge F1 in `streamv2v eval`) are in the project README, section
"ControlNet presets". It knows nothing but this project's synthetic scenes: a witness for
tests and the demo.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--model",
        type=Path,
        default=Path(__file__).parents[1] / "models" / "tiny-styles",
        help="the tiny style model folder whose UNet the ControlNet serves",
    )
    p.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--scenes", type=int, default=Recipe.scenes)
    p.add_argument("--batch", type=int, default=Recipe.batch)
    p.add_argument("--threads", type=int, default=Recipe.threads)
    p.add_argument("--held-out", type=int, default=Recipe.held_out)
    p.add_argument("--checkpoints", type=Path, help="save the weights here every 100 steps")
    p.add_argument(
        "--figures-only",
        action="store_true",
        help="measure the ControlNet already trained at --out again (its training.json's "
        "recipe) and rewrite training.json and README.md, without training",
    )
    args = p.parse_args()
    recipe = Recipe(
        seed=args.seed,
        steps=args.steps,
        scenes=args.scenes,
        batch=args.batch,
        threads=args.threads,
        held_out=args.held_out,
    )
    t0 = time.monotonic()
    if args.figures_only:
        figures = json.loads((args.out / "training.json").read_text())
        kept = figures["recipe"]
        recipe = Recipe(**kept | {k: tuple(kept[k]) for k in ("source_t", "embedding_channels")})
        figures = write_figures(args.out, args.model, figures, recipe)
    else:
        figures = train(
            args.out,
            recipe,
            args.model,
            log=lambda m: print(f"[{time.monotonic() - t0:7.0f}s] {m}"),
            checkpoints=args.checkpoints,
        )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
