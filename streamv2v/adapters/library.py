"""The style LoRAs of one engine: loaded once, switched in place (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

from torch import nn

from streamv2v.adapters.files import LoraError
from streamv2v.adapters.reader import LoraWeights, load_lora
from streamv2v.adapters.writer import BaseLocation, LoraSwitchError, Patcher, Term

LoraBase = Literal["device", "host", "auto"]


class UnknownLoraError(LoraError, KeyError):
    """A LoRA name that is not loaded (a KeyError too, for ``except KeyError`` callers)."""

    def __str__(self) -> str:  # (KeyError's own would quote the message)
        return str(self.args[0]) if self.args else ""


def choose_lora_base(
    setting: LoraBase, *, base_bytes: int, headroom_bytes: int | None
) -> BaseLocation:
    """Where base copies go: ``setting`` unless "auto", which picks "host" when the device's
    free memory for them (``headroom_bytes``, e.g. the memory estimate's margin; None:
    unknown) is smaller than ``base_bytes``, else "device"."""
    if setting != "auto":
        return setting
    if headroom_bytes is not None and base_bytes > headroom_bytes:
        return "host"
    return "device"


class AdapterLibrary:
    """The style LoRAs of one engine: loaded once, switched in place by :meth:`set_loras`.

    ``lora_base``: where the base copies of touched layers live: "device" (a restore is a
    device copy), "host" (host memory, page-locked when CUDA is available; a switch uploads
    from there) or "auto" (the device unless :attr:`headroom_bytes`, set by whoever knows the
    device's free memory, is smaller than the base copies).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        *,
        lora_base: LoraBase = "auto",
        headroom_bytes: int | None = None,
    ) -> None:
        #: The model parts (a second text encoder is one more entry).
        self.models: dict[str, nn.Module | None] = {
            "unet": unet,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,  # (SDXL's second; None elsewhere)
        }
        self.lora_base: LoraBase = lora_base
        #: Device memory free for base copies (None: unknown); "auto" reads it.
        self.headroom_bytes = headroom_bytes
        self._loras: dict[str, LoraWeights] = {}
        where = choose_lora_base(lora_base, base_bytes=0, headroom_bytes=headroom_bytes)
        self._patch = {part: Patcher(model, where) for part, model in self.models.items()}
        self.active: dict[str, float] = {}  #: the UNet's LoRA set now (name -> scale)
        self.rewrites = 0  #: layer rewrites since the start

    # ------------------------------------------------------------------ the set of LoRAs
    def __contains__(self, name: str) -> bool:
        return name in self._loras

    @property
    def names(self) -> list[str]:
        return list(self._loras)

    def get(self, name: str) -> LoraWeights:
        self._known([name])
        return self._loras[name]

    def _known(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._loras]
        if unknown:
            raise UnknownLoraError(
                f"no LoRA named {unknown[0]!r} is loaded; loaded: {self.names} "
                "(load it first: AdapterLibrary.load, or name it in a preset)"
            )

    def load(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> LoraWeights:
        """Read a LoRA file and add it as ``name`` (LoraError when it does not fit)."""
        weights = load_lora(source, self.models, weight_name=weight_name, allow_pickle=allow_pickle)
        self.add(name, weights)
        return weights

    def add(self, name: str, weights: LoraWeights) -> None:
        """Add (or replace) a LoRA; the base weights of the layers it touches (every part
        together) are copied now. All or nothing: a failure (out of memory) frees what this
        call copied and leaves the library as it was."""
        new: list[tuple[str, str]] = []
        old = self._loras.get(name)
        try:
            for part, layers in weights.parts.items():
                for layer in layers:
                    if self._patch[part].track(layer):
                        new.append((part, layer))
            self._loras[name] = weights
            if old is not None and name in self.active:  # the new file's weights now
                self._apply("unet", self.active)
        except Exception as err:
            if old is not None:
                self._loras[name] = old
            else:
                self._loras.pop(name, None)
            for part, layer in new:
                self._patch[part].forget(layer)
            if isinstance(err, LoraError):
                raise
            raise LoraError(f"could not add LoRA {name!r} ({err}); nothing changed") from err
        self._place()
        if old is not None:
            self._forget_unused()

    def remove(self, name: str) -> None:
        """Drop a LoRA: its layers are rewritten without it, and freed when none is left."""
        if name not in self._loras:
            return
        if name in self.active:
            rest = {n: s for n, s in self.active.items() if n != name}
            self._apply("unet", rest)
            self.active = rest
        del self._loras[name]
        self._forget_unused()

    def _forget_unused(self) -> None:
        for part, patch in self._patch.items():
            still = {layer for w in self._loras.values() for layer in w.part(part)}
            for layer in [layer for layer in patch.base if layer not in still]:
                patch.forget(layer)

    def retain(self, names: set[str]) -> list[str]:
        """Free every LoRA not in ``names``; returns the ones freed."""
        gone = [n for n in self._loras if n not in names]
        for name in gone:
            self.remove(name)
        return gone

    # ------------------------------------------------------------------ where base copies live
    def set_lora_base(self, setting: LoraBase, headroom_bytes: int | None = None) -> None:
        """Change where base copies live (moving the ones kept); see the class docstring."""
        self.lora_base, self.headroom_bytes = setting, headroom_bytes
        self._place()

    @property
    def base_location(self) -> BaseLocation:
        return self._patch["unet"].where

    def _place(self) -> None:
        base = sum(p.nbytes for p in self._patch.values())
        where = choose_lora_base(
            self.lora_base, base_bytes=base, headroom_bytes=self.headroom_bytes
        )
        for patch in self._patch.values():
            patch.place(where)

    # ------------------------------------------------------------------ switching
    def set_loras(self, scales: Mapping[str, float]) -> int:
        """Make the UNet's weights ``base + sum(scale * LoRA)`` for ``scales`` (name -> scale;
        0 or absent: off), rewriting only the layers whose set changed. Returns that count.
        On a failure part-way (out of memory) the previous set is restored and
        :class:`LoraSwitchError` says so; :attr:`active` keeps naming what the weights hold."""
        self._known(scales)
        wanted = {n: float(s) for n, s in scales.items() if s != 0.0}
        n = self._apply("unet", wanted)
        self.active = wanted
        return n

    def _apply(self, part: str, scales: Mapping[str, float]) -> int:
        wanted: dict[str, list[Term]] = {}
        for name in sorted(scales):
            for layer, delta in self._loras[name].part(part).items():
                wanted.setdefault(layer, []).append((name, scales[name], delta))
        try:
            n = self._patch[part].apply(wanted)
        except LoraSwitchError as err:
            if err.restored == "base" and part == "unet":
                self.active = {}
            raise
        self.rewrites += n
        return n

    @contextmanager
    def text_encoder_loras(self, scales: Mapping[str, float]) -> Iterator[None]:
        """The text encoder(s) with these LoRAs' text-encoder weights applied (for encoding a
        preset's prompt), restored to their base afterwards; every part but the UNet, together:
        a failure restores the parts already rewritten."""
        self._known(scales)
        parts = [p for p in self.models if p != "unet"]
        done: list[str] = []
        try:
            for part in parts:
                active = {n: s for n, s in scales.items() if s and self._loras[n].part(part)}
                if active:
                    done.append(part)
                    self._apply(part, active)
            yield
        finally:
            for part in done:
                self._apply(part, {})

    def has_text_encoder_weights(self, name: str) -> bool:
        weights = self.get(name)
        return any(weights.part(p) for p in self.models if p != "unet")

    # ------------------------------------------------------------------ memory
    def memory(self) -> dict[str, int]:
        """Bytes held, by this rule (the memory estimate computes the same from the files):

        - ``lora_bytes``: per loaded LoRA, every tensor of its file that maps to a model
          layer (LoRA/LoHa/LoKr factors, Tucker cores, DoRA magnitudes; not the alphas), as
          stored, in the model's dtype: numel x element size; summed over the LoRAs.
        - ``lora_base_bytes``: the base copies: the union over all loaded LoRAs of the
          weights they touch, numel x that weight's element size, wherever they are kept.
        - ``lora_base_device_bytes``: the part of ``lora_base_bytes`` kept on the device
          (0 with ``lora_base = "host"``).
        """
        base = sum(p.nbytes for p in self._patch.values())
        on_device = sum(p.nbytes for p in self._patch.values() if p.where == "device")
        return {
            "lora_bytes": sum(w.nbytes for w in self._loras.values()),
            "lora_base_bytes": base,
            "lora_base_device_bytes": on_device,
            "loras_loaded": len(self._loras),
        }

    def bytes_of(self, name: str) -> dict[str, int]:
        """One LoRA's factor bytes and the bytes of the weights it touches (its share of the
        base copies, counted as if it were loaded alone)."""
        weights = self.get(name)
        touched = 0
        for part, layers in weights.parts.items():
            model = self.models[part]
            for layer in layers if model is not None else ():
                weight = model.get_submodule(layer).weight
                touched += weight.numel() * weight.element_size()
        return {"factors": weights.nbytes, "base": touched}


__all__ = ["AdapterLibrary", "LoraSwitchError", "UnknownLoraError", "choose_lora_base"]
