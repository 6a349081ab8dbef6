"""A style LoRA for the tiny style model: "sepia", a style the model was never shown.

    python -m streamv2v.tiny.lora --out streamv2v/models/tiny-styles-loras/sepia.safetensors
    python -m streamv2v.tiny.lora --model streamv2v/models/tiny-sdxl --kohya \
        --scenes 128 --steps 300 --batch 8 --out streamv2v/models/tiny-sdxl-loras/sepia.safetensors

The sepia render of a scene is its plain render through the classic sepia toning matrix
(:func:`sepia`). A rank-4 LoRA (peft) on the UNet's attention projections, feed-forward layers
and resnet convolutions (3x3 and 1x1) learns to translate any of the four known styles into it
under the prompt "a sepia scene"; the base weights stay frozen. The file is written in the
diffusers LoRA format (``unet.<module>.lora_A.weight`` / ``lora_B.weight``), loadable by
``StableDiffusionLoraLoaderMixin.lora_state_dict`` and by :mod:`streamv2v.adapters`. The tiny
SDXL's sepia LoRA is trained the same way (both text encoders, the pooled embedding and time ids
as the engine computes them) and written as kohya's sd-scripts writes SDXL files (``--kohya``:
``lora_unet_input_blocks_...`` SGM names, ``lora_down``/``lora_up``, ``alpha``). Seeded and
fixed in step count: a re-run on the same machine gives the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamv2v.families import family_of_unet
from streamv2v.scenes import SIZE, STYLES, random_scene, render
from streamv2v.sgm_names import sgm_name, sgm_prefixes
from streamv2v.tiny.styles import _lr, to_tensor

#: The trigger prompt of the demo LoRA (the tiny text encoder reads bytes: any text encodes).
SEPIA_PROMPT = "a sepia scene"
#: The toning of the sepia style: output RGB = matrix @ input RGB (the usual sepia filter).
SEPIA_MATRIX = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32
)
#: Modules the LoRA adapts: attention, feed-forward, transformer projections, resnet convs.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]


def sepia(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB toned sepia (uint8)."""
    toned = image.astype(np.float32) @ SEPIA_MATRIX.T
    return np.clip(toned + 0.5, 0, 255).astype(np.uint8)


def sepia_error(image: np.ndarray) -> float:
    """How far an image is from sepia toning, in 0..255: the mean distance of each pixel from
    the sepia tone of its own brightness (0 for a sepia image, ~30-60 for the colourful styles).
    The named colour statistic the tests and the demo judge the LoRA by."""
    rgb = image.astype(np.float32)
    tone = SEPIA_MATRIX.sum(axis=1)
    tone = tone / tone.max()  # the colour of a sepia pixel, brightest channel 1
    level = rgb.max(axis=-1, keepdims=True)
    return float(np.abs(rgb - level * tone).mean())


@dataclass(frozen=True)
class LoraRecipe:
    seed: int = 0
    rank: int = 4
    scenes: int = 256
    steps: int = 400
    batch: int = 12
    lr: float = 3e-3
    translate_t: tuple[int, int] = (150, 800)
    threads: int = 2


def train_adapter(
    model: Path,
    recipe,
    prompt: str,
    look: Callable[[np.ndarray], np.ndarray],
    add_adapter: Callable[[torch.nn.Module], None],
    *,
    name: str,
    warmup: int,
    log_every: int,
    log=print,
) -> tuple[torch.nn.Module, list[float]]:
    """Train an adapter that ``add_adapter`` puts on the tiny style model's UNet (at ``model``,
    frozen) to translate any of the four styles into ``look`` of the plain render under
    ``prompt``; returns the UNet with its trained adapter and the losses. ``recipe``: seed,
    scenes, steps, batch, lr, translate_t, threads (and size, the renders' px, if it has one).
    The recipe of the demo's sepia LoRA and noir LoHa (:mod:`streamv2v.tiny.loha`)."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    f32 = {"torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **f32)
    vae = AutoencoderTiny.from_pretrained(model, subfolder="vae", **f32)
    scheduler = LCMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae):
        m.requires_grad_(False).eval()
    size = {"size": recipe.size} if hasattr(recipe, "size") else {}

    with torch.no_grad():
        hidden, added = _conditioning(model, prompt, unet, recipe.batch)
        scale = float(vae.config.scaling_factor)
        scenes = [random_scene(rng) for _ in range(recipe.scenes)]
        styles = list(STYLES)
        lat = []
        for start in range(0, len(scenes), 32):
            chunk = scenes[start : start + 32]
            images = []
            for s in chunk:
                plain = render(s, "plain", **size)
                images += [render(s, st, **size) for st in styles] + [look(plain)]
            z = vae.encode(to_tensor(images)).latents * scale
            lat.append(z.view(len(chunk), len(styles) + 1, *z.shape[1:]))
        latents = torch.cat(lat)  # [scenes, 5 (4 styles + the look), 4, h, w]

    add_adapter(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod.float()
    unet.train()
    n, b, losses = latents.shape[0], recipe.batch, []
    for step in range(recipe.steps):
        scene = torch.from_numpy(rng.integers(0, n, b))
        source = torch.from_numpy(rng.integers(0, 5, b))  # any style, the look itself included
        lo, hi = recipe.translate_t
        t = torch.from_numpy(rng.integers(lo, hi, b))
        z_src, z_tgt = latents[scene, source], latents[scene, 4]
        noise = torch.from_numpy(rng.standard_normal(z_src.shape).astype(np.float32))
        ab = alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z_src + (1 - ab).sqrt() * noise
        eps = (x_t - ab.sqrt() * z_tgt) / (1 - ab).sqrt()  # its x0 estimate is the look's render
        pred = unet(
            x_t, t, encoder_hidden_states=hidden.expand(b, -1, -1), added_cond_kwargs=added
        ).sample
        snr = ab / (1 - ab)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * (pred - eps) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.steps, recipe.lr, warmup=warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == recipe.steps - 1:
            log(f"{name} step {step:5d}  loss {np.mean(losses[-50:]):.4f}")
    return unet, losses


def _conditioning(
    model: Path, prompt: str, unet: torch.nn.Module, batch: int
) -> tuple[torch.Tensor, dict | None]:
    """``prompt``'s text conditioning for the model at ``model``, as the engine computes it
    (:class:`streamv2v.families.Family`: one text encoder, or SDXL's two with the pooled
    embedding and the time ids of the training renders, no crop)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = family_of_unet(unet.config)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    encoders = [
        classes[part].from_pretrained(model, subfolder=part, dtype=torch.float32).eval()
        for part in family.text_parts
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=t) for t in family.tokenizer_parts]
    embeds = family.encode(prompt, encoders, tokenizers, torch.float32)
    if not family.is_sdxl:
        return embeds, None
    hidden, pooled = family.split(embeds, encoders[-1].config.projection_dim)
    side = SIZE
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
    return hidden, {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}


