"""Style presets: TOML files validated by pydantic, hot-reloaded, and the one active preset.

The bundled presets (the ``presets`` folder, installed with the package) are always there; a user
folder adds to them and replaces a bundled preset of the same name. A file that fails to parse or
validate is reported once (file, line, key, reason) and the last good version of it stays in use.
:class:`PresetManager` holds the active preset: every source of switches (OBS, hotkeys, the
control API) goes through it, and the engine thread reads it between frames.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.config import CONFIG_PRESET
from daemon.config_text import dotted
from daemon.integrations.hotkeys import check_combo
from daemon.masking.runtime import runtime_problem
from streamv2v import BankConfig, EngineConfig, LoraSpec
from streamv2v.config import SCHEDULE_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("streamv2v.presets")

#: Names the control API and the CLI understand besides preset names.
CYCLE = {"next": 1, "prev": -1}
NOT_REGULAR = "not a regular file (a FIFO, socket or device?); skipped"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Preset(BaseModel):
    """One style. Engine settings left unset (None) keep the daemon's ``[engine.settings]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="Defaults to the file name without .toml.")
    description: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    passthrough: bool = Field(False, description="Show the camera as it is (no model).")
    strength: float | None = Field(None, gt=0.0, le=1.0)
    min_steps: int | None = Field(None, ge=1, le=SCHEDULE_STEPS)
    max_steps: int | None = Field(None, ge=1, le=SCHEDULE_STEPS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance: Literal["none", "self", "initialize", "full"] | None = None
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0)
    guidance_delta: float | None = Field(None, ge=0.0, le=2.0)
    loras: tuple[LoraSpec, ...] | None = Field(
        None,
        description="Style LoRAs added to engine.loras while active, switched in place "
        "(no reload, blended over transition_frames); one listed in both takes this scale.",
    )
    bank: BankConfig | None = Field(
        None, description="Replaces the engine's bank settings; keys left out take the defaults."
    )
    control_scales: tuple[float, ...] | dict[str, float] | None = Field(
        None,
        description="ControlNet scales while active (engine control): one per ControlNet, or a "
        "table by name or index; 0 turns one off without a reload. Blends over the transition.",
    )
    transition_frames: int = Field(8, ge=0, le=600, description="Frames the prompt blend takes.")
    bank_on_switch: Literal["reset", "keep"] = Field(
        "reset", description="reset: the old style's features stop steering attention at once."
    )
    mask: Literal["none", "person", "background"] = Field(
        "none", description="What gets the style; the rest is the camera as it is (extra 'mask')."
    )
    mask_feather: int = Field(4, ge=0, le=64, description="Soft mask edge, in output pixels.")
    mask_smoothing: float = Field(
        0.9, ge=0.0, le=0.95, description="Mask smoothing over time (0: off): a steadier edge."
    )
    hotkey: str = ""
    obs_scenes: tuple[str, ...] = Field((), description="Scene names or globs that select it.")

    @field_validator("hotkey")
    @classmethod
    def _combo(cls, value: str) -> str:
        return check_combo(value) if value else value

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        if not self.passthrough and not self.prompt.strip():
            raise ValueError("prompt is empty: give the style's prompt, or passthrough = true")
        scales = self.control_scales
        values = scales.values() if isinstance(scales, dict) else scales or ()
        if any(not 0.0 <= v <= 4.0 for v in values):
            raise ValueError(f"control_scales {scales} must each be in 0..4 (0: that one off)")
        lo, hi = self.min_steps, self.max_steps
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_steps ({lo}) is more than max_steps ({hi})")
        return self

    def step_range(self, base: EngineConfig) -> tuple[int, int]:
        """The steps this preset allows: the latency controller picks within it (and within
        its own min/max); with the controller off, ``base.steps`` is clamped into it."""
        lo = self.min_steps or 1
        hi = self.max_steps or SCHEDULE_STEPS
        return lo, max(lo, hi)

    def engine_config(self, base: EngineConfig, steps: int | None = None) -> EngineConfig:
        """``base`` with this preset's settings; ``steps`` (default: base's, clamped into the
        preset's range). Raises ValidationError when they do not fit together."""
        lo, hi = self.step_range(base)
        steps = min(max(steps if steps is not None else base.steps, lo), hi)
        data = base.model_dump()
        data.pop("steps")  # set below, after t_index_list
        overrides = {
            "strength": self.strength,
            "seed": self.seed,
            "guidance": self.guidance,
            "guidance_scale": self.guidance_scale,
            "guidance_delta": self.guidance_delta,
            "loras": self.loras,
            "bank": self.bank,
        }
        data.update({k: v for k, v in overrides.items() if v is not None})
        if self.strength is not None or base.t_index_list is None or steps != base.steps:
            data["t_index_list"] = None  # derived from strength and steps
        else:
            steps = len(base.t_index_list)
        config = EngineConfig.model_validate({**data, "steps": steps})
        # Scales for ControlNets the engine has not loaded have nothing to act on.
        if self.control_scales is not None and config.control:
            config = config.with_control_scales(self.control_scales)
        return config


