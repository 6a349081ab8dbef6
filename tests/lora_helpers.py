"""Real LoRA files for tests: peft adapters on a real UNet, written in the diffusers format
(with their adapter config as metadata, as diffusers' save_lora_weights writes it) and in the
kohya/CivitAI format (``lora_unet_<path>.lora_down/lora_up/alpha``) from the same factors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Attention, feed-forward, transformer projections and resnet convs (3x3) and shortcuts (1x1).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]


def lora_factors(unet, *, seed: int, rank: int = 4, alpha: float = 8.0, targets=TARGETS) -> dict:
    """Random LoRA factors ``{layer: (down, up)}`` (B non-zero) for ``unet``'s target layers."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        w = module.weight
        if w.ndim == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, w.shape[1], generator=gen)
            up = torch.randn(w.shape[0], rank, generator=gen)
        fan = down[0].numel()
        out[name] = (down / fan**0.5, up * 0.05 / rank)
    return {"factors": out, "rank": rank, "alpha": alpha}


def write_diffusers(path: Path, lora: dict, text_encoder: dict | None = None) -> Path:
    """The diffusers/peft format: ``unet.<layer>.lora_A.weight`` + adapter metadata."""
    tensors = {}
    for prefix, part in (("unet", lora), ("text_encoder", text_encoder)):
        if part is None:
            continue
        for layer, (down, up) in part["factors"].items():
            tensors[f"{prefix}.{layer}.lora_A.weight"] = down.contiguous()
            tensors[f"{prefix}.{layer}.lora_B.weight"] = up.contiguous()
    meta = {"format": "pt"}
    config = {}
    for prefix, part in (("unet", lora), ("text_encoder", text_encoder)):
        if part is not None:
            config.update({f"{prefix}.r": part["rank"], f"{prefix}.lora_alpha": part["alpha"]})
    meta["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def write_kohya(path: Path, lora: dict, text_encoder: dict | None = None) -> Path:
    """The kohya/CivitAI format of the same factors (what diffusers converts on reading)."""
    tensors = {}
    for prefix, part in (("lora_unet_", lora), ("lora_te_", text_encoder)):
        if part is None:
            continue
        for layer, (down, up) in part["factors"].items():
            # (kohya names the text encoder's layers as transformers 4 did: text_model.*)
            te = (
                "text_model." if prefix == "lora_te_" and not layer.startswith("text_model") else ""
            )
            key = prefix + (te + layer).replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(part["alpha"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path
