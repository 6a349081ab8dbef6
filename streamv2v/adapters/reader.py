"""A style file -> :class:`LoraWeights`: one delta description per layer, per model part.

The file's family is told from its keys (kohya/LyCORIS ``lora_unet_...`` names, else
diffusers/peft module paths); each family's reader groups the tensors by layer and gives the
alpha rule; :func:`~streamv2v.adapters.formats.build` makes each layer's delta. Every tensor is
checked against the model (layer exists, is a Linear/Conv2d, the factors make its shape) and
moved to the model's device and dtype. The same reader serves ``[engine] loras`` (fused at
load) and the presets' LoRAs (switched in place), so one file gives one set of weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from streamv2v.adapters import kohya, peft
from streamv2v.adapters.deltas import _Delta
from streamv2v.adapters.files import LoraError, LoraFile, read_file
from streamv2v.adapters.formats import FOREIGN_PARTS, build, refuse_kinds


@dataclass
class LoraWeights:
    """A loaded LoRA: its delta per layer name, per model part ("unet", "text_encoder")."""

    source: str
    parts: dict[str, dict[str, _Delta]] = field(default_factory=dict)

    @property
    def unet(self) -> dict[str, _Delta]:
        return self.parts.setdefault("unet", {})

    @property
    def text_encoder(self) -> dict[str, _Delta]:
        return self.parts.setdefault("text_encoder", {})

    def part(self, name: str) -> dict[str, _Delta]:
        return self.parts.get(name, {})

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (factors and DoRA magnitudes, in the model's dtype)."""
        return sum(d.nbytes for layers in self.parts.values() for d in layers.values())


def _module(model: nn.Module, part: str, layer: str | None, key: str, source: str) -> nn.Module:
    if layer is None:
        if key.startswith(("input_blocks", "middle_block", "output_blocks")):
            raise LoraError(
                f"LoRA {source!r} names a UNet layer this model does not have, by its "
                f"original SGM name ({key}): a LoRA for another base model (SD 1.x vs SDXL)?"
            )
        raise LoraError(
            f"LoRA {source!r} does not fit this model: it has no layer {part}.{key} "
            "(a LoRA for another base model, e.g. SDXL?)"
        )
    module = model.get_submodule(layer)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise LoraError(
            f"LoRA {source!r}: {part}.{layer} is a {type(module).__name__}, not a Linear/Conv2d"
        )
    return module


def lora_weights(file: LoraFile, models: Mapping[str, nn.Module | None]) -> LoraWeights:
    """The file's deltas, checked against ``models`` (part name -> model) and on each model's
    device and dtype."""
    source = file.name
    reader = kohya if kohya.claims(list(file.tensors)) else peft
    groups, unknown, foreign = reader.group(file.tensors)
    if foreign:
        prefix = next(p for p in FOREIGN_PARTS if foreign[0].startswith(p))
        raise LoraError(
            f"LoRA {source!r} is {FOREIGN_PARTS[prefix]} ({foreign[0]}): not for this model"
        )
    refuse_kinds(source, unknown)
    out = LoraWeights(source)
    for (part, key), tensors in sorted(groups.items()):
        model = models.get(part)
        if model is None:
            sdxl = " (an SDXL LoRA: use it with an SDXL model)" if part == "text_encoder_2" else ""
            raise LoraError(
                f"LoRA {source!r} has {part} weights but the engine has no {part}{sdxl}"
            )
        layer = reader.layer_name(model, key)
        module = _module(model, part, layer, key, source)
        assert layer is not None
        rule = reader.rule(part, layer, file.metadata, file.adapter_config)
        try:
            delta = build(tensors, rule, module.weight)
        except ValueError as exc:
            raise LoraError(
                f"LoRA {source!r} does not fit this model: {part}.{layer} "
                f"{tuple(module.weight.shape)}: {exc} (a LoRA for another base model?)"
            ) from None
        out.parts.setdefault(part, {})[layer] = delta.to(module.weight.device, module.weight.dtype)
    if not any(out.parts.values()):
        raise LoraError(f"LoRA {source!r} holds no LoRA weights")
    return out


def load_lora(
    source: str | os.PathLike,
    models: Mapping[str, nn.Module | None],
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
) -> LoraWeights:
    """Read a LoRA (file, folder or hub id) into deltas on the models' device and dtype."""
    return lora_weights(
        read_file(source, weight_name=weight_name, allow_pickle=allow_pickle), models
    )
