"""Synthetic scenes (a few shapes on a background) rendered in four styles: the world of the tiny
trained style model (:mod:`streamv2v.tiny.styles`), and a moving camera stand-in for its demo.

numpy only: the daemon's generated camera imports it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Style name -> the prompt that selects it (what the bundled demo presets use).
STYLES = {
    "plain": "a plain scene",
    "warm": "a warm scene",
    "cool": "a cool striped scene",
    "outline": "an outline drawing",
}
SIZE = 128
_KINDS = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Shape:
    kind: int  #: index into _KINDS
    cx: float  #: centre, in [0, 1] of the width
    cy: float
    r: float  #: size, as a fraction of the image side
    color: tuple[int, int, int]  #: its colour in the "plain" style


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]  #: the "plain" background
    angle: float  #: direction of gradients and stripes


def random_scene(rng: np.random.Generator) -> Scene:
    shapes = tuple(
        Shape(
            kind=int(rng.integers(0, 3)),
            cx=float(rng.uniform(0.2, 0.8)),
            cy=float(rng.uniform(0.2, 0.8)),
            r=float(rng.uniform(0.1, 0.24)),
            color=tuple(int(c) for c in rng.integers(30, 256, 3)),
        )
        for _ in range(int(rng.integers(2, 5)))
    )
    background = tuple(int(c) for c in rng.integers(60, 200, 3))
    return Scene(shapes, background, float(rng.uniform(0, math.pi)))


def moving_scene(scene: Scene, t: float) -> Scene:
    """``scene`` with its shapes gliding on slow loops (a camera stand-in that moves)."""
    moved = []
    for i, s in enumerate(scene.shapes):
        phase = 2 * math.pi * (t / (5.0 + i) + i / 3)
        cx = min(0.85, max(0.15, s.cx + 0.12 * math.sin(phase)))
        cy = min(0.85, max(0.15, s.cy + 0.08 * math.cos(phase)))
        moved.append(Shape(s.kind, cx, cy, s.r, s.color))
    return Scene(tuple(moved), scene.background, scene.angle)


def _inside(shape: Shape, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Signed distance to the shape's edge (positive inside), in image sides."""
    dx, dy = xx - shape.cx, yy - shape.cy
    if _KINDS[shape.kind] == "circle":
        return shape.r - np.sqrt(dx * dx + dy * dy)
    if _KINDS[shape.kind] == "square":
        return shape.r * 0.85 - np.maximum(np.abs(dx), np.abs(dy))
    # An upright triangle: three half-planes around its centre (y grows downwards).
    angles = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
    dists = [dx * math.cos(a) + dy * math.sin(a) for a in angles]
    return shape.r * 0.6 - np.maximum.reduce(dists)


def render(scene: Scene, style: str, size: int = SIZE) -> np.ndarray:
    """The scene in ``style`` as HxWx3 uint8 RGB (anti-aliased edges)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(coords, coords)
    ramp = xx * math.cos(scene.angle) + yy * math.sin(scene.angle)
    ramp = (ramp - ramp.min()) / max(1e-6, float(np.ptp(ramp)))
    image = np.empty((size, size, 3), np.float32)
    if style == "plain":
        image[:] = scene.background
    elif style == "warm":
        image[:] = np.array([60, 30, 15]) + ramp[..., None] * np.array([70, 45, 20])
    elif style == "cool":
        image[:] = (15, 25, 70)
    elif style == "outline":
        image[:] = (222, 222, 222)
    else:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    warm = np.array([(232, 92, 30), (204, 40, 32), (250, 166, 40)], np.float32)
    stripes = np.sin((xx * math.cos(scene.angle + 1) + yy * math.sin(scene.angle + 1)) * 60) > 0
    for i, shape in enumerate(scene.shapes):
        inside = _inside(shape, xx, yy) * size  # in pixels
        fill = np.clip(inside + 0.5, 0.0, 1.0)[..., None]
        if style == "plain":
            image = image * (1 - fill) + fill * np.array(shape.color, np.float32)
        elif style == "warm":
            image = image * (1 - fill) + fill * warm[i % 3]
        elif style == "cool":
            color = np.where(stripes[..., None], (60, 120, 232), (160, 205, 250)).astype(np.float32)
            image = image * (1 - fill) + fill * color
        else:  # outline: a 3-pixel ring; the inside shows what is behind, like a line drawing
            ring = fill - np.clip(inside - 2.5, 0.0, 1.0)[..., None]
            image = image * (1 - ring) + ring * 20.0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def witness_clips(frames: int, seed: int = 7) -> dict[str, list[np.ndarray]]:
    """The two clips the feature bank's temporal figures are judged on (with the tiny style
    model): one scene, STATIC with fresh camera-like noise on every frame (sigma 6/255), and
    MOVING (its shapes gliding, noiseless). ``frames`` RGB frames each, at :data:`SIZE`."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    still = render(scene, "plain").astype(np.float32)
    noisy = [
        np.clip(still + rng.normal(0, 6, still.shape), 0, 255).astype(np.uint8)
        for _ in range(frames)
    ]
    moving = [render(moving_scene(scene, i / 15), "plain") for i in range(frames)]
    return {"static + noise": noisy, "moving": moving}


#: BT.601 luma weights (OpenCV's RGB -> grey).
_LUMA = np.array([0.299, 0.587, 0.114])


def equal_luminance(red: float, blue: float, luma: float) -> tuple[int, int, int]:
    """The colour with this red and blue whose BT.601 luma is ``luma`` (green solves it)."""
    green = (luma - _LUMA[0] * red - _LUMA[2] * blue) / _LUMA[1]
    if not 0 <= green <= 255:
        raise ValueError(f"no green makes red {red}, blue {blue} reach luma {luma}")
    return int(red), round(float(green)), int(blue)


def colour_only_clip(frames: int, luma: float = 120.0) -> list[np.ndarray]:
    """A moving scene whose shapes differ from the grey background by colour only: every
    colour has the same luma, so a grey image (and a Canny on it) sees nothing, while the
    annotators' Canny on RGB sees every outline. A person in a red shirt before a green wall."""
    grey = (int(luma),) * 3
    scene = Scene(
        shapes=(
            Shape(1, 0.34, 0.36, 0.2, equal_luminance(20, 200, luma)),  # a cyan-blue square
            Shape(2, 0.68, 0.62, 0.24, equal_luminance(230, 40, luma)),  # a red triangle
            Shape(0, 0.3, 0.72, 0.14, equal_luminance(200, 230, luma)),  # a violet circle
        ),
        background=grey,
        angle=0.7,
    )
    return [render(moving_scene(scene, i / 15), "plain") for i in range(frames)]
