"""Real LyCORIS / peft style files for tests: peft's own LoHa, LoKr, LoRA and DoRA layers
injected into a copy of a real model, given random factors, written as files (the kohya/LyCORIS
key layout, or diffusers/peft's), and merged by peft itself (``layer.merge()``) as the
reference the in-place path must equal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

UNET_TARGETS = ["to_q", "to_k", "ff.net.2", "proj_in", "conv1", "conv_shortcut"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


def configs(targets: list[str]) -> dict[str, tuple[object, str]]:
    """Format name -> (peft config, file layout)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kw = {"target_modules": targets}
    return {
        "locon": (LoraConfig(r=4, lora_alpha=8, **kw), "kohya"),
        "loha": (LoHaConfig(r=4, alpha=6, use_effective_conv2d=False, **kw), "kohya"),
        "loha-tucker": (LoHaConfig(r=4, alpha=6, use_effective_conv2d=True, **kw), "kohya"),
        # LyCORIS: whole w1 and w2 carry no rank, the scale is 1 (peft: alpha / r = 1 here)
        "lokr-whole": (LoKrConfig(r=64, alpha=64, **kw), "kohya"),
        "lokr-factored": (
            LoKrConfig(r=1, alpha=1.5, decompose_both=True, use_effective_conv2d=True, **kw),
            "kohya",
        ),
        # peft's own rule, alpha / r even with whole factors, read from the file's metadata
        "lokr-peft": (LoKrConfig(r=64, alpha=16, **kw), "peft"),
        "dora-kohya": (LoraConfig(r=4, lora_alpha=8, use_dora=True, **kw), "kohya"),
        "dora-peft": (LoraConfig(r=4, lora_alpha=6, use_dora=True, **kw), "peft"),
    }


def adapted(model: torch.nn.Module, config, seed: int) -> tuple[torch.nn.Module, dict, dict]:
    """A copy of ``model`` with the adapter, random factors; returns (copy, {module: {name:
    tensor}} of the adapter's tensors, {module: merged weight} as peft merges it)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    gen = torch.Generator().manual_seed(seed)
    tuned = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(model))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    merged = {}
    for name, module in tuned.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        own: dict[str, torch.Tensor] = {}
        for pname, p in module.named_parameters():
            if ".default" not in pname or "base_layer" in pname:
                continue
            with torch.no_grad():
                if "magnitude" in pname:  # around the base norms, as trained ones are
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            key = pname.replace(".default", "")
            own[key] = p.detach().clone()
        module.merge()
        tensors[name] = own
        merged[name] = module.get_base_layer().weight.detach().clone()
    return tuned, tensors, merged


def _kohya_suffix(key: str, tensor: torch.Tensor, weight_shape) -> tuple[str, torch.Tensor]:
    if key == "lora_A.weight":
        return "lora_down.weight", tensor
    if key == "lora_B.weight":
        return "lora_up.weight", tensor
    if key == "lora_magnitude_vector.weight" or key == "lora_magnitude_vector":
        # LyCORIS's wd_on_out form: [out, 1, ...]
        return "dora_scale", tensor.reshape(weight_shape[0], *[1] * (len(weight_shape) - 1))
    return key, tensor


def file_tensors(
    layout: str, part: str, config, tensors: dict, shapes: dict
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One part's adapter tensors under ``layout``'s keys, and its peft metadata entries."""
    out: dict[str, torch.Tensor] = {}
    alpha = getattr(config, "lora_alpha", None) or config.alpha
    for module, own in tensors.items():
        if layout == "kohya":
            te = "text_model_" if part == "text_encoder" else ""
            stem = ("lora_te_" if part == "text_encoder" else "lora_unet_") + te
            stem += module.replace(".", "_")
            for key, value in own.items():
                suffix, value = _kohya_suffix(key, value, shapes[module])
                out[f"{stem}.{suffix}"] = value.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
        else:
            for key, value in own.items():
                key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                out[f"{part}.{module}.{key}"] = value.contiguous()
    meta: dict[str, object] = {}
    if layout == "peft":
        alpha_key = "lora_alpha" if hasattr(config, "lora_alpha") else "alpha"
        meta = {f"{part}.r": config.r, f"{part}.{alpha_key}": alpha}
    return out, meta


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Path:
    metadata = {"format": "pt"}
    if meta:
        metadata["lora_adapter_metadata"] = json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def make(path: Path, fmt: str, unet, text_encoder, seed: int = 0) -> tuple[Path, dict]:
    """A file of format ``fmt`` for ``unet`` and ``text_encoder``, and peft's merged weights
    {("unet"|"text_encoder", module): weight}."""
    return make_mixed(path, [(fmt, UNET_TARGETS, TE_TARGETS)], unet, text_encoder, seed=seed)


def make_mixed(
    path: Path, plan: list[tuple[str, list[str], list[str]]], unet, text_encoder, seed: int = 0
) -> tuple[Path, dict]:
    """One file holding, per (format, UNet targets, text-encoder targets) of ``plan``, that
    format's tensors (one layout: the first format's); and peft's merged weights."""
    tensors_out: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    reference = {}
    layout = configs([])[plan[0][0]][1]
    for i, (fmt, unet_targets, te_targets) in enumerate(plan):
        for part, model, targets in (
            ("unet", unet, unet_targets),
            ("text_encoder", text_encoder, te_targets),
        ):
            if not targets:
                continue
            config, _ = configs(targets)[fmt]
            _, tensors, merged = adapted(model, config, seed + i)
            shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in tensors}
            got, got_meta = file_tensors(layout, part, config, tensors, shapes)
            tensors_out.update(got)
            meta.update(got_meta)
            reference.update({(part, m): w for m, w in merged.items()})
    return save(path, tensors_out, meta), reference


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


class TinyUNet(nn.Module):
    """A few layers named as a UNet's (the targets of every format): cheap to rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Attn()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 16, 3)
        self.proj_in, self.conv_shortcut = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 8, 1)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.fc1 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)
