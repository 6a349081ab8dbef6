"""Which files an engine configuration loads: the one place that knows it.

``from_pretrained`` of a Stable Diffusion model reads, from a hub repository, ``model_index.json``
and five component folders: ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and (only
when ``vae = "model"``) ``vae/``; in each one its config files and ONE set of weights: the
safetensors of the configured variant (``*.fp16.safetensors``), else the plain ones, and pickle
weights (``.bin``) only when the user opts in. A separate VAE or ControlNet repository is one
such component at its root; a LoRA repository is one weights file (``weight_name``, else the one
diffusers would guess). Everything else a repository holds (the single-file ``.ckpt`` and
``.safetensors`` checkpoints at its root, ``safety_checker/``, flax and ONNX weights, ...) is
never read, so it is never fetched: for SD1.5 that is tens of GB.

This module is pure (no I/O): it turns configurations into :class:`Need` and a repository's
file listing into the files of a need. daemon/models/fetch.py asks the hub and the cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from daemon.errors import UserError

#: Components of an SD pipeline repository that the engine loads (vae only when "model").
PIPELINE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
#: The SDXL family's second text encoder and tokenizer (streamv2v.families.SDXL).
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
#: Parts whose folder must hold weights.
_WEIGHT_PARTS = ("unet", "text_encoder", "text_encoder_2", "vae", "")
_CONFIG_SUFFIXES = (".json", ".txt", ".model")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_PICKLE_SUFFIX = ".bin"
#: diffusers' LoRA file names and the substrings its guess skips.
_LORA_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_LORA_SKIP = ("scheduler", "optimizer", "checkpoint")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")

Kind = Literal["pipeline", "component", "lora"]


class FetchError(UserError):
    """A model cannot be fetched (or is not usable as the configuration asks): one line that
    names the model, what went wrong and what to do."""


@dataclass(frozen=True)
class Need:
    """One hub repository the engine reads, and how: an SD pipeline (its component folders),
    a single component at the repository's root (a VAE, a ControlNet), or a LoRA file."""

    repo: str
    kind: Kind
    own_vae: bool = False  # pipeline: the model's own VAE is loaded too
    weight_name: str | None = None  # lora: the file named by the configuration
    allow_pickle: bool = False
    variant: str | None = None

    @property
    def label(self) -> str:
        return {"pipeline": "model", "component": "component", "lora": "LoRA"}[self.kind]


