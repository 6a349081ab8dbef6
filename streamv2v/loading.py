"""Loading a model's parts through diffusers/transformers ``from_pretrained``: a hub id or a local
folder, safetensors only unless the user opts in, offline-capable, one clear error per failure."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from streamv2v.config import LoraSpec
from streamv2v.errors import ModelLoadError, UnsafeWeightsError
from streamv2v.families import family_of_unet

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

# diffusers passes huggingface_hub an argument it deprecated; the warning is noise to a user.
warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated")


def default_device() -> torch.device:
    """CUDA when present, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators, float32 on the CPU (CPU fp16 kernels are slow)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _fetch_hint(name: str) -> str:
    if Path(name).expanduser().exists():
        return f"check that {name} is a complete diffusers folder"
    where = "HF_HUB_OFFLINE is set, so only the local cache is used; " if _offline() else ""
    return (
        f"{where}fetch what the engine loads with `streamv2v models pull` (on a machine with "
        f"internet; `streamv2v models pull {name}` for this model alone), or pass a local "
        "diffusers folder"
    )


def refuse_pickle_only(folder: Path, allow_pickle: bool) -> None:
    """Refuse a local model folder with a component (unet/, vae/, ...) whose weights are pickle
    files only: unpickling can run arbitrary code."""
    if allow_pickle or not folder.is_dir():
        return
    for part in (folder, *(p for p in folder.rglob("*") if p.is_dir())):
        files = [p for p in part.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix in _PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise UnsafeWeightsError(
                f"{folder} holds only pickle weights in {part.relative_to(folder) or '.'} "
                f"({pickles[0].name}), which can run arbitrary code when loaded; convert them to "
                ".safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) if you "
                "trust the source"
            )


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1


def _load(part: str, name: str, loader, **kwargs):
    """Call one ``from_pretrained`` and turn whatever it raises into one ModelLoadError.

    Hub ids are tried from the local cache first: a daemon starting at boot neither waits on the
    network nor retries it when the model is already there.
    """
    local = Path(name).expanduser()
    if _looks_like_path(name) and not local.exists():
        raise ModelLoadError(f"{part} folder not found: {name} (no such file or directory)")
    try:
        if not local.exists() and not kwargs.get("local_files_only"):
            try:
                return loader(name, **dict(kwargs, local_files_only=True))
            except (OSError, ValueError):
                pass  # not cached (completely): go to the hub
        return loader(name, **kwargs)
    except UnsafeWeightsError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = _fetch_hint(name)
        if kwargs.get("use_safetensors") and "safetensors" in str(exc):
            hint += (
                "; if it only ships pickle (.bin) weights, convert them to .safetensors or opt in "
                "with allow_pickle=True (CLI: --allow-pickle) if you trust the source"
            )
        raise ModelLoadError(
            f"could not load the {part} of model {name!r}: {first.rstrip('.')}. {hint}"
        ) from exc


def load_components(
    model: str | os.PathLike,
    *,
    vae: str,
    loras: tuple[LoraSpec, ...] = (),
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
) -> dict:
    """UNet, VAE, text encoder(s), tokenizer(s) and scheduler of an SD-family model (SD1.5/2.1,
    or SDXL with its second encoder and tokenizer: streamv2v.families), on ``device``.

    The scheduler is always an :class:`~diffusers.LCMScheduler` built from the model's scheduler
    config (what the stream math needs). ``vae="model"`` keeps the model's own VAE; otherwise it is
    a hub id or folder of an AutoencoderTiny (TAESD) or AutoencoderKL; the default TAESD means
    the family's own (TAESDXL for SDXL).
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dlogging.disable_progress_bar()
    name = str(model)
    refuse_pickle_only(Path(name).expanduser(), allow_pickle)
    common = {"local_files_only": _offline()}
    weights = dict(common, use_safetensors=None if allow_pickle else True)
    # Load straight into the target dtype (no float32 copy of an fp16 model in memory).
    diff_w = dict(weights, torch_dtype=dtype)

    unet = _load("UNet", name, UNet2DConditionModel.from_pretrained, subfolder="unet", **diff_w)
    family = family_of_unet(unet.config)
    texts: dict = {}
    for part, tok in zip(family.text_parts, family.tokenizer_parts):
        # SDXL's second encoder projects its pooled output (CLIPTextModelWithProjection).
        cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
        label = part.replace("_", " ")
        load = cls.from_pretrained
        texts[part] = _load(label, name, load, subfolder=part, dtype=dtype, **weights)
        tok_label = tok.replace("_", " ")
        texts[tok] = _load(tok_label, name, CLIPTokenizer.from_pretrained, subfolder=tok)
    if family.is_sdxl:
        texts["force_zeros_for_empty_prompt"] = _force_zeros(name, common)
    vae = family.vae_for(vae)
    sched_cfg = _load("scheduler", name, LCMScheduler.load_config, subfolder="scheduler", **common)
    scheduler = LCMScheduler.from_config(sched_cfg)

    if vae == "model":
        vae_cls = AutoencoderKL
        cfg = _load("VAE config", name, AutoencoderKL.load_config, subfolder="vae", **common)
        if cfg.get("_class_name") == "AutoencoderTiny":
            vae_cls = AutoencoderTiny
        if cfg.get("force_upcast") and dtype == torch.float16 and family.fp16_vae:
            raise ModelLoadError(
                f"the {family.label} model {name!r}'s own VAE overflows in float16 (its config "
                f"says force_upcast): use vae={family.fp16_vae!r} (the fp16-fix VAE) or the "
                f"default tiny VAE ({family.tiny_vae})"
            )
        vae_model = _load("VAE", name, vae_cls.from_pretrained, subfolder="vae", **diff_w)
    else:
        refuse_pickle_only(Path(vae).expanduser(), allow_pickle)
        cfg = _load("VAE config", vae, AutoencoderTiny.load_config, **common)
        vae_cls = AutoencoderKL if cfg.get("_class_name") == "AutoencoderKL" else AutoencoderTiny
        vae_model = _load("VAE", vae, vae_cls.from_pretrained, **diff_w)

    if loras:
        parts = {"unet": unet, **{p: texts[p] for p in family.text_parts}}  # (SDXL: both)
        fuse_loras(parts, loras, allow_pickle=allow_pickle)

    for m in (unet, vae_model, *(texts[p] for p in family.text_parts)):
        m.to(device=device)  # (already in dtype: loaded with it)
        m.eval()
        m.requires_grad_(False)
    return {"unet": unet, "vae": vae_model, "scheduler": scheduler, **texts}


def _force_zeros(name: str, common: dict) -> bool:
    """SDXL pipelines' ``force_zeros_for_empty_prompt`` (model_index.json; diffusers' default:
    True): an empty negative prompt is all zeros rather than the encoded empty string."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name, **common)
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


def fuse_loras(models: dict, loras: tuple[LoraSpec, ...], *, allow_pickle: bool = False) -> None:
    """Fuse ``[engine] loras`` into the models' weights for good (UNet and text-encoder parts)
    through the reader and the sum that switch presets' LoRAs (streamv2v.adapters), so a file
    gives the same weights fused here as switched in. Fused, a LoRA costs nothing per frame."""
    from streamv2v.adapters import fuse, load_lora

    terms = []
    for spec in loras:
        weights = load_lora(
            spec.id, models, weight_name=spec.weight_name, allow_pickle=allow_pickle
        )
        terms.append((spec.id, spec.scale, weights))
        log.info("LoRA %s loaded (scale %s)", spec.id, spec.scale)
    fuse(models, terms)
