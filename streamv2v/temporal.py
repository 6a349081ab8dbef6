"""Temporal figures of an engine on a clip: how much the output flickers, and when.

    consecutive-frame MAD     mean |out[t] - out[t-1]| over the clip (0..1 pixel scale)
    after-update MAD          the same, only on frames right after a feature-bank update: the
                              "update pulse" of Dynamic Merging, which re-pairs tokens at random
    other MAD                 the same on the remaining frames
    FF pass rate              the share of tokens Feature Fusion blended (above its threshold)

Pure computation over an engine and frames (no I/O); ``bench/temporal.py`` prints the figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamv2v.engine import StreamV2V


@dataclass(frozen=True)
class TemporalFigures:
    mad: float
    mad_after_update: float | None
    mad_other: float | None
    ff_pass_rate: float | None
    input_mad: float
    frames: int


def temporal_figures(
    engine: StreamV2V, frames: Sequence[np.ndarray], *, skip: int = 4
) -> TemporalFigures:
    """Run ``frames`` through a freshly reset ``engine``; the first ``skip`` outputs (warm-up of
    the stream and the bank) are not counted."""
    engine.reset()
    outputs: list[np.ndarray] = []
    updated_before: list[bool] = []
    fused: list[float] = []
    bank = engine.bank
    interval = bank.config.interval if bank is not None else 0
    for i, frame in enumerate(frames):
        out = engine(frame)
        if out is None:
            continue
        # The bank is updated at the end of frames whose index is a positive multiple of the
        # interval: the next frame is the first to attend to the new bank.
        updated_before.append(bool(interval) and i > 1 and (i - 1) % interval == 0)
        outputs.append(out.astype(np.float32) / 255.0)
        fraction = engine.stats()["fused_fraction"]
        if fraction is not None:
            fused.append(fraction)
    diffs = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(outputs[skip:])]
    pulses = updated_before[skip + 1 :]
    after = [d for d, p in zip(diffs, pulses) if p]
    other = [d for d, p in zip(diffs, pulses) if not p]
    inputs = [f.astype(np.float32) / 255.0 for f in frames]
    input_diffs = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(inputs)]
    return TemporalFigures(
        mad=float(np.mean(diffs)),
        mad_after_update=float(np.mean(after)) if after else None,
        mad_other=float(np.mean(other)) if other and after else None,
        ff_pass_rate=float(np.mean(fused[skip:])) if fused[skip:] else None,
        input_mad=float(np.mean(input_diffs)),
        frames=len(diffs),
    )