def is_local(name: str) -> bool:
    """A folder or file on this machine rather than a hub id ("org/name")."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or name.count("/") != 1
        or os.path.exists(os.path.expanduser(name))
    )


def needs_of(
    model: str, configs: Iterable[Any], *, allow_pickle: bool = False, builtin: Iterable[str] = ()
) -> list[Need]:
    """The hub repositories that running ``model`` with each of ``configs`` (EngineConfigs:
    the daemon's and every preset's) reads, each once. Local folders and the built-in models
    need no fetch. LoRAs (``loras``) and ControlNets (``control`` entries with a ``model``) are
    read from the configurations when present (and a depth preprocessor's ``depth_model``);
    ``variant`` likewise."""
    skip = set(builtin)
    found: dict[tuple, Need] = {}

    def add(need: Need) -> None:
        if need.repo not in skip and not is_local(need.repo):
            key = (need.repo, need.kind, need.weight_name)
            old = found.get(key)
            if old is None or (need.own_vae and not old.own_vae):
                found[key] = need

    for cfg in configs:
        variant = getattr(cfg, "variant", None)
        vae = getattr(cfg, "vae", "model")
        add(Need(model, "pipeline", vae == "model", None, allow_pickle, variant))
        if vae != "model":
            add(Need(vae, "component", allow_pickle=allow_pickle))
        for lora in getattr(cfg, "loras", ()) or ():
            add(Need(lora.id, "lora", weight_name=lora.weight_name, allow_pickle=allow_pickle))
        for control in getattr(cfg, "control", ()) or ():
            name = getattr(control, "model", None)
            if isinstance(name, str) and name:
                add(Need(name, "component", allow_pickle=allow_pickle, variant=variant))
            depth = getattr(control, "depth_model", None)  # a transformers folder: same layout
            if isinstance(depth, str) and depth:
                add(Need(depth, "component", allow_pickle=allow_pickle))
    return list(found.values())


def select_files(need: Need, files: Mapping[str, int | None]) -> list[str]:
    """The files of ``need`` among a repository's ``files`` (path -> size): what the loader
    reads. Raises FetchError naming what is missing (a listing from the local cache that lacks
    a part means the model is not complete there)."""
    if need.kind == "lora":
        return [_lora_file(need, files)]
    parts: tuple[str, ...] = ("",)
    chosen: list[str] = []
    if need.kind == "pipeline":
        parts = PIPELINE_PARTS + (("vae",) if need.own_vae else ())
        if any(f.startswith("text_encoder_2/") for f in files):  # SDXL: its second CLIP too
            parts += SDXL_PARTS
        # Not read by the loader (it loads each part on its own), but it says what the folder
        # is: fetched when listed, not required (a cache filled part by part lacks it).
        if "model_index.json" in files:
            chosen.append("model_index.json")
    for part in parts:
        chosen += _part_files(need, part, files)
    return chosen


def _in_folder(files: Iterable[str], part: str) -> list[str]:
    prefix = f"{part}/" if part else ""
    return sorted(
        f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :] and f != prefix
    )


def _split(name: str) -> tuple[str, str | None, str] | None:
    """``diffusion_pytorch_model.fp16.safetensors`` -> (stem, variant, suffix), for weight files
    and their shard indexes; None for other files."""
    base = name.rsplit("/", 1)[-1]
    index = base.endswith(".json") and ".index" in base
    if index:  # x.safetensors.index.json / x.safetensors.index.fp16.json
        head, _, tail = base.partition(".index")
        stem_part, _, suffix = head.rpartition(".")
        tail_parts = tail.strip(".").split(".")
        variant = tail_parts[0] if len(tail_parts) == 2 else None
        pieces = stem_part.split(".")
        if len(pieces) == 2:  # diffusers-style x.fp16.safetensors.index.json
            stem_part, variant = pieces
        suffix = f".{suffix}.index"
    else:
        pieces = base.split(".")
        if len(pieces) < 2 or f".{pieces[-1]}" not in (".safetensors", _PICKLE_SUFFIX):
            return None
        suffix = f".{pieces[-1]}"
        stem_part = pieces[0]
        variant = ".".join(pieces[1:-1]) or None
        if variant and _SHARD.search(variant):  # x.fp16-00001-of-00002 / x-00001-of-00002.fp16
            variant = _SHARD.sub("", variant)
    stem = _SHARD.sub("", stem_part)
    if stem not in _WEIGHT_STEMS:
        return None
    return stem, variant, suffix


def _part_files(need: Need, part: str, files: Mapping[str, int | None]) -> list[str]:
    where = f"{need.repo}/{part}" if part else need.repo
    listed = _in_folder(files, part)
    if not listed:
        raise FetchError(
            f"{where}: no such folder in the repository (not a complete diffusers model; give "
            "the hub id or folder of an SD-family model in the diffusers layout)"
        )
    configs = [f for f in listed if f.endswith(_CONFIG_SUFFIXES) and _split(f) is None]
    weights = {f: s for f in listed if (s := _split(f)) is not None}
    if part not in _WEIGHT_PARTS:
        return configs
    suffixes = (".safetensors",) + ((_PICKLE_SUFFIX,) if need.allow_pickle else ())
    for suffix in suffixes:
        for variant in dict.fromkeys((need.variant, None)):
            same = [(f, s) for f, (_, v, s) in weights.items() if v == variant]
            picked = [f for f, s in same if s == suffix]
            index = [f for f, s in same if s == suffix + ".index"]
            if picked:
                return configs + index + picked
    if any(s[2] == _PICKLE_SUFFIX for s in weights.values()):
        raise FetchError(
            f"{where} ships only pickle weights (.bin), which can run arbitrary code when "
            "loaded: opt in with allow_pickle = true (CLI: --allow-pickle) if you trust the source"
        )
    raise FetchError(f"{where} has no weights (*.safetensors): not a complete model")


def _lora_file(need: Need, files: Mapping[str, int | None]) -> str:
    if need.weight_name:
        if need.weight_name not in files:
            raise FetchError(f"LoRA {need.repo} has no file {need.weight_name!r}")
        if not need.weight_name.endswith(".safetensors") and not need.allow_pickle:
            raise FetchError(
                f"LoRA {need.repo}/{need.weight_name} is a pickle file, which can run arbitrary "
                "code when loaded: opt in with allow_pickle = true if you trust the source"
            )
        return need.weight_name
    return guess_lora_file(need.repo, files, allow_pickle=need.allow_pickle)


def guess_lora_file(repo: str, files: Iterable[str], *, allow_pickle: bool = False) -> str:
    """The file diffusers' ``lora_state_dict`` picks in a repository when no ``weight_name`` is
    given (its own guess, which needs the hub: this one works on the cache's listing too)."""
    files = list(files)
    for suffix in (".safetensors",) + ((_PICKLE_SUFFIX,) if allow_pickle else ()):
        found = [f for f in files if f.endswith(suffix) and not any(s in f for s in _LORA_SKIP)]
        named = [f for f in found if f.endswith(_LORA_NAMES)]
        if named or found:
            return (named or found)[0]
    raise FetchError(f"LoRA {repo} has no .safetensors weights file")


def needs_of_daemon(config: Any, presets: Iterable[Any], models: Iterable[str] = ()) -> list[Need]:
    """What the daemon configured by ``config`` (a DaemonConfig) reads: its model with the
    ``[engine]`` settings and LoRAs and with every preset's (``presets``: objects with
    ``passthrough`` and ``engine_config(base)``); or, given ``models``, each of those models
    with the configured VAE only."""
    from pydantic import ValidationError

    from daemon.models.engine_config import engine_config
    from daemon.models.registry import BUILTIN_MODELS

    engine = config.engine
    pickle = engine.allow_pickle
    if models:
        found: list[Need] = []
        for model in models:
            cfg = engine_config(model, engine.settings, loras=())
            found += [n for n in needs_of(model, [cfg], allow_pickle=pickle) if n not in found]
        return found
    base = engine_config(engine.model, engine.settings, loras=engine.loras)
    configs = [base]
    for preset in presets:
        if not preset.passthrough:
            try:
                configs.append(preset.engine_config(base))
            except ValidationError:
                continue  # a preset that does not fit is refused when chosen, not fetched for
    return needs_of(engine.model, configs, allow_pickle=pickle, builtin=BUILTIN_MODELS)
