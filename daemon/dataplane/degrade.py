"""Stepping down after a CUDA out-of-memory error, instead of failing in a loop.

The engine thread catches the error, and :class:`StepDown` picks the next lighter configuration
on streamv2v.memory's ladder (feature-bank frames, then steps, then size). What was lowered
becomes a limit that every later configuration of the engine goes through (preset switches,
the latency controller, a reload), so the daemon never climbs back into the error. /status and
the control page say "degraded" with the reason until the daemon restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from streamv2v import EngineConfig
from streamv2v.memory import lower, with_bank_frames, with_size, with_steps

log = logging.getLogger("streamv2v")


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (CUDA's, or another accelerator's, which raise a
    RuntimeError saying so)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


@dataclass(frozen=True)
class Limits:
    """Ceilings on an engine configuration; None: as configured. ``bank_frames`` 0: no bank."""

    bank_frames: int | None = None
    steps: int | None = None
    size: tuple[int, int] | None = None

    def apply(self, config: EngineConfig) -> EngineConfig:
        """``config`` within these limits (unchanged when it is already)."""
        frames = self.bank_frames
        if frames is not None and config.bank.enabled and config.bank.max_frames > frames:
            config = with_bank_frames(config, frames)
        elif frames == 0 and config.bank.enabled:
            config = with_bank_frames(config, 0)
        if self.steps is not None and config.steps > self.steps:
            config = with_steps(config, self.steps)
        size = self.size
        if size is not None and (config.width > size[0] or config.height > size[1]):
            config = with_size(config, *size)
        return config


class StepDown:
    """The limits learned from out-of-memory errors, and why (for /status and the page)."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.changes: list[str] = []
        self.reason: str | None = None

    def apply(self, config: EngineConfig) -> EngineConfig:
        return self.limits.apply(config)

    def after(self, running: EngineConfig, err: BaseException) -> EngineConfig | None:
        """The configuration to run after ``err`` struck ``running``: one step lighter, its
        change kept as a limit; None at the floor (nothing left to lower)."""
        step = lower(running)
        if step is None:
            return None
        lowered, change = step
        limits = self.limits
        if lowered.bank != running.bank:
            limits = replace(limits, bank_frames=lowered.bank.max_frames * lowered.bank.enabled)
        if lowered.steps != running.steps:
            limits = replace(limits, steps=lowered.steps)
        if (lowered.width, lowered.height) != (running.width, running.height):
            limits = replace(limits, size=(lowered.width, lowered.height))
        self.limits = limits
        self.changes.append(change)
        self.reason = f"out of memory ({_first_line(err)}): " + ", then ".join(self.changes)
        return lowered

    def status(self) -> dict[str, Any] | None:
        """What /status shows: None while nothing was lowered."""
        if self.reason is None:
            return None
        limits = self.limits
        return {
            "reason": self.reason,
            "changes": list(self.changes),
            "limits": {
                "bank_frames": limits.bank_frames,
                "steps": limits.steps,
                "size": list(limits.size) if limits.size else None,
            },
        }


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 120 else line[:117] + "..."
