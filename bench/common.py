"""Shared parts of the benchmark scripts: building models, timing, printing."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from streamv2v import EngineConfig, StreamV2V


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built-in random weights), 'sd15' (the SD1.5 UNet architecture and the real "
        "TAESD architecture with random weights: the real model's compute), or a hub id/folder",
    )
    p.add_argument("--size", type=int, default=512, help="working width = height")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--no-stream-batch", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--frames", type=int, default=10, help="timed frames")
    p.add_argument("--warmup", type=int, default=3)


def sd15_components(tiny_folder: Path) -> dict:
    """SD1.5's UNet and TAESD's architecture with random weights, built in memory.

    Speed does not depend on weight values, so this costs what the real model costs. The text
    encoder is a one-layer stand-in with SD1.5's width (it never runs per frame).
    """
    return sd_components(tiny_folder, SD15_UNET)


#: The UNet architectures of the SD family, as UNet2DConditionModel arguments.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
SD21_UNET = {  # SD2.1 / sd-turbo: 1024-d text, linear projections, head dims per block
    "sample_size": 64,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}


def sd_components(tiny_folder: Path, unet_kwargs: dict) -> dict:
    """An SD-family UNet (``unet_kwargs``) and TAESD with random weights, a one-layer text
    encoder stand-in of the UNet's text width, the tiny model's tokenizer and scheduler."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    width = unet_kwargs["cross_attention_dim"]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=width,
            intermediate_size=width,
            num_hidden_layers=1,
            num_attention_heads=width // 64,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {
        "unet": UNet2DConditionModel(**{"sample_size": 64, **unet_kwargs}),
        "vae": AutoencoderTiny(),
        "text_encoder": text,
        "tokenizer": tokenizer,
        "scheduler": LCMScheduler.from_pretrained(tiny_folder / "scheduler"),
    }


def build_engine(args: argparse.Namespace, **config) -> StreamV2V:
    """The engine the arguments describe, with extra EngineConfig fields from ``config``."""
    from streamv2v.loading import default_device, default_dtype
    from streamv2v.testing import save_tiny_model

    cfg = EngineConfig(
        width=args.size,
        height=args.size,
        steps=args.steps,
        strength=max(0.4, args.steps / 50),
        stream_batch=not args.no_stream_batch,
        vae="model" if args.model == "tiny" else EngineConfig().vae,
        **config,
    )
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    if args.model in ("tiny", "sd15"):
        folder = save_tiny_model(Path(tempfile.mkdtemp(prefix="streamv2v-bench-")) / "tiny")
        if args.model == "tiny":
            engine = StreamV2V.from_pretrained(folder, config=cfg, device=device, dtype=dtype)
        else:
            parts = sd15_components(folder)
            for m in (parts["unet"], parts["vae"], parts["text_encoder"]):
                m.to(device=device, dtype=dtype).eval().requires_grad_(False)
            engine = StreamV2V(**parts, config=cfg)
    else:
        engine = StreamV2V.from_pretrained(args.model, config=cfg, device=device, dtype=dtype)
    engine.set_prompt("a claymation figure")
    return engine


def test_frames(n: int, size: int = 480, seed: int = 0) -> list[np.ndarray]:
    """A moving gradient with a square (camera-like 4:3 frames, so crop and resize run)."""
    h, w = size, size * 4 // 3
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        img = np.stack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, (xx + yy) % 256], -1)
        s = (40 + 5 * i) % (w - 80)
        img[100:180, s : s + 80] = (255, 255, 255)
        out.append(img.astype(np.uint8))
    return out


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def median(values: list[float]) -> float:
    return statistics.median(values)
