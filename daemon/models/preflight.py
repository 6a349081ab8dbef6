"""The memory preflight: before the engine loads on CUDA, its estimated need (streamv2v.memory)
against the free memory, and one line naming what to lower when it will not fit.

The estimate reads only small files: the UNet's ``config.json``, the VAE's, and the headers of
the ``.safetensors`` weights (their tensor shapes), from a local folder or the Hugging Face
cache. Nothing is fetched here; a model not on disk yet is left to the loader. The presets'
style LoRAs are priced from their files' headers too (daemon/models/lora_sizes.py), before
any of them is read: their factors and the base copies of the layers they touch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.models.lora_sizes import LoraSizer, read_header, with_lora_bytes
from streamv2v import EngineConfig, LoraSpec
from streamv2v.families import family_of_unet
from streamv2v.lora_memory import LoraMemory
from streamv2v.memory import MemoryNeed, UNetLayout, config_changes, estimate_memory, fitting, gib

log = logging.getLogger("streamv2v")

#: The parts the engine loads from a model folder (the VAE may come from elsewhere).
_PARTS = ("unet", "text_encoder", "text_encoder_2")  # (the second: SDXL's; absent: 0)
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class MemoryShortage(Exception):
    """The configuration will not fit in the device's free memory; the message names what to
    lower, in one line."""


def folder_of(name: str, probe: str) -> Path | None:
    """The local folder of ``name`` (a folder, or a hub id in the cache) that holds
    ``probe``, or None when it is not on disk."""
    path = Path(name).expanduser()
    if (path / probe).is_file():
        return path
    if path.exists() or name.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, probe)
    if not isinstance(found, str):  # None, or the "known to be missing" marker
        return None
    return Path(found).parents[len(Path(probe).parts) - 1]


def safetensors_params(folder: Path) -> int:
    """Parameters in the ``.safetensors`` files of one model part, from their headers. Where a
    variant (``model.fp16.safetensors``) sits beside the plain file, only one set counts."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]
    total = 0
    for file in plain or files[:1]:
        for key, entry in read_header(file).items():
            if key != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def estimate_for(
    model: str,
    config: EngineConfig,
    dtype_bytes: int,
    captured: int = 1,
    loras: LoraMemory | None = None,
) -> MemoryNeed | None:
    """The estimate for ``model`` (a folder or a cached hub id) running ``config`` with the
    presets' ``loras`` (see :func:`lora_memory`); None when its files are not on disk."""
    root = folder_of(model, "unet/config.json")
    if root is None:
        return None
    unet_config = _json(root / "unet" / "config.json")
    layout = UNetLayout.from_config(unet_config)
    params = sum(safetensors_params(root / part) for part in _PARTS)
    vae_name = family_of_unet(unet_config).vae_for(config.vae)  # (SDXL: TAESDXL by default)
    vae = root / "vae" if vae_name == "model" else folder_of(vae_name, "config.json")
    vae_channels = 64  # TAESD's, when its folder is not on disk (it is a few MB)
    if vae is not None and (vae / "config.json").is_file():
        params += safetensors_params(vae)
        vae_channels = _full_resolution_channels(_json(vae / "config.json"))
    for spec in config.control:  # (a ControlNet not on disk yet counts as nothing)
        for name in (spec.model, spec.depth_model):
            folder = folder_of(name, "config.json") if name else None
            params += safetensors_params(folder) if folder is not None else 0
    need = estimate_memory(
        config,
        layout,
        weight_params=params,
        dtype_bytes=dtype_bytes,
        vae_channels=vae_channels,
        captured=captured,
        controlnets=len(config.control),
    )
    if loras is None:
        return need
    factors = sum(loras.factor_bytes.values())
    return dataclasses.replace(need, lora_factors=factors, lora_base=loras.base_bytes)


def lora_memory(model: str, loras: Mapping[str, LoraSpec], dtype_bytes: int) -> LoraMemory | None:
    """What the LoRAs ``loras`` (library name -> spec) hold on ``model`` at ``dtype_bytes``,
    from headers only; None when the model is not on disk."""
    root = folder_of(model, "unet/config.json")
    if root is None or not loras:
        return None
    return _sizer(root).memory(loras, dtype_bytes)


_SIZERS: dict[Path, LoraSizer] = {}  # model folder -> its sizer (headers read once)


def listing_with_lora_bytes(
    listing: dict[str, Any], model: str, dtype_bytes: int
) -> dict[str, Any]:
    """A preset listing with each LoRA's bytes on ``model`` (a folder or a cached hub id; see
    :func:`~daemon.models.lora_sizes.with_lora_bytes`); None bytes when it is not on disk."""
    root = folder_of(model, "unet/config.json")
    try:
        sizer = _sizer(root) if root is not None else None
    except (OSError, ValueError):  # a model folder with unreadable weights: the loader says
        sizer = None
    return with_lora_bytes(listing, sizer, dtype_bytes)


