"""The presets' LoRAs priced before they are read: safetensors headers only (names and shapes).

The files' headers and the model's own weight headers give, through
:mod:`streamv2v.lora_memory`, each LoRA's factor bytes and the base copies of the layers they
touch, at the run dtype. The preflight adds them to the engine's estimate (so an 8 GB card with a
LoCon preset hears before the preset files are loaded); ``streamv2v presets`` and the control
page show each LoRA's bytes. A header is read once per file version (mtime, size).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamv2v import LoraSpec
from streamv2v.lora_memory import (
    Layers,
    LoraFootprint,
    LoraMemory,
    layers_of_header,
    lora_footprint,
    loras_memory,
)

#: The model parts a LoRA may touch, and each one's weight file inside the model folder.
_MODEL_FILES = {
    "unet": ("unet", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("text_encoder", "model.safetensors"),
    "text_encoder_2": ("text_encoder_2", "model.safetensors"),  # (SDXL's second)
}
#: The file names diffusers looks for in a LoRA folder or repo when none is named.
_DEFAULT_NAMES = ("pytorch_lora_weights.safetensors",)
#: A header larger than this is not a LoRA's (safetensors itself allows 100 MB).
_MAX_HEADER = 100 * 2**20


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor names, dtypes, shapes); no tensor
    data is read. ValueError for a file that is not safetensors."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except ValueError as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (no tensor table)")
    return header


def lora_file(spec: LoraSpec) -> Path | None:
    """The local ``.safetensors`` file of a LoRA: a file, a folder (with ``weight_name`` or the
    diffusers default name, or its only safetensors file), or a hub id in the cache; None
    when it is not on disk (or not safetensors: the price is then unknown)."""
    path = Path(spec.id).expanduser()
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    names = (spec.weight_name,) if spec.weight_name else _DEFAULT_NAMES
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        return found[0] if len(found) == 1 and not spec.weight_name else None
    if spec.id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        cached = try_to_load_from_cache(spec.id, name)
        if isinstance(cached, str):
            return Path(cached)
    return None


def model_layers(root: Path) -> dict[str, Layers]:
    """The Linear/Conv2d layers (name -> weight shape) of the model folder's UNet and text
    encoder, from their weight files' headers (a part not on disk: absent)."""
    out: dict[str, Layers] = {}
    for part, (folder, name) in _MODEL_FILES.items():
        file = root / folder / name
        if not file.is_file():
            variants = sorted((root / folder).glob("*.safetensors"))
            if not variants:
                continue
            file = variants[0]
        out[part] = layers_of_header(read_header(file))
    return out


class LoraSizer:
    """Footprints of LoRA files against one model, each header read once per file version."""

    def __init__(self, model_root: Path) -> None:
        self.layers = model_layers(model_root)
        self._cache: dict[Path, tuple[tuple[int, int], LoraFootprint]] = {}

    def footprint(self, spec: LoraSpec) -> LoraFootprint | None:
        """The LoRA's footprint; None when its file is not on disk or is no safetensors file."""
        path = lora_file(spec)
        if path is None:
            return None
        try:
            st = path.stat()
            signature = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == signature:
                return cached[1]
            footprint = lora_footprint(read_header(path), self.layers)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # (the loader names what is wrong with the file)
        self._cache[path] = (signature, footprint)
        return footprint

    def memory(self, specs: Mapping[str, LoraSpec], dtype_bytes: int) -> LoraMemory:
        """Bytes of the LoRAs ``specs`` (name -> spec) together: base copies of the union of the
        layers they touch, and each one's factors (a LoRA not on disk counts nothing)."""
        footprints = {}
        for name, spec in specs.items():
            footprint = self.footprint(spec)
            if footprint is not None:
                footprints[name] = footprint
        return loras_memory(footprints, self.layers, dtype_bytes)


def with_lora_bytes(
    listing: dict[str, Any], sizer: LoraSizer | None, dtype_bytes: int
) -> dict[str, Any]:
    """A preset listing (GET /presets) with each LoRA's factor bytes (``bytes``, None when
    unknown) and ``lora_base_bytes``: the base copies all the listed LoRAs hold together."""
    specs: dict[str, LoraSpec] = {}
    for row in listing["presets"]:
        for lora in row.get("loras") or ():
            spec = LoraSpec(id=lora["id"], weight_name=lora.get("weight_name"))
            specs.setdefault(_key(spec), spec)
    memory = sizer.memory(specs, dtype_bytes) if sizer is not None else None
    for row in listing["presets"]:
        for lora in row.get("loras") or ():
            key = _key(LoraSpec(id=lora["id"], weight_name=lora.get("weight_name")))
            lora["bytes"] = memory.factor_bytes.get(key) if memory is not None else None
    listing["lora_base_bytes"] = memory.base_bytes if memory is not None else None
    listing["lora_dtype_bytes"] = dtype_bytes
    return listing


def listing_dtype_bytes(engine: Any, dtype: str | None) -> int:
    """Bytes per element the LoRAs take: the running engine's dtype, else the configured one,
    else float16 (the accelerators' default)."""
    itemsize = getattr(getattr(engine, "dtype", None), "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    return {"float32": 4}.get(dtype or "", 2)


def _key(spec: LoraSpec) -> str:
    return f"{spec.id}#{spec.weight_name}" if spec.weight_name else spec.id
