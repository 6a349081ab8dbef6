"""The person mask's cost per frame: the segmenter (MediaPipe selfie segmentation on
ai-edge-litert, in the mask thread) and the composite (in the output thread).

    python bench/mask.py                         # this machine: CPU, one thread each
    python bench/mask.py --device cuda           # the composite on CUDA too (bench/gpu.py runs it)
    python bench/mask.py --picture docs/mask-astronaut.png   # the README's picture

Reports the median and p95 ms over --frames frames after a warm-up, measured in one run: the
segment step as the mask thread runs it (crop/resize to the engine size, segment, smooth,
feather) at 512x512 from a 640x480 frame, and the composite at 512x512 and 1280x720.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.dataplane.frames import Frame, fit_to
from daemon.masking.composite import Compositor

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def photo(name: str, w: int, h: int) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(DATA / f"{name}.png")), cv2.COLOR_BGR2RGB)
    return fit_to(rgb, w, h)


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.median(ms)), "p95": float(np.percentile(ms, 95))}


def bench_segment(frames: int) -> dict[str, float]:
    from daemon.masking.worker import MaskWorker
    from daemon.styles.presets import Preset  # (the daemon's imports: not on the GPU machine)

    worker = MaskWorker((512, 512), (512, 512))
    preset = Preset(name="b", prompt="x", mask="background")
    rng = np.random.default_rng(0)
    base = photo("astronaut", 640, 480).astype(np.int16)
    noisy = [
        np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(8)
    ]
    ms = []
    for i in range(frames + 10):
        frame = Frame(noisy[i % 8], float(i), i, "camera")
        t0 = time.perf_counter()
        worker.process(frame, preset, restart=i == 0)
        if i >= 10:
            ms.append((time.perf_counter() - t0) * 1000)
    return stats(ms)


def bench_composite(device: str, w: int, h: int, frames: int) -> dict[str, float]:
    compositor = Compositor(device)
    styled = np.ascontiguousarray(photo("camera", w, h))
    camera = photo("astronaut", w, h)
    mask = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    ms = []
    for i in range(frames + 10):
        t0 = time.perf_counter()
        compositor(styled, camera, mask)  # returns a host array: device work included
        if i >= 10:
            ms.append((time.perf_counter() - t0) * 1000)
    return stats(ms)


def picture(path: Path, side: int = 192) -> None:
    """Camera / room styled / person styled, with the built-in tiny style model."""
    from daemon.masking.worker import MaskWorker
    from daemon.models.registry import TINY_STYLES, model_location
    from daemon.styles.presets import Preset
    from streamv2v import EngineConfig, StreamV2V

    size = 128  # the tiny style model's size
    camera = photo("astronaut", size, size)
    engine = StreamV2V.from_pretrained(
        model_location(TINY_STYLES),
        config=EngineConfig(width=size, height=size, steps=1, strength=0.5, vae="model"),
    )
    engine.set_prompt("a cool striped scene")
    styled = None
    while styled is None:
        styled = engine(camera)
    panels = [camera]
    for mode in ("background", "person"):
        worker = MaskWorker((size, size), (side, side))
        preset = Preset(name="p", prompt="x", mask=mode, mask_feather=2)
        masked = worker.process(Frame(camera, 0.0, 0, "camera"), preset, restart=True)
        big = [cv2.resize(x, (side, side), interpolation=cv2.INTER_CUBIC) for x in (styled, camera)]
        panels.append(Compositor("cpu")(big[0], big[1], masked.weight))
    panels[0] = cv2.resize(camera, (side, side), interpolation=cv2.INTER_CUBIC)
    gap = np.full((side, 4, 3), 255, np.uint8)
    row = np.hstack([panels[0], gap, panels[1], gap, panels[2]])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(row, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--device", default="cpu", help="also time the composite there")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the output thread's)")
    p.add_argument("--picture", type=Path, help="write the README's picture and stop")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.picture:
        picture(args.picture)
        return
    results: dict = {}
    try:
        results["segment_512_from_640x480"] = bench_segment(args.frames)
    except ImportError as err:  # (the GPU machine lacks the daemon's other dependencies)
        print(f"segmenter not timed: {err}", file=sys.stderr)
    devices = ["cpu"] if args.device == "cpu" else ["cpu", args.device]
    for device in devices:
        for w, h in ((512, 512), (1280, 720)):
            results[f"composite_{device}_{w}x{h}"] = bench_composite(device, w, h, args.frames)
    print("| step | p50 ms | p95 ms |\n|---|---|---|")
    for name, figures in results.items():
        print(f"| {name} | {figures['p50']:.2f} | {figures['p95']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
