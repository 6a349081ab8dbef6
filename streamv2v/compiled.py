"""The compiled path: torch.compile of the UNet and the autoencoder's encode/decode.

On CUDA the mode is "reduce-overhead" (inductor kernels replayed as CUDA graphs); elsewhere the
default inductor mode. Shapes are static (``dynamic=False``): every configuration the engine runs
is one graph, compiled once (at :meth:`~streamv2v.StreamV2V.warmup`, or on its first frame) and
kept, so coming back to a configuration never compiles again. Per-frame state (prompt
embeddings, the feature bank, its fill mask and FF counters) lives in tensors at fixed
addresses, marked static so CUDA graphs read and write them in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from streamv2v.config import EngineConfig

#: Graphs kept per compiled function: one per configuration (and per UNet call of a frame in
#: sequential mode), so the latency controller's whole range stays compiled.
_GRAPHS_PER_FUNCTION = 64


def compile_enabled(setting: Literal["auto", "off", "on"], device: torch.device) -> bool:
    """``"auto"`` compiles on CUDA only: there CUDA graphs remove the per-kernel launch cost that
    dominates a 1-step frame; on the CPU compiling costs ~40 s per shape at every new
    configuration, which a user switching settings would feel, for a ~1.8x gain."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def inductor_cache_dir() -> Path:
    """The compile cache, in the user cache dir (``TORCHINDUCTOR_CACHE_DIR`` wins when set),
    so a second start reuses the first one's kernels. Must run before the first compile."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    path = Path(user_cache_dir("streamv2v")) / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_fn(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled for ``device`` (static shapes; CUDA graphs on CUDA)."""
    import torch._dynamo

    inductor_cache_dir()
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, _GRAPHS_PER_FUNCTION)
    cfg.accumulated_cache_size_limit = max(
        cfg.accumulated_cache_size_limit, 4 * _GRAPHS_PER_FUNCTION
    )
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False)


def mark_static(tensors: Iterable[torch.Tensor]) -> None:
    """Tell the compiler these tensors keep their address (CUDA graphs then read and mutate them
    in place instead of copying them in at every replay)."""
    import torch._dynamo

    for t in tensors:
        torch._dynamo.mark_static_address(t)


def frame_begin(device: torch.device) -> None:
    """Start of a frame for CUDA graph trees: the previous frame's graph outputs may now be
    overwritten (the engine has copied out whatever it keeps)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def warmup_configs(
    base: EngineConfig, step_counts: Iterable[int | tuple[int, bool]], *, bank_off: bool = False
) -> list[EngineConfig]:
    """``base`` at each of ``step_counts`` (a step count, or ``(steps, stream_batch)``; the step
    schedule derived from the strength, as the latency controller does), and with the bank off
    too when ``bank_off``: the configurations :meth:`~streamv2v.StreamV2V.warmup` runs."""
    wanted: list[EngineConfig] = []
    for item in step_counts:
        steps, batch = (item, base.stream_batch) if isinstance(item, int) else item
        update = {"steps": steps, "stream_batch": batch, "t_index_list": None}
        cfg = EngineConfig.model_validate({**base.model_dump(), **update})
        banks = [cfg.bank, cfg.bank.model_copy(update={"enabled": False})]
        for bank in banks[: 1 + (bank_off and cfg.bank.enabled)]:
            variant = cfg.model_copy(update={"bank": bank})
            if variant not in wanted:
                wanted.append(variant)
    return wanted


def run_warmup(engine: Any, configs: list[EngineConfig], *, progress: bool = True) -> None:
    """Run ``engine`` (a :class:`~streamv2v.StreamV2V`) a few frames in each of ``configs``, so
    each is compiled (and on CUDA captured) now; then its configuration is set back (its stream
    reset). Without compilation each is only prepared."""
    from tqdm.auto import tqdm

    base = engine.config
    frame = np.random.default_rng(0).integers(0, 256, (base.height, base.width, 3), np.uint8)
    desc = "compiling" if engine.compiled else "preparing"
    bar = tqdm(configs, desc=desc, disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.steps} steps, bank {'on' if cfg.bank.enabled else 'off'}")
        engine.set_config(cfg)
        # Enough frames for the stream to output, then one capture and one replay.
        for i in range(engine.latency_frames + 3 if engine.compiled else 0):
            engine(np.roll(frame, i, axis=1), output_type="np")
    engine.set_config(base)
