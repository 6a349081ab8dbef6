"""Per-frame latency of the engine and its overhead over the bare model calls.

    python bench/engine_latency.py --model tiny --size 512 --steps 1
    python bench/engine_latency.py --model sd15 --size 512 --steps 1 --frames 3 --warmup 1

Prints p50/p95 latency of ``engine(frame)`` (numpy in, numpy out, everything included), frames per
second, and the overhead ratio = median engine(frame) / median(VAE encode + UNet call(s) + VAE
decode alone, same shapes), both measured interleaved in this one run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, build_engine, median, pct, test_frames, timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    args = p.parse_args()
    engine = build_engine(args, bank={"enabled": False})
    dev, cfg = engine.device, engine.config
    frames = test_frames(args.warmup + args.frames)
    img = torch.zeros((1, 3, cfg.height, cfg.width), device=dev, dtype=engine.dtype)
    lat = torch.zeros((1, 4, cfg.height // 8, cfg.width // 8), device=dev, dtype=engine.dtype)
    x = torch.zeros((cfg.steps, *lat.shape[1:]), device=dev, dtype=engine.dtype)

    def bare_model_calls() -> None:
        engine.vae.encode(img)
        for call in engine._calls:
            rows = x[: call.timesteps.shape[0]]
            engine.unet(rows, call.timesteps, encoder_hidden_states=call.embeds)
        engine.vae.decode(lat)

    eng_t, bare_t = [], []
    with torch.inference_mode():
        for i, f in enumerate(frames):
            te = timed(lambda f=f: engine(f), dev)
            tb = timed(bare_model_calls, dev)
            if i >= args.warmup:
                eng_t.append(te)
                bare_t.append(tb)
    ms = [t * 1000 for t in eng_t]
    print(
        f"model={args.model} size={cfg.width}x{cfg.height} steps={cfg.steps} "
        f"stream_batch={cfg.stream_batch} device={dev} dtype={engine.dtype} "
        f"threads={torch.get_num_threads()} frames={len(ms)}"
    )
    print(f"engine(frame)      p50 {pct(ms, 50):9.1f} ms   p95 {pct(ms, 95):9.1f} ms")
    print(f"bare model calls   p50 {median(bare_t) * 1000:9.1f} ms")
    print(f"throughput         {1.0 / median(eng_t):9.2f} frames/s")
    print(f"overhead ratio     {median(eng_t) / median(bare_t):9.3f}  (engine / bare model calls)")


if __name__ == "__main__":
    main()
