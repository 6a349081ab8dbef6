"""The offline pipeline: settings -> an engine -> every frame of a video through it -> a video.

:func:`translate` is the work of ``streamv2v translate``; the configuration of its engine comes
from :func:`daemon.models.engine_config.engine_config`. The engine (and with it torch) is
imported only when a function here needs it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from daemon.dataplane.video import VideoReader, VideoWriter, check_output_path
from daemon.errors import PROG, UserError
from daemon.models.engine_config import engine_config
from daemon.models.load_lock import LOAD_LOCK
from daemon.models.registry import model_location

if TYPE_CHECKING:
    from streamv2v import EngineConfig, StreamV2V


def load_engine(
    model: str, config: EngineConfig, *, device: str | None = None, allow_pickle: bool = False
) -> StreamV2V:
    """Load the engine for ``model`` (a hub id, a folder or ``tiny``), with one-line errors."""
    from streamv2v import ModelLoadError, StreamV2V, UnsafeWeightsError

    location = model_location(model)
    # Loading can take a while (a first download, or the hub's retries when offline): say so.
    print(f"{PROG}: loading model {model}", file=sys.stderr, flush=True)
    try:
        with LOAD_LOCK:  # (one load at a time in a process: see load_lock)
            engine = StreamV2V.from_pretrained(
                location, config=config, device=device, allow_pickle=allow_pickle
            )
    except UnsafeWeightsError as err:
        raise UserError(f"{err} (pass --allow-pickle to load them anyway)") from None
    except ModelLoadError as err:
        raise UserError(str(err)) from None
    return engine


@dataclass
class StreamStats:
    """What one pass of frames through the engine did and how long each call took."""

    frames_in: int = 0
    frames_out: int = 0
    call_seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.call_seconds) * 1000 if self.call_seconds else 0.0


def stream_frames(
    engine: StreamV2V,
    frames: Iterable[np.ndarray],
    write: Callable[[np.ndarray], None],
    progress: Callable[[int], object] | None = None,
) -> StreamStats:
    """Feed every frame to the engine and ``write`` every output, one output per input frame."""
    stats = StreamStats()

    def step(frame: np.ndarray) -> None:
        start = time.perf_counter()
        out = engine(frame)
        stats.call_seconds.append(time.perf_counter() - start)
        if out is not None:  # None while the stream batch is still filling
            write(out)
            stats.frames_out += 1

    last = None
    for frame in frames:
        step(frame)
        stats.frames_in += 1
        last = frame
        if progress is not None:
            progress(1)
    # In stream-batch mode an input's output appears latency_frames calls later; feeding the last
    # frame that many more times flushes the batch, so the output has one frame per input frame.
    if last is not None:
        for _ in range(engine.latency_frames):
            step(last)
    return stats


def run_engine_on(
    engine: StreamV2V,
    frames: Iterable[np.ndarray],
    output: Path,
    fps: float,
    total: int | None,
) -> StreamStats:
    """Write the engine's output for ``frames`` to ``output`` with a progress bar on stderr."""
    from streamv2v import StreamV2VError

    size = (engine.config.width, engine.config.height)
    with (
        VideoWriter(output, fps, size) as writer,
        tqdm(total=total or None, unit="frame", file=sys.stderr, desc=output.name) as bar,
    ):
        try:
            stats = stream_frames(engine, frames, writer.write, bar.update)
        except StreamV2VError as err:
            raise UserError(str(err)) from None
    if stats.frames_out != stats.frames_in:
        print(
            f"{PROG}: warning: the engine returned {stats.frames_out} frames for "
            f"{stats.frames_in} input frames",
            file=sys.stderr,
        )
    return stats


def summary(output: Path, stats: StreamStats, engine: StreamV2V, fps: float) -> str:
    """The one line an offline run ends with: what was written and how fast the engine was."""
    cfg = engine.config
    mode = "stream batch" if cfg.stream_batch else "no stream batch"
    return (
        f"wrote {output}: {stats.frames_out} frames, {cfg.width}x{cfg.height} at {fps:g} fps; "
        f"median {stats.median_ms:.1f} ms per engine call (steps {cfg.steps}, {mode})"
    )


def translate(
    source: Path,
    output: Path,
    *,
    model: str,
    prompt: str,
    negative_prompt: str = "",
    device: str | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> str:
    """Restyle the video ``source`` into ``output`` (``streamv2v translate``); ``options`` go to
    :func:`engine_config`. Returns the summary line."""
    with VideoReader(source) as reader:
        check_output_path(output)
        if output.resolve() == reader.path.resolve():
            raise UserError(f"output would overwrite the input video: {output}")
        config = engine_config(model, **options)
        engine = load_engine(model, config, device=device, allow_pickle=allow_pickle)
        engine.set_prompt(prompt, negative_prompt)
        stats = run_engine_on(engine, reader, output, reader.fps, reader.frame_count)
    return summary(output, stats, engine, reader.fps)
