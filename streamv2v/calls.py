"""The UNet calls of a frame: which schedule slots each denoises, with which conditioning rows.

Planned once per configuration (the rows' timesteps, text embeddings and, for SDXL, the added
conditions, in buffers at fixed addresses); a prompt change is an in-place write
(:func:`write_embeds`); the hot path only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from streamv2v.config import EngineConfig
from streamv2v.families import AddedConditions, Family
from streamv2v.stream import StreamSchedule


@dataclass
class UNetCall:
    """One UNet call of a frame."""

    slots: slice  #: schedule slots of the conditional rows
    uncond_rows: slice | None  #: rows (relative to ``slots``) that also get an unconditional row
    timesteps: torch.Tensor  #: [rows] long
    embeds: torch.Tensor  #: [rows, tokens, dim]; rewritten in place when the prompt changes
    bank_rows: slice  #: the feature bank's slots of this call's rows
    row_steps: tuple[int, ...]  #: schedule step of each row (when it first holds a real frame)
    control: list[torch.Tensor] | None = None  #: per ControlNet: the rows' control images
    added: AddedConditions | None = None  #: SDXL: text_embeds and time_ids of the rows

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of this call besides sample, timestep and text (fixed tensors)."""
        kw: dict[str, Any] = {}
        if self.control is not None:
            kw["control"] = self.control
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added.kwargs
        return kw

    def static_tensors(self) -> list[torch.Tensor]:
        return [self.timesteps, self.embeds, *(self.added.tensors() if self.added else [])]


def guidance_mode(cfg: EngineConfig) -> str:
    """Guidance at scale <= 1 is the conditional prediction itself (the reference applies
    guidance only above 1): no unconditional rows, no stock noise."""
    return cfg.guidance if cfg.guidance_scale > 1.0 else "none"


def plan_calls(
    cfg: EngineConfig,
    sched: StreamSchedule,
    family: Family,
    cond: torch.Tensor,
    unet_config: Mapping[str, Any],
) -> list[UNetCall]:
    """The calls of one frame under ``cfg``: one batched call over every slot in stream-batch
    mode, one per slot sequentially; guidance rows appended after the conditional rows."""
    k, mode = cfg.steps, guidance_mode(cfg)
    dev, dt = cond.device, cond.dtype
    groups = [slice(0, k)] if cfg.stream_batch else [slice(s, s + 1) for s in range(k)]
    calls, offset = [], 0
    for slots in groups:
        n = slots.stop - slots.start
        if mode == "full":
            uncond = slice(0, n)
        elif mode == "initialize" and slots.start == 0:
            uncond = slice(0, 1)
        else:
            uncond = None
        t = sched.timesteps[slots]
        steps = tuple(range(slots.start, slots.stop))
        if uncond is not None:
            t = torch.cat([t, t[uncond]])
            steps += steps[uncond]
        shape = (t.shape[0], family.text_tokens(cond), cond.shape[-1])
        embeds = torch.empty(shape, device=dev, dtype=dt)
        added = None
        if family.is_sdxl:
            added = AddedConditions(unet_config, t.shape[0], cfg.height, cfg.width, dev, dt)
        rows = slice(offset, offset + len(steps))
        offset = rows.stop
        calls.append(UNetCall(slots, uncond, t, embeds, rows, steps, added=added))
    return calls


def write_embeds(
    calls: list[UNetCall], family: Family, cond: torch.Tensor, uncond: torch.Tensor
) -> None:
    """Copy the prompt's (conditional rows) and negative prompt's (guidance rows) embeddings
    into every call's buffers, in place."""
    for call in calls:
        n = call.slots.stop - call.slots.start
        rows = call.embeds.shape[0]
        if call.added is not None:
            c, c_pooled = family.split(cond, call.added.pooled_dim)
            u, u_pooled = family.split(uncond, call.added.pooled_dim)
            call.added.write(c_pooled, u_pooled, n)
        else:
            c, u = cond, uncond
        call.embeds[:n].copy_(c.expand(n, -1, -1))
        call.embeds[n:].copy_(u.expand(rows - n, -1, -1))
