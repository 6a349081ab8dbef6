"""The memory preflight: before the engine loads on CUDA, its estimated need (streamv2v.memory)
against the free memory, and one line naming what to lower when it will not fit.

The estimate reads only small files: the UNet's ``config.json``, the VAE's, and the headers of
the ``.safetensors`` weights (their tensor shapes), from a local folder or the Hugging Face
cache. Nothing is fetched here; a model not on disk yet is left to the loader.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from streamv2v import EngineConfig
from streamv2v.families import family_of_unet
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
        with file.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for key, entry in header.items():
            if key != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def estimate_for(
    model: str, config: EngineConfig, dtype_bytes: int, captured: int = 1
) -> MemoryNeed | None:
    """The estimate for ``model`` (a folder or a cached hub id) running ``config``; None when
    its files are not on disk."""
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
    return estimate_memory(
        config,
        layout,
        weight_params=params,
        dtype_bytes=dtype_bytes,
        vae_channels=vae_channels,
        captured=captured,
        controlnets=len(config.control),
    )


def shortage(
    model: str,
    config: EngineConfig,
    *,
    dtype_bytes: int,
    free: int,
    total: int,
    device: str,
    captured: int = 1,
) -> str | None:
    """None when ``config`` fits in ``free`` bytes (or the model is not on disk); else one line:
    the need by part, what is free, and the settings that would fit."""
    need = estimate_for(model, config, dtype_bytes, captured)
    if need is None or need.total <= free:
        return None
    fits, _ = fitting(config, lambda c: estimate_for(model, c, dtype_bytes, captured), free)
    head = (
        f"not enough GPU memory on {device}: this configuration needs about {need.describe()}, "
        f"{gib(free)} of {gib(total)} is free"
    )
    if fits is None:
        return (
            f"{head}; even the lightest settings do not fit (the weights alone are "
            f"{gib(need.weights)}): free the GPU of other programs, or use a smaller model"
        )
    lowered = estimate_for(model, fits, dtype_bytes, captured)
    assert lowered is not None
    changes = "; ".join(config_changes(config, fits))
    return f"{head}; lower [engine.settings] {changes} (about {gib(lowered.total)})"


def check_memory(
    model: str,
    config: EngineConfig,
    device: str | None,
    dtype: str | None,
    captured: int = 1,
) -> None:
    """On CUDA, raise :class:`MemoryShortage` when ``config`` will not fit in the free memory;
    on any other device, nothing (the CPU's memory is the system's, MPS shares it)."""
    import torch

    from streamv2v.loading import default_device, default_dtype

    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(dev)
    dtype_bytes = _BYTES[dtype] if dtype else torch.finfo(default_dtype(dev)).bits // 8
    problem = shortage(
        model,
        config,
        dtype_bytes=dtype_bytes,
        free=free,
        total=total,
        device=str(dev),
        captured=captured,
    )
    if problem is not None:
        raise MemoryShortage(problem)
    need = estimate_for(model, config, dtype_bytes, captured)
    if need is not None:
        log.info("memory: needs about %s; %s free on %s", need.describe(), gib(free), dev)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _full_resolution_channels(config: dict[str, Any]) -> int:
    """Channels of the VAE's feature maps at full resolution: TAESD's decoder channels, or the
    first of an AutoencoderKL's block channels."""
    channels = config.get("decoder_block_out_channels") or config.get("block_out_channels")
    return int(channels[-1] if "decoder_block_out_channels" in config else channels[0])
