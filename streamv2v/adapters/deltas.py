"""One delta description per family of style file: what a layer's weight gains, in float32.

Every reader (:mod:`~streamv2v.adapters.kohya`, :mod:`~streamv2v.adapters.peft`) turns a file's
tensors for one layer into one of these; the writer (:mod:`~streamv2v.adapters.writer`) asks it
for ``term(base, strength)``, the float32 change of the layer's weight at that strength, computed
from the layer's **base** weight (never from what the layer holds now), and adds up the terms of
every LoRA on the layer. The factors stay as the file has them (no product is kept), in the
model's dtype, so a LoRA costs on the device what its file holds.

    LowRank    LoRA / LoCon: up @ down (conv factors flattened; ``mid``: LoCon's Tucker core)
    Hadamard   LoHa: (w1a @ w1b) * (w2a @ w2b), or with Tucker cores t1/t2 (conv)
    Kronecker  LoKr: kron(w1, w2), each whole or a product of factors (w2 with a Tucker core t2)
    Dora       any of the above, weight-decomposed: the merged weight's norms set to a magnitude

``scale`` is the file's ``alpha / rank`` (the format's own rule, see the readers); the
``strength`` a preset or ``[engine] loras`` gives multiplies the whole term.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch


class _Delta:
    """What every delta description offers (subclasses are frozen dataclasses)."""

    scale: float

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (for memory accounting and moves); alphas are plain floats."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device, dtype: torch.dtype) -> _Delta:
        moved = {
            f.name: v.to(device=device, dtype=dtype).contiguous()
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def matrix(self, shape: torch.Size) -> torch.Tensor:
        """The delta at strength 1, float32, shaped like the weight."""
        raise NotImplementedError

    #: The term depends on the base weight (DoRA), not only on the factors.
    needs_base = False

    def term(self, base: torch.Tensor, strength: float) -> torch.Tensor:
        """What the layer's float32 ``base`` weight gains at ``strength``."""
        return self.matrix(base.shape).mul_(strength)

    def add_to(self, acc: torch.Tensor, base: torch.Tensor | None, strength: float) -> None:
        """``acc += term(base, strength)`` (``acc``: float32, contiguous; ``base``: the float32
        base, given when :attr:`needs_base`)."""
        acc.add_(self.matrix(acc.shape), alpha=strength)


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _tucker(core: torch.Tensor, out_f: torch.Tensor, in_f: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] from a core [r1, r2, kh, kw] and mode factors out_f [r1, out],
    in_f [r2, in] (LyCORIS's and peft's CP/Tucker layout)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", _f(core), _f(out_f), _f(in_f))


@dataclass(frozen=True)
class LowRank(_Delta):
    """LoRA / LoCon: ``scale * up @ down``; with ``mid`` (LoCon's Tucker core, [r, r, kh, kw])
    the conv delta is ``up x mid x down`` along the channel modes."""

    down: torch.Tensor  #: A: [rank, in] (Linear) or [rank, in, kh, kw] (Conv2d)
    up: torch.Tensor  #: B: [out, rank] or [out, rank, 1, 1]
    scale: float = 1.0  #: alpha / rank
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def add_to(self, acc: torch.Tensor, base: torch.Tensor | None, strength: float) -> None:
        if self.mid is not None:
            super().add_to(acc, base, strength)
            return
        up, down = _f(self.up).flatten(1), _f(self.down).flatten(1)
        acc.view(acc.shape[0], -1).addmm_(up, down, alpha=self.scale * strength)  # one pass

    def matrix(self, shape: torch.Size) -> torch.Tensor:
        up, down = _f(self.up).flatten(1), _f(self.down).flatten(1)
        out = _tucker(self.mid, up.T, down) if self.mid is not None else up @ down
        return out.reshape(shape).mul_(self.scale)


@dataclass(frozen=True)
class Hadamard(_Delta):
    """LoHa: ``scale * (w1a @ w1b) * (w2a @ w2b)``; with Tucker cores (conv, ``t1``/``t2``
    [r, r, kh, kw]) ``w1a``/``w2a`` are [r, out] and ``w1b``/``w2b`` [r, in]."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float = 1.0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def matrix(self, shape: torch.Size) -> torch.Tensor:
        if self.t1 is not None and self.t2 is not None:
            one = _tucker(self.t1, self.w1a, self.w1b)
            two = _tucker(self.t2, self.w2a, self.w2b)
        else:
            one = _f(self.w1a) @ _f(self.w1b)
            two = _f(self.w2a) @ _f(self.w2b)
        return (one * two).reshape(shape).mul_(self.scale)


@dataclass(frozen=True)
class Kronecker(_Delta):
    """LoKr: ``scale * kron(w1, w2)``; ``w1`` whole or ``w1a @ w1b``, ``w2`` whole,
    ``w2a @ w2b``, or (conv) a Tucker core ``t2`` with ``w2a`` [r, out_b], ``w2b`` [r, in_d]."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0

    def matrix(self, shape: torch.Size) -> torch.Tensor:
        w1 = _f(self.w1) if self.w1 is not None else _f(self.w1a) @ _f(self.w1b)
        if self.w2 is not None:
            w2 = _f(self.w2)
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2a, self.w2b)
        else:
            w2 = _f(self.w2a) @ _f(self.w2b)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(shape).mul_(self.scale)


Side = Literal["out", "in"]


@dataclass(frozen=True)
class Dora(_Delta):
    """DoRA: ``W = m * V / ||V||`` with ``V = base + inner``, the norms taken per output channel
    (``side="out"``: peft's ``lora_magnitude_vector``, LyCORIS's ``wd_on_out``) or per input
    channel (``"in"``: LyCORIS 2.x / kohya ``dora_scale`` of shape [1, in]); ``m`` the file's
    magnitude. A strength ``s`` gives ``base + s * (W - base)`` (0: the base, 1: the file's
    weight; a blend moves the weight in a straight line)."""

    inner: _Delta
    magnitude: torch.Tensor
    side: Side = "out"
    scale: float = 1.0  #: (unused: the inner delta carries alpha / rank)
    needs_base = True

    def add_to(self, acc: torch.Tensor, base: torch.Tensor | None, strength: float) -> None:
        assert base is not None
        acc.add_(self.term(base, strength))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.inner.tensors(), self.magnitude]

    def to(self, device: torch.device, dtype: torch.dtype) -> Dora:
        return replace(
            self,
            inner=self.inner.to(device, dtype),
            magnitude=self.magnitude.to(device=device, dtype=dtype).contiguous(),
        )

    def term(self, base: torch.Tensor, strength: float) -> torch.Tensor:
        merged = base + self.inner.matrix(base.shape)
        if self.side == "out":
            flat = merged.reshape(merged.shape[0], -1)
            norm = flat.norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
            mag = _f(self.magnitude).reshape(norm.shape)
        else:
            flat = merged.transpose(0, 1).reshape(merged.shape[1], -1)
            norm = flat.norm(dim=1).reshape(1, -1, *[1] * (merged.ndim - 2))
            mag = _f(self.magnitude).reshape(norm.shape)
        decomposed = merged * (mag / (norm + torch.finfo(torch.float32).eps))
        return decomposed.sub_(base).mul_(strength)