def write_figures(out: Path, recipe, prompt: str, losses: list[float]) -> dict:
    """The shipped file readable by all (safetensors writes 0600) and its figures beside it."""
    figures = {
        "recipe": recipe.__dict__ | {"translate_t": list(recipe.translate_t)},
        "prompt": prompt,
        "final_loss": float(np.mean(losses[-50:])),
        "bytes": out.stat().st_size,
    }
    out.chmod(0o644)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def kohya_sdxl_state(unet: torch.nn.Module, state: dict, rank: int) -> dict:
    """peft's LoRA state of an SDXL UNet as kohya's sd-scripts writes SDXL files: the layers
    by their original SGM names (``lora_unet_input_blocks_4_1_..._to_q``), ``lora_down`` /
    ``lora_up`` factors and each layer's ``alpha`` (= the rank: peft's scale of 1)."""
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    prefixes = sgm_prefixes(layers)
    out = {}
    for key, value in state.items():
        layer, _, factor = key.rpartition(".lora_")  # "<layer>", "A.weight" / "B.weight"
        name = "lora_unet_" + sgm_name(layer, prefixes).replace(".", "_")
        out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=value.dtype)
    return out


def train(model: Path, out: Path, recipe: LoraRecipe, log=print, kohya: bool = False) -> dict:
    """Train the sepia LoRA on the tiny model at ``model`` (tiny-styles, or the tiny SDXL);
    write it to ``out``: diffusers' format, or with ``kohya`` kohya's (SDXL: SGM names)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def add(unet: torch.nn.Module) -> None:
        unet.add_adapter(
            LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                       target_modules=TARGETS)
        )  # fmt: skip

    unet, losses = train_adapter(
        model, recipe, SEPIA_PROMPT, sepia, add, name="lora", warmup=50, log_every=50, log=log
    )
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in
             get_peft_model_state_dict(unet).items()}  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(recipe.rank)}
        save_file(kohya_sdxl_state(unet, state, recipe.rank), str(out), metadata=meta)
    else:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            out.parent, unet_lora_layers=state, weight_name=out.name, safe_serialization=True
        )
    return write_figures(out, recipe, SEPIA_PROMPT, losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument(
        "--model", type=Path, default=Path(__file__).parents[1] / "models" / "tiny-styles"
    )
    p.add_argument("--seed", type=int, default=LoraRecipe.seed)
    p.add_argument("--steps", type=int, default=LoraRecipe.steps)
    p.add_argument("--scenes", type=int, default=LoraRecipe.scenes)
    p.add_argument("--rank", type=int, default=LoraRecipe.rank)
    p.add_argument("--batch", type=int, default=LoraRecipe.batch)
    p.add_argument("--kohya", action="store_true", help="kohya's format (SDXL: SGM names)")
    args = p.parse_args()
    recipe = LoraRecipe(
        seed=args.seed, steps=args.steps, scenes=args.scenes, rank=args.rank, batch=args.batch
    )
    t0 = time.monotonic()
    figures = train(
        args.model,
        args.out,
        recipe,
        log=lambda m: print(f"[{time.monotonic() - t0:6.0f}s] {m}"),
        kohya=args.kohya,
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
