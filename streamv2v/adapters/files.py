"""Finding a style file and reading its tensors, safely: safetensors unless the user opts in.

A LoRA is named by a file, a folder (with ``weight_name``, or the one ``.safetensors`` file in
it) or a hub id (with ``weight_name``, default ``pytorch_lora_weights.safetensors``). A pickle
file (``.bin``/``.pt``/``.ckpt``/``.pth``/``.pkl``, by path or ``weight_name``) is refused unless
``allow_pickle``: loading one can run code. Anything else is opened as safetensors, whose
header (names, shapes, metadata) says what the file is; nothing is ever tried "in case".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamv2v.errors import ModelLoadError, UnsafeWeightsError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: The file diffusers looks for first in a LoRA folder or repo (the LCM-LoRA's).
DEFAULT_FILE = "pytorch_lora_weights.safetensors"
_NOT_WEIGHTS = ("optimizer", "scheduler", "checkpoint", "training_args")


class LoraError(ModelLoadError):
    """A LoRA file that cannot be used with this model (the message says which and why)."""


class UnsafeLoraError(LoraError, UnsafeWeightsError):
    """A pickle LoRA file, and the user did not opt in to pickle."""


@dataclass
class LoraFile:
    """A style file's tensors (on the CPU, as stored), its safetensors metadata, and a peft
    ``adapter_config.json`` found beside it (empty when none)."""

    name: str  #: as the user named it (for messages)
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict = field(default_factory=dict)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _refuse_pickle(name: str, file: str, allow_pickle: bool) -> None:
    if not allow_pickle and file.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeLoraError(
            f"LoRA {name!r}: {Path(file).name} is a pickle file ({Path(file).suffix}), refused: "
            "loading a pickle can run code. Use a .safetensors version of it, or set "
            "allow_pickle = true (CLI: --allow-pickle) if you trust its source"
        )


def _in_folder(name: str, folder: Path, allow_pickle: bool) -> Path:
    """The LoRA file of a folder: diffusers' default name, else its only weights file."""
    if (folder / DEFAULT_FILE).is_file():
        return folder / DEFAULT_FILE
    safe = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    safe = [n for n in safe if not any(w in n for w in _NOT_WEIGHTS)]
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if len(safe) == 1:
        return folder / safe[0]
    if not safe and len(pickles) == 1:
        _refuse_pickle(name, pickles[0], allow_pickle)
        return folder / pickles[0]
    found = ", ".join(safe + pickles) or "no weights file"
    raise LoraError(
        f"LoRA {name!r}: cannot tell which file of the folder is the LoRA ({found}); "
        "name it with weight_name"
    )


def _from_hub(name: str, weight_name: str | None) -> Path:
    from huggingface_hub import hf_hub_download, model_info

    filename = weight_name or DEFAULT_FILE
    try:
        return Path(hf_hub_download(name, filename, local_files_only=_offline()))
    except Exception as exc:  # missing repo/file, offline without cache, no network
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if weight_name is None and not _offline():
            try:  # (the repo's file list, as diffusers asks it)
                siblings = model_info(name).siblings or []
                files = [s.rfilename for s in siblings if s.rfilename.endswith(".safetensors")]
            except Exception:  # (the first error is the one to report)
                files = []
            files = [f for f in files if not any(w in f for w in _NOT_WEIGHTS)]
            if len(files) == 1:
                return _from_hub(name, files[0])
        where = "HF_HUB_OFFLINE is set and it is not cached" if _offline() else first
        raise LoraError(
            f"could not read LoRA {name!r} ({filename}): {where.rstrip('.')}. Fetch it with "
            "`streamv2v models pull`, or name a local file"
        ) from exc


def locate(source: str | os.PathLike, weight_name: str | None, allow_pickle: bool) -> Path:
    """The file a LoRA name points to (downloaded when a hub id), pickle refused first."""
    name = str(source)
    if weight_name:
        _refuse_pickle(name, weight_name, allow_pickle)
    path = Path(name).expanduser()
    if path.is_file():
        _refuse_pickle(name, path.name, allow_pickle)
        return path
    if path.is_dir():
        file = path / weight_name if weight_name else _in_folder(name, path, allow_pickle)
        if not file.is_file():
            raise LoraError(f"LoRA file not found: {file} (no such file in {path})")
        return file
    _refuse_pickle(name, name, allow_pickle)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoraError(f"LoRA file not found: {name} (no such file or directory)")
    return _from_hub(name, weight_name)


def _peft_config(path: Path) -> dict:
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return {}
    try:
        return dict(json.loads(config.read_text()))
    except (OSError, ValueError) as exc:
        raise LoraError(f"LoRA {path}: unreadable adapter_config.json beside it: {exc}") from exc


def read_file(
    source: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> LoraFile:
    """Locate and read a LoRA file (see the module docstring)."""
    name = str(source)
    path = locate(source, weight_name, allow_pickle)
    if path.name.lower().endswith(PICKLE_SUFFIXES):  # (allowed: the user opted in)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoraError(f"could not read LoRA {name!r}: {exc}") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise LoraError(f"could not read LoRA {name!r}: not a dict of tensors")
        return LoraFile(name, path, dict(state), {}, _peft_config(path))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a header safetensors cannot parse: not a safetensors file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LoraError(
            f"could not read LoRA {name!r}: {path.name} is not a readable safetensors file "
            f"({first.rstrip('.')})"
        ) from exc
    return LoraFile(name, path, tensors, metadata, _peft_config(path))