def _sizer(root: Path) -> LoraSizer:
    sizer = _SIZERS.get(root)
    if sizer is None:
        sizer = _SIZERS[root] = LoraSizer(root)
    return sizer


def _on_host(loras: LoraMemory | None) -> LoraMemory | None:
    """``loras`` with the base copies kept in host memory (``lora_base = "host"``)."""
    return None if loras is None else dataclasses.replace(loras, base_bytes=0)


def shortage(
    model: str,
    config: EngineConfig,
    *,
    dtype_bytes: int,
    free: int,
    total: int,
    device: str,
    captured: int = 1,
    loras: LoraMemory | None = None,
    lora_base: str = "device",
) -> str | None:
    """None when ``config`` (with the presets' ``loras``) fits in ``free`` bytes (or the model
    is not on disk); else one line: the need by part, what is free, and the settings that
    would fit. ``lora_base``: where the LoRAs' base copies live ("host": not on the device;
    "auto": on the device when they fit there, else in host memory)."""
    if lora_base == "host":
        loras = _on_host(loras)
    need = estimate_for(model, config, dtype_bytes, captured, loras)
    if need is None or need.total <= free:
        return None
    if lora_base == "auto" and loras is not None and loras.base_bytes:
        host = estimate_for(model, config, dtype_bytes, captured, _on_host(loras))
        if host is not None and host.total <= free:
            log.info(
                "memory: the LoRA base copies (%s) go to host memory (lora_base = auto): "
                "%s free on %s",
                gib(loras.base_bytes),
                gib(free),
                device,
            )
            return None

    def estimate(c: EngineConfig) -> MemoryNeed | None:
        return estimate_for(model, c, dtype_bytes, captured, loras)

    fits, _ = fitting(config, estimate, free)
    head = (
        f"not enough GPU memory on {device}: this configuration needs about {need.describe()}, "
        f"{gib(free)} of {gib(total)} is free"
    )
    if fits is None:
        if loras is not None and loras.total:
            biggest = max(loras.factor_bytes, key=lambda n: loras.factor_bytes[n], default="")
            return (
                f"{head}; the presets' LoRAs hold {gib(loras.total)} of it (base copies "
                f"{gib(loras.base_bytes)}, the largest: {biggest}): name fewer or smaller "
                "LoRAs in the presets (a LoCon touching every layer copies a second UNet), "
                "or keep the base copies in host memory"
            )
        return (
            f"{head}; even the lightest settings do not fit (the weights alone are "
            f"{gib(need.weights)}): free the GPU of other programs, or use a smaller model"
        )
    lowered = estimate(fits)
    assert lowered is not None
    changes = "; ".join(config_changes(config, fits))
    return f"{head}; lower [engine.settings] {changes} (about {gib(lowered.total)})"


def check_memory(
    model: str,
    config: EngineConfig,
    device: str | None,
    dtype: str | None,
    captured: int = 1,
    loras: Mapping[str, LoraSpec] | None = None,
    lora_base: str = "device",
) -> int | None:
    """On CUDA, raise :class:`MemoryShortage` when ``config`` with the presets' ``loras``
    (library name -> spec: the ones they switch in place) will not fit in the free memory; on
    any other device, nothing (the CPU's memory is the system's, MPS shares it).

    Returns the device memory left for the LoRAs' base copies once everything else is counted
    (what ``lora_base = "auto"`` decides by: :meth:`AdapterLibrary.set_lora_base`), or None
    where it is unknown (not CUDA: "auto" keeps them on the device)."""
    import torch

    from streamv2v.loading import default_device, default_dtype

    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(dev)
    dtype_bytes = _BYTES[dtype] if dtype else torch.finfo(default_dtype(dev)).bits // 8
    priced = lora_memory(model, loras or {}, dtype_bytes)
    problem = shortage(
        model,
        config,
        dtype_bytes=dtype_bytes,
        free=free,
        total=total,
        device=str(dev),
        captured=captured,
        loras=priced,
        lora_base=lora_base,
    )
    if problem is not None:
        raise MemoryShortage(problem)
    need = estimate_for(model, config, dtype_bytes, captured, priced)
    if need is not None:
        log.info("memory: needs about %s; %s free on %s", need.describe(), gib(free), dev)
    rest = estimate_for(model, config, dtype_bytes, captured, _on_host(priced))
    return None if rest is None else max(0, free - rest.total)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _full_resolution_channels(config: dict[str, Any]) -> int:
    """Channels of the VAE's feature maps at full resolution: TAESD's decoder channels, or the
    first of an AutoencoderKL's block channels."""
    channels = config.get("decoder_block_out_channels") or config.get("block_out_channels")
    return int(channels[-1] if "decoder_block_out_channels" in config else channels[0])
