"""What the presets' style LoRAs hold in memory, worked out from file headers before any is read.

Switching LoRAs in place (:mod:`streamv2v.adapters`) keeps, besides each LoRA's factors, one
copy of the base weight of every layer some loaded LoRA touches (restores copy it back, bit for
bit). Both are priced here from what a safetensors header says (tensor names and shapes, no
tensor data) and the model's layer shapes (its own weight files' headers, or a live module):

- **base copies**: the union, over every LoRA the presets name, of the layers they touch, each
  ``numel`` x the model dtype's element size (a layer two LoRAs touch is copied once);
- **factors**, per LoRA: every tensor of the file that maps to a layer of the model (``.alpha``
  scalars excluded; LoHa/LoKr factors, Tucker cores and DoRA magnitudes included), ``numel`` x
  the model dtype's element size (they are cast to it when read).

Pure functions over names and shapes: the daemon reads the headers (daemon/models/preflight.py)
and adds the total to the memory preflight; :func:`device_shortfall` tells a ``lora_base =
"auto"`` engine whether the device can hold the base copies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from streamv2v.sgm_names import sgm_flat_aliases

#: A model part's layers: layer name -> its weight's shape.
Layers = Mapping[str, tuple[int, ...]]

#: File prefixes of each model part: kohya/LyCORIS (underscored paths), then diffusers/peft.
#: (SDXL's second text encoder: a part an SD1.5 model lacks, so none of its layers is found.)
_KOHYA = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_DOTTED = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
#: Old diffusers attention-processor names (``attn1.processor.to_q_lora``) -> the layer's.
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


@dataclass(frozen=True)
class LoraFootprint:
    """One LoRA file against one model: its factor elements and the layers it touches."""

    factor_elements: int  #: elements of the tensors that map to a layer (no alphas)
    touched: frozenset[tuple[str, str]]  #: (part, layer) of every layer it touches
    unmapped: tuple[str, ...] = ()  #: tensor names that map to no layer of the model

    def factor_bytes(self, dtype_bytes: int) -> int:
        return self.factor_elements * dtype_bytes


@dataclass(frozen=True)
class LoraMemory:
    """The memory a set of LoRAs holds on the device, in bytes."""

    base_bytes: int  #: base copies of the union of touched layers
    factor_bytes: dict[str, int] = field(default_factory=dict)  #: per LoRA name

    @property
    def total(self) -> int:
        return self.base_bytes + sum(self.factor_bytes.values())


def layer_index(layers: Layers) -> dict[str, str]:
    """Every name a file may give a layer (dotted, kohya's underscored, a UNet's original SGM
    name underscored; ``text_model.``, which transformers 4 files have and transformers 5
    models do not, dropped) -> its name."""
    index: dict[str, str] = {}
    kept = [name for name, shape in layers.items() if len(shape) in (2, 4)]  # Linear, Conv2d
    for name in kept:
        plain = name.removeprefix("text_model.")
        index[plain] = name
        index[plain.replace(".", "_")] = name
    return index | sgm_flat_aliases(kept)  # a UNet's layers by their SGM names (kohya SDXL)


def layers_of_header(header: Mapping[str, Mapping]) -> dict[str, tuple[int, ...]]:
    """A model's layers from its weight file's safetensors header (``<layer>.weight`` shapes)."""
    return {
        key.removesuffix(".weight"): tuple(entry["shape"])
        for key, entry in header.items()
        if key != "__metadata__" and key.endswith(".weight") and len(entry["shape"]) in (2, 4)
    }


def _part_of(key: str) -> tuple[str | None, str]:
    """(model part, the key without its part prefix); part None: a part this model lacks."""
    for prefix, part in (*_KOHYA.items(), *_DOTTED.items()):
        if key.startswith(prefix):
            return part, key[len(prefix) :]
    return "unet", key.removeprefix("base_model.model.")  # a bare peft file: the UNet's


def layer_of(key: str, indexes: Mapping[str, Mapping[str, str]]) -> tuple[str, str] | None:
    """(part, layer) a LoRA file's tensor belongs to: the longest dotted prefix of the key that
    names a layer of the model (whatever the suffix: ``lora_A.weight``, ``lora_down.weight``,
    ``hada_w1_a``, ``lokr_t2``, ``dora_scale``, ``lora_magnitude_vector``...); None when none
    does."""
    part, rest = _part_of(key)
    index = indexes.get(part) if part else None
    if not index:
        return None
    pieces = rest.split(".")
    for end in range(len(pieces) - 1, 0, -1):
        stem = ".".join(pieces[:end]).removeprefix("text_model.").removeprefix("text_model_")
        stem = _OLD_PROCESSOR.sub(lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]), stem)
        if stem in index:
            return part, index[stem]
    return None


def lora_footprint(header: Mapping[str, Mapping], models: Mapping[str, Layers]) -> LoraFootprint:
    """What the LoRA whose safetensors ``header`` is given holds on a model with the layers
    ``models`` (part -> layer -> weight shape)."""
    indexes = {part: layer_index(layers) for part, layers in models.items()}
    elements, touched, unmapped = 0, set(), []
    for key, entry in header.items():
        if key == "__metadata__" or key.endswith(".alpha"):
            continue
        where = layer_of(key, indexes)
        if where is None:
            unmapped.append(key)
            continue
        elements += math.prod(entry["shape"])
        touched.add(where)
    return LoraFootprint(elements, frozenset(touched), tuple(unmapped))


def loras_memory(
    footprints: Mapping[str, LoraFootprint], models: Mapping[str, Layers], dtype_bytes: int
) -> LoraMemory:
    """The bytes ``footprints`` (LoRA name -> footprint) hold together at ``dtype_bytes`` per
    element: base copies of the union of their layers, and each one's factors."""
    touched: set[tuple[str, str]] = set()
    for footprint in footprints.values():
        touched |= footprint.touched
    base = sum(math.prod(models[part][layer]) for part, layer in touched) * dtype_bytes
    return LoraMemory(
        base_bytes=base,
        factor_bytes={name: f.factor_bytes(dtype_bytes) for name, f in footprints.items()},
    )


def module_layers(module) -> dict[str, tuple[int, ...]]:
    """A live model's layers (name -> weight shape): its Linear and Conv2d modules."""
    from torch import nn

    return {
        name: tuple(m.weight.shape)
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def device_shortfall(need: int, device) -> int:
    """Bytes the device lacks to hold ``need`` more bytes now (0: they fit). What an engine with
    ``lora_base = "auto"`` asks before copying base weights: short, and they go to host memory.
    Only CUDA reports its free memory; elsewhere (CPU, MPS: the system's memory) 0."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, need - free)


def names_with_bytes(memory: LoraMemory, names: Iterable[str]) -> list[tuple[str, int]]:
    """(name, factor bytes) of ``names`` in ``memory``, the largest first."""
    return sorted(((n, memory.factor_bytes.get(n, 0)) for n in names), key=lambda x: -x[1])
