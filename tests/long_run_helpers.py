"""The long float16 runs' shared help (tests/test_long_runs.py, test_controlnet.py, test_sdxl.py).

On this CPU a float16 convolution takes torch's slow reference path (~15x float32), and at 64x64
the autoencoder's encoder, which carries nothing from frame to frame, is about three quarters of
a float16 frame (0.12 of 0.17 s, measured with the tiny model on one thread). The long runs are
there for what *is* carried (the feature bank, residual CFG's stock noise, the ControlNet's
rows), so their clips loop over a few dozen distinct frames and :func:`encode_each_image_once`
runs the engine's own encoder once per distinct image: every frame still goes through the
engine's ``__call__`` and the carried state sees all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from streamv2v import StreamV2V


def encode_each_image_once(engine: StreamV2V) -> dict[bytes, torch.Tensor]:
    """Wrap ``engine``'s encoder in a cache keyed by the image's exact contents (the encoder
    is deterministic: the latent distribution's mode, no sampling). Returns the cache, so a test
    can check how many distinct images were encoded. Each call gets its own copy of the latent,
    so nothing the engine does to it in place reaches the cache."""
    encode: Callable[[torch.Tensor], torch.Tensor] = engine._encode_fn
    cache: dict[bytes, torch.Tensor] = {}

    def once(image: torch.Tensor) -> torch.Tensor:
        key = image.detach().cpu().numpy().tobytes()
        if key not in cache:
            cache[key] = encode(image)
        return cache[key].clone()

    engine._encode_fn = once
    return cache


def texture(h: int, w: int, blur: float, seed: int = 3) -> np.ndarray:
    """A smooth random RGB texture (Gaussian low-pass of white noise), uint8."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((h, w, 3))
    fy, fx = np.fft.fftfreq(h)[:, None, None], np.fft.fftfreq(w)[None, :, None]
    gain = np.exp(-(fx**2 + fy**2) * (2 * np.pi * blur) ** 2 / 2)
    t = np.real(np.fft.ifft2(np.fft.fft2(z, axes=(0, 1)) * gain, axes=(0, 1)))
    return np.clip(128 + 60 * (t - t.mean()) / t.std(), 0, 255).astype(np.uint8)


def moving_clip(n: int, size: int = 96, period: int | None = None, seed: int = 3) -> list:
    """A texture panning 2 px a frame, so every frame differs from the last; with ``period``,
    the pan starts over every ``period`` frames (a cut), so the clip holds that many distinct
    frames."""
    period = period or n
    tex = texture(size, 2 * period + size, blur=4, seed=seed)
    starts = [2 * (i % period) for i in range(n)]
    return [np.ascontiguousarray(tex[:, x : x + size]) for x in starts]
