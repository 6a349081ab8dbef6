"""The diffusers / peft reader: ``<part>.<module path>.<suffix>`` keys.

Files diffusers writes (``save_lora_weights``: ``unet.<module>.lora_A.weight``, the adapter
config as ``lora_adapter_metadata``), bare peft adapters (``save_lora_adapter``, a peft
``adapter_model.safetensors`` with its ``adapter_config.json``, keys with or without
``base_model.model.``), peft's LoHa/LoKr (``hada_*``/``lokr_*``), DoRA
(``lora_magnitude_vector``) and the older diffusers names (``lora.down.weight``,
``to_q_lora``, ``lora_linear_layer``, renamed with diffusers' own tables). Alpha is peft's:
``alpha_pattern`` (first pattern that matches the layer, as peft matches it), else
``lora_alpha`` (LoHa/LoKr: ``alpha``), else the rank; ``use_rslora``: alpha / sqrt(rank).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch
from torch import nn

from streamv2v.adapters.formats import (
    FOREIGN_PARTS,
    PEFT_PARTS,
    REFUSED,
    AlphaRule,
    split_suffix,
)

FAMILY = "peft"
_OLD = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight")


def _old_to_peft(part: str, key: str) -> str:
    """An older diffusers key (attention-processor or ``lora_linear_layer`` names) in peft
    naming, through diffusers' own key tables."""
    from diffusers.utils.state_dict_utils import (
        PEFT_STATE_DICT_MAPPINGS,
        StateDictType,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if part == "unet":
        (out,) = convert_unet_state_dict_to_peft({key: None})
        return out
    kind = StateDictType.DIFFUSERS if "lora_linear_layer" in key else StateDictType.DIFFUSERS_OLD
    (out,) = convert_state_dict({key: None}, PEFT_STATE_DICT_MAPPINGS[kind])
    return out


def group(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], dict[str, str], list[str]]:
    """``{(part, module path): {suffix: tensor}}``, unknown kinds (key -> suffix), and keys of
    parts no such engine has."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: dict[str, str] = {}
    foreign: list[str] = []
    for key, value in tensors.items():
        if key.startswith(tuple(FOREIGN_PARTS)):
            foreign.append(key)
            continue
        name = key.removeprefix("base_model.model.")
        part = next((p for p in PEFT_PARTS if name.startswith(f"{p}.")), None)
        if part is None:  # a bare adapter (save_lora_adapter, peft): the UNet's
            part, name = "unet", f"unet.{name}"
        name = name[len(part) + 1 :]
        if name.endswith(_OLD) or ".lora_linear_layer." in name:
            name = _old_to_peft(part, name)
        found = split_suffix(name)
        if found is None:
            unknown[key] = ""
            continue
        module, suffix = found
        if suffix in REFUSED:
            unknown[key] = suffix
            continue
        groups.setdefault((part, module), {})[suffix] = value
    return groups, unknown, foreign


def layer_name(model: nn.Module, key: str) -> str | None:
    """The module name of ``key`` in ``model``: files made on transformers 4 name the text
    encoder's layers ``text_model.*``; transformers 5's CLIPTextModel has no such level."""
    if key.startswith("text_model.") and not hasattr(model, "text_model"):
        key = key.removeprefix("text_model.")
    try:
        model.get_submodule(key)
    except AttributeError:
        return None
    return key


def _config(part: str, metadata: Mapping, config: Mapping) -> dict:
    """The part's peft adapter config: diffusers' ``lora_adapter_metadata`` (keys prefixed
    with the part), else a peft ``adapter_config.json`` (the UNet's)."""
    raw = metadata.get("lora_adapter_metadata")
    packed = json.loads(raw) if isinstance(raw, str) and raw else {}
    cfg = {k[len(part) + 1 :]: v for k, v in packed.items() if k.startswith(f"{part}.")}
    if not cfg and packed and not any("." in k for k in packed):
        cfg = dict(packed)
    if not cfg and part == "unet":
        cfg = dict(config)
    return cfg


def _pattern(pattern: object) -> dict:
    if isinstance(pattern, str):
        pattern = json.loads(pattern) if pattern else {}
    return dict(pattern or {})  # type: ignore[call-overload]


def _match(pattern: Mapping, layer: str) -> object | None:
    """peft's ``get_pattern_key``: the first key whose regex ends the layer's name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return None


def rule(part: str, layer: str, metadata: Mapping, config: Mapping) -> AlphaRule:
    """peft: alpha_pattern, else lora_alpha (alpha), else the rank; r from rank_pattern/r."""
    cfg = _config(part, metadata, config)
    alpha = _match(_pattern(cfg.get("alpha_pattern")), layer)
    if alpha is None:
        alpha = cfg.get("lora_alpha", cfg.get("alpha"))
    rank = _match(_pattern(cfg.get("rank_pattern")), layer)
    if rank is None:
        rank = cfg.get("r")
    return AlphaRule(
        FAMILY,
        None if alpha is None else float(alpha),  # type: ignore[arg-type]
        None if rank is None else int(rank),  # type: ignore[call-overload]
        bool(cfg.get("use_rslora")),
    )
