"""The in-place writer: the one place a LoRA set becomes a layer's weight.

For each layer a loaded LoRA touches, a copy of its base weight is kept (on the device, or in
host memory: ``lora_base``) and the weight is rewritten **in its own storage**:

    W = W_base + sum_i term_i(W_base, strength_i)      (float32, cast to the weight's dtype once)

so a compiled graph or a captured CUDA graph reads the new values with no recompile. Each term
is computed from the base copy (DoRA's norms too), never from what the layer holds now;
restoring copies the base back (never a subtraction), bit for bit. Any stride works (a
``channels_last`` UNet): the sum is computed in a contiguous buffer and ``copy_`` writes it
through the weight's own strides. A rewrite that fails part-way (out of memory) puts back the
previous set of every layer it had rewritten, then raises :class:`LoraSwitchError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from streamv2v.adapters.deltas import _Delta
from streamv2v.adapters.files import LoraError

BaseLocation = Literal["device", "host"]
#: One LoRA on one layer: (name, strength, delta).
Term = tuple[str, float, _Delta]


class LoraSwitchError(LoraError):
    """A rewrite failed part-way; ``restored`` says what the weights hold now: "previous"
    (the set before the call, exactly) or "base" (no LoRA: restoring the previous set failed
    too)."""

    def __init__(self, message: str, restored: str) -> None:
        super().__init__(message)
        self.restored = restored


def merged(base: torch.Tensor, terms: Sequence[Term], device: torch.device) -> torch.Tensor:
    """``base + sum of terms`` in float32 on ``device`` (a new contiguous tensor)."""
    acc = torch.empty(base.shape, dtype=torch.float32, device=device)
    acc.copy_(base, non_blocking=True)  # (any stride in, contiguous float32 out)
    base32 = acc.clone() if any(d.needs_base for _, _, d in terms) else None
    for _, strength, delta in terms:  # (base32 is never written)
        delta.add_to(acc, base32, strength)
    return acc


def _key(terms: Sequence[Term]) -> tuple:
    # (the delta's identity too: a LoRA re-read from an edited file is a new set)
    return tuple((name, strength, id(delta)) for name, strength, delta in terms)


class Patcher:
    """The touched layers of one model: their base copies and the LoRA set each one holds."""

    def __init__(self, model: nn.Module | None, where: BaseLocation = "device") -> None:
        self.model = model
        self.where: BaseLocation = where
        self.base: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.held: dict[str, tuple[Term, ...]] = {}  # layer -> applied set
        #: A test's hook: called before each layer's rewrite (fault injection).
        self.before_write = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def _copy(self, weight: torch.Tensor, where: BaseLocation) -> torch.Tensor:
        if where == "device":
            return weight.detach().clone()
        pin = torch.cuda.is_available()  # (page-locked: uploads at full speed, async)
        out = torch.empty_strided(
            weight.shape, weight.stride(), dtype=weight.dtype, device="cpu", pin_memory=pin
        )
        return out.copy_(weight.detach())

    def track(self, layer: str) -> bool:
        """Keep a base copy of ``layer``; False when it was kept already."""
        if layer in self.base or self.model is None:
            return False
        weight = self.model.get_submodule(layer).weight
        self.base[layer] = self._copy(weight, self.where)
        self.params[layer] = weight
        self.held[layer] = ()
        return True

    def forget(self, layer: str) -> None:
        """No loaded LoRA touches ``layer`` any more: restore it and free its base copy."""
        if self.held.get(layer):
            with torch.no_grad():
                self.params[layer].copy_(self.base[layer])
        for d in (self.base, self.params, self.held):
            d.pop(layer, None)

    def place(self, where: BaseLocation) -> None:
        """Move the base copies to the device or to (pinned) host memory."""
        if where == self.where:
            return
        for layer, base in self.base.items():
            if where == "device":
                self.base[layer] = base.to(self.params[layer].device, copy=True)
            else:
                self.base[layer] = self._copy(base, "host")
        self.where = where

    @torch.no_grad()
    def _write(self, layer: str, terms: Sequence[Term]) -> None:
        if self.before_write is not None:
            self.before_write(layer)
        weight, base = self.params[layer], self.base[layer]
        if not terms:
            weight.copy_(base, non_blocking=True)  # exact: the base comes back bit for bit
        else:
            weight.copy_(merged(base, terms, weight.device))

    def apply(self, wanted: Mapping[str, Sequence[Term]]) -> int:
        """Give every tracked layer the set in ``wanted`` (absent: the base); returns how many
        layers were rewritten. On a failure, every layer gets its previous set back."""
        done: list[tuple[str, tuple[Term, ...]]] = []
        try:
            for layer in self.base:
                terms = tuple(wanted.get(layer, ()))
                if _key(terms) == _key(self.held[layer]):
                    continue
                previous = self.held[layer]
                self._write(layer, terms)
                self.held[layer] = terms
                done.append((layer, previous))
        except Exception as err:
            raise self._undo(done, err) from err
        return len(done)

    def _undo(self, done: list[tuple[str, tuple[Term, ...]]], err: Exception) -> LoraSwitchError:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        try:
            for layer, previous in reversed(done):
                self._write(layer, previous)
                self.held[layer] = previous
        except Exception:  # (out of memory again): the base needs no memory to put back
            with torch.no_grad():
                for layer in self.base:
                    self.params[layer].copy_(self.base[layer])
                    self.held[layer] = ()
            return LoraSwitchError(
                f"rewriting the LoRA weights failed ({why}); restoring the previous set "
                "failed too, so every layer holds its base weight (no LoRA)",
                "base",
            )
        return LoraSwitchError(
            f"rewriting the LoRA weights failed ({why}); the previous set was restored", "previous"
        )


@torch.no_grad()
def fuse(models: Mapping[str, nn.Module | None], terms: Sequence[tuple[str, float, object]]) -> int:
    """Fuse LoRAs into the models' weights for good (``[engine] loras``): the same sum as a
    switch, so a LoRA fused at load gives the weights it gives switched in. ``terms``:
    (name, strength, LoraWeights); returns how many layers were written."""
    wanted: dict[tuple[str, str], list[Term]] = {}
    for name, strength, weights in terms:
        for part, layers in weights.parts.items():  # type: ignore[attr-defined]
            for layer, delta in layers.items():
                wanted.setdefault((part, layer), []).append((name, strength, delta))
    for (part, layer), layer_terms in wanted.items():
        model = models[part]
        assert model is not None
        weight = model.get_submodule(layer).weight
        weight.copy_(merged(weight, layer_terms, weight.device))
    return len(wanted)
