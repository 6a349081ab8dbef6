"""The presets' style LoRAs: which a preset switches in, loading them when the library is read.

``[engine] loras`` (e.g. the LCM-LoRA) are fused into the base weights at load, their UNet and
text-encoder parts, through the same reader and the same sum as a switch (one file, one set of
weights). A preset's ``loras`` come on top of them, switched in place by the engine's adapter
library (:mod:`streamv2v.adapters`): a LoRA listed in both uses the preset's scale (the
difference is what is switched, in both parts). Every LoRA a preset names is loaded once, when
the preset library changes (as prompts are pre-encoded), never at a switch; a LoRA no preset
names any more is freed; a LoRA that fails to load marks only the presets that name it broken.
The files are read ahead in a thread of their own (:meth:`StyleLoras.read_ahead`), so the
engine thread only adds what was read (copies of the touched base weights) and never waits for
a disk. A switch whose rewrite fails (out of memory) leaves the previous style in place and
marks the preset (:meth:`StyleLoras.switch_failed`) until the library changes again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.styles.presets import Preset
from streamv2v import LoraSpec
from streamv2v.adapters import load_lora

log = logging.getLogger("streamv2v.presets")


def lora_name(spec: LoraSpec) -> str:
    """The adapter library's name of a LoRA: its id (and file inside it)."""
    return f"{spec.id}#{spec.weight_name}" if spec.weight_name else spec.id


def switched_loras(preset: Preset, fused: Iterable[LoraSpec]) -> dict[str, float]:
    """LoRA name -> the scale switched in for ``preset`` on weights with ``fused`` in them."""
    if preset.passthrough or not preset.loras:
        return {}
    base = {lora_name(s): s.scale for s in fused}
    out: dict[str, float] = {}
    for spec in preset.loras:
        name = lora_name(spec)
        out[name] = out.get(name, 0.0) + spec.scale - base.pop(name, 0.0)
    return {name: scale for name, scale in out.items() if scale != 0.0}


