"""A LyCORIS LoHa style for the tiny style model: "noir", black and white, which it never saw.

    python -m streamv2v.tiny.loha --out streamv2v/models/tiny-styles-loras/noir.safetensors

The demo of a style file that is not a plain LoRA. A noir render of a scene is its plain
render's brightness, contrast lifted, in black and white (:func:`noir`): no colour is left,
every pixel is grey, far from sepia's brown tone and from the colours of the shaded styles the
model knows. (A strong colour was tried first: the tiny model's autoencoder, trained on the
four styles, cannot show a saturated green; a round trip of a green monochrome loses most of
it, of a grey one almost nothing.) A LoHa (peft's
``LoHaConfig``: each layer's delta is the Hadamard product of two low-rank products,
``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``) on the UNet's attention, feed-forward,
projection and resnet layers learns to translate any known style into it under the prompt
"a noir scene", the base weights frozen, exactly as :mod:`streamv2v.tiny.lora` trains
sepia. The file is written the way LyCORIS and kohya's scripts write LoHa files
(``lora_unet_<module path with _>.hada_w1_a`` ... ``.hada_w2_b`` and ``.alpha``, float16), the
form the files people download have. Seeded: a re-run on the same machine gives the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamv2v.tiny.lora import TARGETS, train_adapter, write_figures

#: The trigger prompt of the demo LoHa.
NOIR_PROMPT = "a black-and-white scene"
#: The colour of a noir pixel, brightest channel 1: grey.
NOIR_TONE = np.array([1.0, 1.0, 1.0], np.float32)
#: LoHa factor names, as LyCORIS writes them.
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def noir(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB in black and white: its brightness, lifted 20%."""
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    level = np.clip(luma * 1.2, 0, 255)[..., None]
    return np.clip(level * NOIR_TONE + 0.5, 0, 255).astype(np.uint8)


def noir_error(image: np.ndarray) -> float:
    """How far an image is from black and white, in 0..255: the mean distance of each pixel
    from the grey of its own brightness (0 for a noir picture, ~35-50 for the colourful styles
    the model knows, ~15-25 for sepia; its outline drawings are black and white too, so the
    tests compare with and without the LoHa). The named statistic the tests judge it by."""
    rgb = image.astype(np.float32)
    level = rgb.max(axis=-1, keepdims=True)
    return float(np.abs(rgb - level * NOIR_TONE).mean())


@dataclass(frozen=True)
class LohaRecipe:
    seed: int = 0
    rank: int = 2
    scenes: int = 128
    steps: int = 150
    batch: int = 8
    lr: float = 4e-3
    translate_t: tuple[int, int] = (150, 800)
    threads: int = 1  # (one: on a shared machine a second thread waits more than it works)
    size: int = 128  #: training renders (px), the demo's size


def kohya_state(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft's LoHa state dict (``<module>.hada_w1_a`` ...) in LyCORIS/kohya form: keys
    ``lora_unet_<module with _>.<factor>`` in float16, and each module's ``.alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, factor = key.rsplit(".", 1)
        if factor not in HADA:
            raise ValueError(f"not a plain LoHa factor: {key}")
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.{factor}"] = value.detach().to(torch.float16).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return out


def peft_state(kohya: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    """The inverse of :func:`kohya_state` for ``unet``'s modules (peft's key names)."""
    by_stem = {
        "lora_unet_" + name.replace(".", "_"): name for name, _ in unet.named_modules() if name
    }
    out = {}
    for key, value in kohya.items():
        stem, factor = key.rsplit(".", 1)
        if factor in HADA:
            out[f"{by_stem[stem]}.{factor}"] = value
    return out


def loha_config(rank: int):
    from peft import LoHaConfig

    return LoHaConfig(r=rank, alpha=rank, target_modules=TARGETS)


def train(model: Path, out: Path, recipe: LohaRecipe, log=print) -> dict:
    """Train the noir LoHa on the tiny style model at ``model``; write it to ``out``."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def add(unet: torch.nn.Module) -> None:
        inject_adapter_in_model(loha_config(recipe.rank), unet)

    unet, losses = train_adapter(
        model, recipe, NOIR_PROMPT, noir, add, name="loha", warmup=10, log_every=10, log=log
    )
    state = kohya_state(get_peft_model_state_dict(unet), alpha=recipe.rank)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'}
    save_file(state, str(out), metadata=metadata)
    return write_figures(out, recipe, NOIR_PROMPT, losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument(
        "--model", type=Path, default=Path(__file__).parents[1] / "models" / "tiny-styles"
    )
    p.add_argument("--seed", type=int, default=LohaRecipe.seed)
    p.add_argument("--steps", type=int, default=LohaRecipe.steps)
    p.add_argument("--scenes", type=int, default=LohaRecipe.scenes)
    p.add_argument("--rank", type=int, default=LohaRecipe.rank)
    p.add_argument("--threads", type=int, default=LohaRecipe.threads)
    args = p.parse_args()
    recipe = LohaRecipe(
        seed=args.seed,
        steps=args.steps,
        scenes=args.scenes,
        rank=args.rank,
        threads=args.threads,
    )
    t0 = time.monotonic()
    figures = train(
        args.model, args.out, recipe, log=lambda m: print(f"[{time.monotonic() - t0:6.0f}s] {m}")
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