def config_preset(prompt: str, negative_prompt: str) -> Preset:
    """The preset made of the configuration's ``[engine]`` prompt (always present)."""
    return Preset(
        name=CONFIG_PRESET,
        description="the [engine] prompt of the configuration",
        prompt=prompt or " ",
        negative_prompt=negative_prompt,
    )


def bundled_presets_dir(which: str = "default") -> Path:
    """The presets installed with the package: the default set, or the demo model's."""
    folder = Path(str(resources.files("presets")))
    return folder / which if which in ("demo", "demo-sdxl") else folder


@dataclass
class _File:
    """A preset file as last seen: its stat signature, last good preset and current error."""

    signature: tuple[int, int]
    preset: Preset | None = None
    error: str | None = None


class PresetLibrary:
    """All presets by name: the config preset, the bundled ones, then the user's (which win).

    :meth:`scan` re-reads changed files; it is cheap (one stat per file) and thread-safe.
    """

    def __init__(
        self,
        user_dir: Path | None,
        base: EngineConfig,
        config: Preset,
        *,
        bundled_dir: Path | None = None,
        scene_map: dict[str, str] | None = None,
    ) -> None:
        self.dirs = [bundled_dir or bundled_presets_dir(), *([user_dir] if user_dir else [])]
        self.base = base
        self.scene_map = dict(scene_map or {})
        self._config = config
        self._files: dict[Path, _File] = {}
        self._lock = threading.Lock()
        self._presets: dict[str, Preset] = {config.name: config}
        self._ordered: Mapping[str, Preset] = MappingProxyType(dict(self._presets))
        self._origin: dict[str, Path | None] = {config.name: None}
        self._broken: dict[str, str] = {}  # preset name -> why (its LoRA failed to load)
        self.version = 0

    # ------------------------------------------------------------------ reading files
    def scan(self) -> bool:
        """Pick up added, changed and removed files; True when the set of presets changed."""
        with self._lock:
            seen: list[Path] = []
            for folder in self.dirs:
                if folder.is_dir():
                    seen.extend(sorted(folder.glob("*.toml")))
            changed = False
            for path in [p for p in self._files if p not in seen]:
                log.info("preset file removed: %s", path)
                del self._files[path]
                changed = True
            for path in seen:
                changed |= self._refresh(path)
            return self._compose() if changed else False

    def _refresh(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False  # removed between the listing and now: the next scan drops it
        signature = (st.st_mtime_ns, st.st_size)
        known = self._files.get(path)
        if known is not None and known.signature == signature:
            return False
        entry = known or _File(signature)
        entry.signature = signature
        try:
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block the read
                raise PresetError(f"{path}: {NOT_REGULAR}")
            entry.preset, entry.error = load_preset_file(path), None
        except PresetError as err:
            entry.error = str(err)
            kept = "keeping its last good version" if entry.preset else "not loaded"
            log.error("%s (%s)", err, kept)
        self._files[path] = entry
        return True

    def _compose(self) -> bool:
        presets: dict[str, Preset] = {self._config.name: self._config}
        origin: dict[str, Path | None] = {self._config.name: None}
        for path, entry in self._files.items():  # bundled first, then the user folder
            preset = entry.preset
            if preset is None:
                continue
            if preset.name == CONFIG_PRESET:
                entry.error = f"{path}: name {CONFIG_PRESET!r} is reserved for the [engine] prompt"
                log.error("%s; this file is ignored", entry.error)
                continue
            if preset.name in presets and origin[preset.name] is not None:
                first = origin[preset.name]
                if first is not None and first.parent == path.parent:
                    entry.error = f"{path}: name {preset.name!r} is already used by {first.name}"
                    log.error("%s; this file is ignored", entry.error)
                    continue
            presets[preset.name], origin[preset.name] = preset, path
        changed = presets != self._presets
        if changed:
            self._presets, self._origin = presets, origin
            rest = sorted(n for n in presets if n != CONFIG_PRESET)
            ordered = {n: presets[n] for n in [CONFIG_PRESET, *rest]}
            self._ordered = MappingProxyType(ordered)
            self.version += 1
        return changed

    def set_config_preset(self, config: Preset) -> None:
        """A new ``[engine]`` prompt (configuration reloaded)."""
        with self._lock:
            self._config = config
            self._compose()

    def mark_broken(self, broken: Mapping[str, str]) -> None:
        """The presets that cannot run (name -> why, e.g. a LoRA that failed to load), as the
        engine found when it loaded their LoRAs; shown with the file errors."""
        with self._lock:
            self._broken = dict(broken)

    def broken(self, name: str) -> str | None:
        with self._lock:
            return self._broken.get(name)

    # ------------------------------------------------------------------ queries
    @property
    def presets(self) -> Mapping[str, Preset]:
        """Name -> preset: the config preset first, then by name. Read every frame by the
        engine thread, so it is built once per change, and replaced (never mutated)."""
        return self._ordered

    def origin(self, name: str) -> Path | None:
        with self._lock:
            return self._origin.get(name)

    @property
    def errors(self) -> dict[str, str]:
        """File -> the reason it is not (or no longer) used as written."""
        with self._lock:
            errors = {str(p): e.error for p, e in self._files.items() if e.error}
            for name, why in self._broken.items():
                origin = self._origin.get(name)
                errors[str(origin) if origin else name] = f"preset {name} is broken: {why}"
            return errors

    def get(self, name: str) -> Preset:
        presets = self.presets
        if name not in presets:
            raise UnknownPreset(name, list(presets))
        return presets[name]

    def preset_for_scene(self, scene: str) -> str | None:
        """The preset an OBS scene selects: exact names first (configuration, then presets),
        then globs in the same order; None when no rule matches."""
        rules = list(self.scene_map.items())
        rules += [(pattern, name) for name, p in self.presets.items() for pattern in p.obs_scenes]
        for exact in (True, False):
            for pattern, name in rules:
                hit = pattern == scene if exact else fnmatch.fnmatchcase(scene, pattern)
                if hit and name in self.presets:
                    return name
        return None


class UnknownPreset(KeyError):
    """A switch to a name no preset has; the message lists the names there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"no preset named {name!r}; there are: {', '.join(known)}"

    def __str__(self) -> str:
        return self.message


class BrokenPreset(UnknownPreset):
    """A switch to a preset that cannot run (its LoRA failed to load)."""

    def __init__(self, name: str, why: str) -> None:
        KeyError.__init__(self, name)
        self.message = f"preset {name!r} is broken: {why}; fix it and the preset file reloads"


class PresetError(Exception):
    """A preset file that cannot be used: ``FILE: line N: KEY: reason``."""


def load_preset_file(path: Path) -> Preset:
    """Read and validate one preset file; PresetError names the file, line, key and reason."""
    try:
        text = _read_regular(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read: {exc}") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    for lora in data.get("loras") or ():  # a relative LoRA path: next to the preset file
        lid = lora.get("id") if isinstance(lora, dict) else None
        if isinstance(lid, str) and lid.startswith(("./", "../")):
            lora["id"] = str((path.parent / lid).resolve())
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False)[:3]:
            loc = tuple(error["loc"])
            line = _line_of(text, loc)
            where = f"line {line}: " if line else ""
            key = f"{dotted(loc)}: " if loc else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}{key}{message}")
        raise PresetError(f"{path}: {'; '.join(problems)}") from None
    problem = runtime_problem() if preset.mask != "none" else None
    if problem is not None:  # this preset is marked broken; the others keep working
        line = _line_of(text, ("mask",))
        raise PresetError(f"{path}: {f'line {line}: ' if line else ''}mask: {problem}")
    return preset


def _read_regular(path: Path) -> str:
    """The file's text; a FIFO, socket or device is refused unopened. The open is non-blocking
    and checked again on the descriptor, so one swapped in after the stat() cannot block."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise PresetError(f"{path}: {NOT_REGULAR}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PresetError(f"{path}: {NOT_REGULAR}")
        return file.read().decode("utf-8")


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line where the key at ``loc`` is written, if it can be found."""
    keys = [str(p) for p in loc if not isinstance(p, int)]
    if not keys:
        return None
    table, key = ".".join(keys[:-1]), keys[-1]
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if header:
            current = header.group(1)
            if current == ".".join(keys):
                return number  # the whole table is the problem
            continue
        if current == table and re.match(rf"{re.escape(key)}\s*=", stripped):
            return number
        if current == "" and table and re.match(rf"{re.escape(keys[0])}\s*=", stripped):
            return number  # an inline table
    return None


class PresetManager:
    """The active preset, switched from any thread (OBS, hotkeys, control API, CLI).

    A switch only records the choice; the engine thread applies it between frames. The preset
    object itself is looked up again on each read, so an edited file takes effect.
    """

    def __init__(self, library: PresetLibrary, startup: str) -> None:
        self.library = library
        library.get(startup)  # UnknownPreset here: the configuration names a missing preset
        self.startup = startup
        self._active = startup
        self._lock = threading.Lock()
        self.switches = 0

    @property
    def active(self) -> str:
        with self._lock:
            presets = self.library.presets
            if self._active not in presets:
                # Back to the preset the daemon started with, while it is there.
                fallback = self.startup if self.startup in presets else CONFIG_PRESET
                log.warning("preset %r is gone: back to %r", self._active, fallback)
                self._active = fallback
            return self._active

    def current(self) -> Preset:
        """The active preset as its file says now."""
        return self.library.get(self.active)

    def select(self, target: str, reason: str) -> str:
        """Make ``target`` (a name, "next" or "prev") active; returns the name. Raises
        UnknownPreset for a name no preset has."""
        names = list(self.library.presets)
        with self._lock:
            if target in CYCLE and target not in names:
                current = names.index(self._active) if self._active in names else 0
                target = names[(current + CYCLE[target]) % len(names)]
            elif target not in names:
                raise UnknownPreset(target, names)
            why = self.library.broken(target)
            if why is not None:
                raise BrokenPreset(target, why)
            if target != self._active:
                log.info("preset: %s -> %s (%s)", self._active, target, reason)
                self._active = target
                self.switches += 1
        return target

    def listing(self) -> list[dict[str, Any]]:
        """What ``streamv2v presets`` and GET /presets show."""
        active = self.active
        rows = []
        for name, preset in self.library.presets.items():
            origin = self.library.origin(name)
            rows.append(
                {
                    "name": name,
                    "active": name == active,
                    "description": preset.description,
                    "passthrough": preset.passthrough,
                    "mask": preset.mask,
                    "hotkey": preset.hotkey,
                    "obs_scenes": list(preset.obs_scenes),
                    "file": str(origin) if origin else None,
                    "error": self.library.broken(name),
                    "loras": [
                        {"id": s.id, "weight_name": s.weight_name, "scale": s.scale}
                        for s in preset.loras or ()
                    ],
                }
            )
        return rows