def _signature(spec: LoraSpec) -> tuple[int, int] | None:
    """A local file's (mtime, size), so an edited LoRA file is read again; None for hub ids."""
    path = Path(spec.id).expanduser()
    if path.is_dir() and spec.weight_name:
        path = path / spec.weight_name
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class StyleLoras:
    """The LoRAs the presets name, in one engine's adapter library (its thread only)."""

    def __init__(self, engine: Any, fused: tuple[LoraSpec, ...], allow_pickle: bool = False):
        self.engine = engine
        self.fused = fused
        self.allow_pickle = allow_pickle
        self._signatures: dict[str, tuple[int, int] | None] = {}
        self._failed: dict[str, tuple[tuple[int, int] | None, str]] = {}  # name -> (sig, error)
        #: preset name -> why it is broken (a LoRA of it failed to load, or its switch failed)
        self.errors: dict[str, str] = {}
        self._switch_failed: dict[str, str] = {}  # preset -> why (until the next sync)
        self._lock = threading.Lock()
        #: name -> (file signature, what read_ahead() read: the factors, or the error)
        self._read: dict[str, tuple[tuple[int, int] | None, Any]] = {}

    @property
    def adapters(self) -> Any:
        return self.engine.adapters

    def scales(self, preset: Preset) -> dict[str, float]:
        """What ``preset`` switches in (LoRAs that failed to load left out)."""
        return {n: s for n, s in switched_loras(preset, self.fused).items() if n in self.adapters}

    def sync(self, presets: Iterable[Preset], *, free: bool = True) -> dict[str, str]:
        """Load the LoRAs ``presets`` name that are not loaded (or whose file changed), free the
        ones no preset names (unless ``free`` is False: ``serve``, whose sessions each send
        their own presets); returns the broken presets (name -> error)."""
        presets = list(presets)
        wanted = self._wanted(presets)
        for name, spec in wanted.items():
            self._load(name, spec)
        with self._lock:  # read ahead for a library that changed again since
            for name in [n for n in self._read if n not in wanted]:
                del self._read[name]
        if free:
            self.adapters.retain({n for n in wanted if n in self.adapters})
        for name in [n for n in self._signatures if n not in self.adapters]:
            del self._signatures[name]
        errors = {}
        for preset in presets:
            failed = [n for n in switched_loras(preset, self.fused) if n in self._failed]
            if failed:
                reason = self._failed[failed[0]][1]
                errors[preset.name] = f"LoRA {failed[0]!r} failed to load: {reason}"
        for name in sorted(set(errors) - set(self.errors)):
            log.error("preset %s is broken: %s", name, errors[name])
        self._switch_failed.clear()  # (a changed library: a failed switch may be tried again)
        self.errors = errors
        return errors

    def switch_failed(self, preset: str, err: Exception) -> None:
        """A switch to ``preset`` failed part-way and the previous style was restored (the
        adapter library says so in ``err``): mark the preset until the library changes."""
        reason = f"its LoRA switch failed: {err}"
        if self.errors.get(preset) != reason:
            log.error("preset %s: %s", preset, reason)
        self._switch_failed[preset] = reason
        self.errors = {**self.errors, preset: reason}

    def _wanted(self, presets: Iterable[Preset]) -> dict[str, LoraSpec]:
        wanted: dict[str, LoraSpec] = {}
        for preset in presets:
            for spec in preset.loras or ():
                if lora_name(spec) in switched_loras(preset, self.fused):
                    wanted.setdefault(lora_name(spec), spec)
        return wanted

    def _current(self, name: str, signature: tuple[int, int] | None) -> bool:
        """``name`` is loaded from this file, or failed on it already (retried when it changes)."""
        if name in self.adapters and self._signatures.get(name) == signature:
            return True
        failed = self._failed.get(name)
        return failed is not None and failed[0] == signature

    def read_ahead(self, presets: Iterable[Preset]) -> int:
        """Read the files :meth:`sync` will load for ``presets`` (any thread: the adapter library
        is not changed here); returns how many were read."""
        read = 0
        for name, spec in self._wanted(presets).items():
            signature = _signature(spec)
            if self._current(name, signature):
                continue
            try:
                weights: Any = load_lora(
                    spec.id,
                    self.adapters.models,
                    weight_name=spec.weight_name,
                    allow_pickle=self.allow_pickle,
                )
            except Exception as err:  # any reader's failure: sync() marks the presets
                weights = err
            with self._lock:
                self._read[name] = (signature, weights)
            read += 1
        return read

    def _load(self, name: str, spec: LoraSpec) -> None:
        signature = _signature(spec)
        if self._current(name, signature):
            return
        with self._lock:
            ahead = self._read.pop(name, None)
        try:
            if ahead is not None and ahead[0] == signature:  # read by read_ahead(): add it
                if isinstance(ahead[1], Exception):
                    raise ahead[1]
                weights = ahead[1]
                self.adapters.add(name, weights)
            else:
                weights = self.adapters.load(
                    name, spec.id, weight_name=spec.weight_name, allow_pickle=self.allow_pickle
                )
        except Exception as err:  # any reader's failure: this LoRA only
            self._failed[name] = (signature, str(err))
            self.adapters.remove(name)
            return
        self._failed.pop(name, None)
        self._signatures[name] = signature
        log.info(
            "LoRA %s loaded: %d UNet + %d text-encoder layers, %.1f MB",
            name,
            len(weights.unet),
            len(weights.text_encoder),
            weights.nbytes / 1e6,
        )

    def text_encoder_key(self, scales: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
        """The part of a LoRA set that changes prompt embeddings (its text-encoder LoRAs)."""
        return tuple(
            sorted((n, s) for n, s in scales.items() if self.adapters.has_text_encoder_weights(n))
        )
