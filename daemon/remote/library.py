"""The presets ``serve`` runs for the sessions that bring no preset of their own (WHIP, the page):
the bundled presets that fit its model (the demo set for tiny-styles, the default set for other
models), plus the folder given with ``--presets DIR`` (its files win by name), re-read when they
change, as the daemon's are (daemon/styles/presets.py's :class:`PresetLibrary`).

A daemon's session sends its own presets over the data channel and never reads this library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import CONFIG_PRESET
from daemon.models.engine_config import engine_config
from daemon.models.registry import TINY_STYLES
from daemon.styles.presets import Preset, PresetLibrary, UnknownPreset, bundled_presets_dir
from streamv2v import EngineConfig


def serve_base(model: str) -> EngineConfig:
    """The engine settings a WHIP session runs on: the model's own size (tiny-styles' trained
    size), one step for the tiny model as its demo does; presets adjust from there."""
    if model == TINY_STYLES:
        return engine_config(model, steps=1)
    return engine_config(model)


class ServePresets:
    """Name -> preset for WHIP sessions; ``default`` is the one a session starts with."""

    def __init__(self, model: str, folder: Path | None, base: EngineConfig) -> None:
        which = "demo" if model == TINY_STYLES else "default"
        if folder is not None and not folder.is_dir():
            raise ValueError(f"--presets {folder}: not a folder of preset .toml files")
        placeholder = Preset(name=CONFIG_PRESET, passthrough=True)  # not offered (no prompt)
        self.library = PresetLibrary(
            folder, base, placeholder, bundled_dir=bundled_presets_dir(which)
        )
        self.base = base
        self.library.scan()

    def names(self) -> list[str]:
        self.library.scan()
        return [n for n in self.library.presets if n != CONFIG_PRESET]

    def get(self, name: str) -> Preset:
        """The preset called ``name``; UnknownPreset (naming the known ones) otherwise."""
        names = self.names()
        if name not in names:
            raise UnknownPreset(name, names)
        return self.library.get(name)

    @property
    def default(self) -> Preset:
        """The first style by name (a passthrough only when there is nothing else)."""
        names = self.names()
        styles = [n for n in names if not self.library.presets[n].passthrough]
        return self.library.get((styles or names)[0])

    def listing(self) -> list[dict[str, Any]]:
        presets = self.library.presets
        return [
            {
                "name": name,
                "description": presets[name].description,
                "passthrough": presets[name].passthrough,
            }
            for name in self.names()
        ]

    @property
    def errors(self) -> dict[str, str]:
        return self.library.errors
