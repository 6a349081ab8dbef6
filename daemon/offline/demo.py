"""``streamv2v demo``: the whole pipeline offline, a generated camera through a built-in model into
a video file. With the trained style model (the package ships it) a moving scene changes style
every quarter; without it (a source tree where it was not built), the random-weight model runs on
a test pattern."""

from __future__ import annotations

from pathlib import Path

from daemon.dataplane.video import check_output_path, moving_test_pattern
from daemon.errors import PROG
from daemon.models.engine_config import engine_config
from daemon.models.registry import STYLE_PROMPTS, TINY_MODEL, TINY_STYLES, tiny_styles_available
from daemon.offline.pipeline import load_engine, run_engine_on, summary

DEMO_SIZE = 256
DEMO_FPS = 15.0
DEMO_STEPS = 2


def demo(frames: int, output: Path) -> str:
    """Write the demo video (``frames`` frames) to ``output``; returns the summary line."""
    check_output_path(output)
    if tiny_styles_available():
        return styles_demo(frames, output)
    print(
        f"{PROG} demo: no camera, virtual camera or downloaded model is needed; it uses\n"
        f"  camera         -> a generated moving test pattern "
        f"({frames} frames, {DEMO_SIZE}x{DEMO_SIZE} at {DEMO_FPS:g} fps)\n"
        f"  model          -> the embedded tiny random-weight model (noise-like images)\n"
        f"  virtual camera -> the video file {output}",
        flush=True,
    )
    config = engine_config(TINY_MODEL, size=(DEMO_SIZE, DEMO_SIZE), steps=DEMO_STEPS)
    engine = load_engine(TINY_MODEL, config)
    engine.set_prompt("an oil painting of colorful shapes")
    camera = moving_test_pattern(frames, DEMO_SIZE, DEMO_SIZE)
    stats = run_engine_on(engine, camera, output, DEMO_FPS, frames)
    return summary(output, stats, engine, DEMO_FPS)


def styles_demo(frames: int, output: Path) -> str:
    """A moving scene restyled by the built-in style model, switching style every quarter."""
    import numpy as np

    from streamv2v.scenes import SIZE, moving_scene, random_scene, render

    print(
        f"{PROG} demo: no camera, virtual camera or downloaded model is needed; it uses\n"
        f"  camera         -> a generated moving scene ({frames} frames at {DEMO_FPS:g} fps)\n"
        f"  model          -> the built-in tiny style model; the style changes every quarter:\n"
        f"                    {', '.join(STYLE_PROMPTS[1:])}, then back to plain\n"
        f"  virtual camera -> the video file {output}",
        flush=True,
    )
    config = engine_config(TINY_STYLES, size=(SIZE, SIZE), steps=1, strength=0.3)
    engine = load_engine(TINY_STYLES, config)
    prompts = [*STYLE_PROMPTS[1:], STYLE_PROMPTS[0]]
    embeds = [(engine.encode_prompt(p), engine.encode_prompt("")) for p in prompts]
    scene = random_scene(np.random.default_rng(7))

    def camera():
        for i in range(frames):
            quarter = min(3, 4 * i // frames)
            if i == 0 or quarter != min(3, 4 * (i - 1) // frames):
                engine.set_prompt_embeds(*embeds[quarter])  # pre-encoded: no encoder call
            yield render(moving_scene(scene, i / DEMO_FPS), "plain", SIZE)

    stats = run_engine_on(engine, camera(), output, DEMO_FPS, frames)
    return summary(output, stats, engine, DEMO_FPS)
