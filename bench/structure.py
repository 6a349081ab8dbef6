"""Structure, flicker and warp error of the tiny style model with the tiny canny ControlNet off
and on, the feature bank off and stable, at three strengths: the README's ControlNet table.

    python bench/structure.py                          # the table, markdown, "a warm scene"
    python bench/structure.py --frames 24 --strengths 0.8 --styles   # every style at 0.8

Three clips of the model's world, 128x128: the two witness clips (STATIC with camera noise,
MOVING; streamv2v.scenes.witness_clips, as `streamv2v eval`'s tests use them) and a held-aside
moving scene the ControlNet never saw (streamv2v.tiny.control.held_aside_clip). Each run goes
through the engine one frame at a time, as the daemon feeds it; the figures are
daemon/offline/quality.py's, the first 4 frames (warm-up) left out:

    edge F1   Canny edges of each output frame against its source frame's, F1 within 2 px
    MAD       consecutive-frame mean absolute difference (0..255): flicker, motion included
    warp      output t+1 warped onto t by the SOURCE's flow, MAD over trusted pixels (0..255)

The "ideal" line is a perfect restyle, for scale: the scene rendered in the prompted style.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.cli import set_runtime_defaults
from daemon.models.registry import tiny_canny_dir, tiny_styles_dir
from daemon.offline.quality import measure, source_edges, source_motion
from streamv2v import BankConfig, ControlSpec, EngineConfig, StreamV2V
from streamv2v.scenes import SIZE, STYLES, moving_scene, random_scene, render, witness_clips
from streamv2v.tiny.control import held_aside_clip

SKIP = 4
BANKS = {"off": BankConfig(enabled=False), "stable": BankConfig(mode="stable")}


def clips(frames: int) -> dict[str, list[np.ndarray]]:
    """The three source clips by name."""
    witness = witness_clips(frames)
    return {
        "static + noise": witness["static + noise"],
        "moving": witness["moving"],
        "held-aside": held_aside_clip(frames),
    }


def ideal(name: str, frames: int, style: str) -> list[np.ndarray]:
    """The clip's scene rendered in ``style``: what a perfect restyle would output."""
    if name == "held-aside":
        scene = random_scene(np.random.default_rng(4242))
    else:
        scene = random_scene(np.random.default_rng(7))  # witness_clips' first draw
    if name == "static + noise":
        return [render(scene, style)] * frames
    return [render(moving_scene(scene, i / 15), style) for i in range(frames)]


def run(engine: StreamV2V, source: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    engine.reset()
    outputs: list[np.ndarray] = []
    start = time.perf_counter()
    for frame in source:
        out = engine(frame)
        if out is not None:
            outputs.append(out)
    for _ in range(engine.latency_frames):  # flush: one output per input
        outputs.append(engine(source[-1]))
    return outputs, (time.perf_counter() - start) / len(source)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--strengths", default="0.3,0.6,0.9")
    p.add_argument("--prompt", default=STYLES["warm"])
    p.add_argument("--styles", action="store_true", help="every style, control off/on, bank off")
    p.add_argument("--clips", default="static + noise,moving,held-aside")
    p.add_argument("--control-model", default=None, help="default: the shipped tiny-canny")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_runtime_defaults()
    torch.set_num_threads(args.threads)  # one thread: the cores are shared
    strengths = [float(s) for s in args.strengths.split(",")]
    wanted = args.clips.split(",")
    control_model = args.control_model or str(tiny_canny_dir())
    control = ControlSpec(model=control_model, preprocess="canny", scale=1.0)
    base = EngineConfig(width=SIZE, height=SIZE, steps=args.steps, vae="model", control=(control,))
    engine = StreamV2V.from_pretrained(tiny_styles_dir(), config=base, device="cpu")
    prompts = dict(STYLES) if args.styles else {k: v for k, v in STYLES.items() if v == args.prompt}
    banks = {"off": BANKS["off"]} if args.styles else BANKS
    print(f"tiny-styles + tiny-canny, {SIZE}x{SIZE}, {args.steps} step(s) (stream batch), "
          f"{args.frames} frames, first {SKIP} left out; cpu float32")  # fmt: skip
    print()
    print("| clip | style | strength | control | bank | edge F1 | MAD | warp | ms/frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, source in clips(args.frames).items():
        if name not in wanted:
            continue
        motion, edges = source_motion(source), source_edges(source)
        for style, prompt in prompts.items():
            engine.set_prompt(prompt)
            q = measure(ideal(name, args.frames, style), motion, edges=edges, skip=SKIP)
            print(f"| {name} | {style} | ideal | - | - | {q.edge_f1:.3f} | {q.mad:.2f} | "
                  f"{q.warp_error:.2f} | - |")  # fmt: skip
            for strength, scale, (bank, bank_cfg) in itertools.product(
                strengths, (0.0, 1.0), banks.items()
            ):
                cfg = base.model_copy(
                    update={
                        "strength": strength,
                        "bank": bank_cfg,
                        "control": (control.model_copy(update={"scale": scale}),),
                    }
                )
                engine.set_config(cfg)
                engine.set_prompt(prompt)
                outputs, seconds = run(engine, source)
                q = measure(outputs, motion, edges=edges, skip=SKIP)
                print(f"| {name} | {style} | {strength:g} | {'on' if scale else 'off'} | {bank} "
                      f"| {q.edge_f1:.3f} | {q.mad:.2f} | {q.warp_error:.2f} | "
                      f"{1000 * seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
