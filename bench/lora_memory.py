"""Memory per style LoRA on SD1.5 (the README's "Memory per LoRA" table), from the estimate.

    python bench/lora_memory.py [--rank 16] [--conv-rank 8] [--dtype-bytes 2]

The SD1.5 UNet and CLIP ViT-L/14 text encoder are built on the meta device (shapes only, no
weights, no download); the LoRA files are described by the headers a kohya/LyCORIS trainer
writes for them (``lora_unet_<path>.lora_down.weight`` [rank, in], ``lora_up.weight``
[out, rank], ``.alpha``); :mod:`streamv2v.lora_memory` prices them as the preflight does.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from streamv2v.lora_memory import lora_footprint, loras_memory, module_layers

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv")
RESNET += ("upsamplers.0.conv",)


def sd15() -> dict[str, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                vocab_size=49408,
            )
        )
    return {"unet": module_layers(unet), "text_encoder": module_layers(text)}


def header(models, targets: dict[str, tuple[str, ...]], rank: int, conv_rank: int) -> dict:
    """The header of a kohya LoRA/LoCon file on ``targets`` (part -> module name endings)."""
    out = {}
    for part, ends in targets.items():
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        for name, shape in models[part].items():
            if not name.endswith(ends):
                continue
            r = conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else rank
            stem = prefix + name.replace(".", "_")
            down = [r, shape[1], *shape[2:]]
            up = [shape[0], r] + ([1, 1] if len(shape) == 4 else [])
            out[f"{stem}.lora_down.weight"] = {"shape": down}
            out[f"{stem}.lora_up.weight"] = {"shape": up}
            out[f"{stem}.alpha"] = {"shape": []}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--conv-rank", type=int, default=8)
    p.add_argument("--dtype-bytes", type=int, default=2)
    args = p.parse_args()
    models = sd15()
    kinds = {
        "attention LoRA (UNet to_q/k/v/out)": {"unet": ATTENTION},
        "kohya LoRA (UNet transformers + text encoder)": {
            "unet": TRANSFORMER,
            "text_encoder": TEXT,
        },
        "LoCon (+ resnet and sampler convs)": {
            "unet": TRANSFORMER + RESNET,
            "text_encoder": TEXT,
        },
    }
    unet_bytes = sum(torch.Size(s).numel() for s in models["unet"].values()) * args.dtype_bytes
    print(
        f"SD1.5, {args.dtype_bytes} bytes per element, rank {args.rank} (3x3 convs "
        f"{args.conv_rank}); the UNet's Linear/Conv weights: {unet_bytes / 2**30:.2f} GiB"
    )
    print(f"{'file':48s} {'layers':>6s} {'factors':>10s} {'base copies':>12s}")
    for kind, targets in kinds.items():
        footprint = lora_footprint(header(models, targets, args.rank, args.conv_rank), models)
        memory = loras_memory({kind: footprint}, models, args.dtype_bytes)
        factors = memory.factor_bytes[kind]
        print(
            f"{kind:48s} {len(footprint.touched):6d} {factors / 2**20:7.1f} MiB "
            f"{memory.base_bytes / 2**30:8.2f} GiB"
        )


if __name__ == "__main__":
    main()
