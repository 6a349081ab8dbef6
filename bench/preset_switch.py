"""What a preset switch costs on the engine thread.

    python bench/preset_switch.py --model tiny --size 256 --steps 2 --frames 40
    python bench/preset_switch.py --model sd15 --size 512 --steps 1 --frames 12 --warmup 2

Frames are timed interleaved in one run: steady frames (no switch) and frames during a blend
(a switch every ``transition`` frames, so every timed frame blends). Prints both medians, their
ratio (the blend's per-frame cost; goal ~1.0) and, for scale, one text-encoder call (what a
switch would cost if it encoded the prompt; the sd15 stand-in encoder has 1 of SD1.5's 12
layers, so the real figure is ~12x larger).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_model_args, build_engine, median, test_frames, timed

from daemon.styles.presets import Preset
from daemon.styles.switching import StyleSwitcher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--transition", type=int, default=8)
    args = p.parse_args()
    engine = build_engine(args)
    base = engine.config
    styles = [
        Preset(name=n, prompt=t, transition_frames=args.transition, bank_on_switch="keep")
        for n, t in (("a", "a claymation figure"), ("b", "an oil painting, thick strokes"))
    ]
    switcher = StyleSwitcher(engine, base)
    switcher.encode(styles)
    switcher.start(styles[0])
    frames = test_frames(args.warmup + 2 * args.frames, size=args.size)
    dev = engine.device
    for f in frames[: args.warmup + engine.latency_frames]:
        engine(f)
    steady, blending, current = [], [], 0
    for i, f in enumerate(frames[args.warmup :]):
        if i % 2:  # a blending frame: (re)start a switch whenever the last one ended
            if not switcher.switching:
                current = 1 - current
                switcher.switch(styles[current])

            def step(frame=f) -> None:
                switcher.before_frame()
                engine(frame)

            blending.append(timed(step, dev) * 1000)
        else:  # a steady frame: the engine alone
            steady.append(timed(lambda frame=f: engine(frame), dev) * 1000)
    encodes = [timed(lambda: engine.encode_prompt("a new prompt"), dev) for _ in range(3)]
    encode = median(encodes) * 1000
    print(f"model={args.model} size={args.size} steps={args.steps} device={dev} {engine.dtype}")
    print(f"steady frame      p50 {median(steady):8.2f} ms  ({len(steady)} frames)")
    print(f"blending frame    p50 {median(blending):8.2f} ms  ({len(blending)} frames)")
    print(f"ratio blending/steady  {median(blending) / median(steady):.3f}")
    print(f"one text-encoder call  {encode:8.2f} ms  (what a switch does NOT do)")


if __name__ == "__main__":
    main()
