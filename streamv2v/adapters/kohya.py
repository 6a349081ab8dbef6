"""The kohya / LyCORIS reader: ``lora_unet_<module path with _>.<suffix>`` keys.

kohya's sd-scripts, LyCORIS (LoCon, LoHa, LoKr, DoRA as ``dora_scale``) and most CivitAI
files name a layer by its module path with dots turned into underscores, and give each layer
its own ``alpha`` (none: the rank, a scale of 1). The path is found by flattening the model's
own module names the same way (the text encoder's with or without ``text_model.``, as
transformers 4 and 5 name it; a UNet's by the original SGM names too, ``input_blocks_4_1_...``,
which kohya's sd-scripts writes for SDXL: :mod:`streamv2v.sgm_names`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from streamv2v.adapters.formats import (
    FOREIGN_PARTS,
    KOHYA_PARTS,
    REFUSED,
    AlphaRule,
    split_suffix,
)
from streamv2v.sgm_names import sgm_flat_aliases

FAMILY = "kohya"


def claims(keys: list[str]) -> bool:
    """True when the file's keys are kohya/LyCORIS names."""
    prefixes = (*KOHYA_PARTS, *(p for p in FOREIGN_PARTS if p.startswith("lora_")))
    return any(k.startswith(prefixes) for k in keys)


def group(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], dict[str, str], list[str]]:
    """``{(part, flat name): {suffix: tensor}}``, the keys of unknown kinds (key -> suffix) and
    the keys of parts no such engine has."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: dict[str, str] = {}
    foreign: list[str] = []
    for key, value in tensors.items():
        prefix = max((p for p in KOHYA_PARTS if key.startswith(p)), key=len, default=None)
        if prefix is None:
            if key.startswith(tuple(FOREIGN_PARTS)):
                foreign.append(key)
            else:
                unknown[key] = ""
            continue
        module, _, suffix = key[len(prefix) :].partition(".")
        found = split_suffix(f"x.{suffix}")
        if found is None or found[1] != suffix or suffix in REFUSED:
            unknown[key] = suffix
            continue
        groups.setdefault((KOHYA_PARTS[prefix], module), {})[suffix] = value
    return groups, unknown, foreign


def _flat_names(model: nn.Module) -> dict[str, str]:
    """Flattened name -> module name, for every Linear/Conv2d (both text-encoder namings; a
    UNet's layers by their original SGM names too, as kohya writes SDXL files)."""
    out: dict[str, str] = {}
    nested = hasattr(model, "text_model")
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name in layers:
        out[name.replace(".", "_")] = name
        if not nested and not name.startswith("text_model."):
            out["text_model_" + name.replace(".", "_")] = name
    return out | sgm_flat_aliases(layers)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def layer_name(model: nn.Module, key: str) -> str | None:
    """The module name of flattened ``key`` in ``model`` (None: no such layer)."""
    names = _CACHE.get(model)
    if names is None:
        names = _CACHE[model] = _flat_names(model)
    return names.get(key)


def rule(part: str, layer: str, metadata: Mapping, config: Mapping) -> AlphaRule:
    """kohya/LyCORIS: each layer's own ``alpha`` tensor, else the rank (scale 1)."""
    return AlphaRule(FAMILY)
