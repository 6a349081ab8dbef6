"""Temporal quality of a translated clip, measured the way the papers do, over uint8 RGB frames.

    temporal flickering   VBench's: the mean absolute difference of consecutive frames, in 0..255
                          (lower is steadier), and its normalised score (255 - MAD) / 255 (higher)
    warp error            StreamV2V's: the optical flow of the SOURCE clip (OpenCV DIS) carries
                          output frame t+1 back onto frame t; the mean absolute difference in
                          0..255 over the pixels the flow can be trusted on (forward-backward
                          consistent, landing inside the frame). Motion the source has is not
                          counted as flicker, unlike the plain MAD.
    update pulse          the MAD on frames right after a feature-bank update vs the others
    structure (edge F1)   how well the output's edges follow the SOURCE's, frame by frame: Canny
                          edges of both (OpenCV), F1 of precision (output edge pixels within 2 px
                          of a source edge) and recall (source edge pixels within 2 px of an
                          output edge); 1 = every shape kept, nothing invented, ~0 = unrelated
    CLIP consistency      mean cosine similarity of CLIP image embeddings of consecutive frames,
                          only with a CLIP model already in the local Hugging Face cache

Computation only: frames in, numbers out (the CLIP model is read from the local cache, never
downloaded). OpenCV is the daemon's, so this lives here and not in the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

#: Forward-backward consistency test of Sundaram et al. (2010), as warp-error code uses it: a
#: pixel is trusted when |F + B'|^2 <= ALPHA (|F|^2 + |B'|^2) + BETA (flows in pixels).
FB_ALPHA = 0.01
FB_BETA = 0.5

#: OpenCV DIS rather than Farneback (measured on the witness clips): on the moving clip DIS
#: follows the flat shapes (source warp error 0.30 against Farneback's 0.50 at any window), and
#: its masks keep occlusions out. Its weak spot: flat regions with camera noise, where it finds
#: ~1 px of motion that is not there (Farneback: 0.2-0.3 px), so on a still, noisy clip the
#: warp error mostly measures the flow's noise; the MAD is the figure to read there.
DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM

#: The structure figure: Canny hysteresis thresholds (0..255 L2 gradient, after a Gaussian blur of
#: sigma EDGE_BLUR) and how far (px) an edge may move and still count as kept. The blur and the
#: thresholds keep camera noise (sigma 6/255) out of the edges while every shape's outline stays.
CANNY_THRESHOLDS = (50, 100)
EDGE_BLUR = 1.0
EDGE_TOLERANCE = 2

#: CLIP models tried, in order, when none is named: the paper's family, large first.
CLIP_MODELS = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32")


def _check_frames(frames: Sequence[np.ndarray], what: str) -> None:
    if len(frames) < 2:
        raise ValueError(f"{what}: need at least 2 frames to measure change, got {len(frames)}")
    shape = frames[0].shape
    for i, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape != shape:
            raise ValueError(
                f"{what}: frame {i} is {f.shape} {f.dtype}; every frame must be HxWx3 uint8 "
                f"RGB of one size ({shape})"
            )


# --------------------------------------------------------------------------- flickering
def frame_mad(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Mean absolute difference of each pair of consecutive frames, in 0..255 (length T - 1)."""
    _check_frames(frames, "frame_mad")
    return np.array(
        [
            float(np.abs(b.astype(np.int16) - a.astype(np.int16)).mean())
            for a, b in itertools.pairwise(frames)
        ]
    )


def flicker_score(mad: float) -> float:
    """VBench's temporal-flickering score of a clip's mean consecutive-frame MAD: 1 = still."""
    return (255.0 - mad) / 255.0


def after_update_flags(count: int, interval: int | None, latency_frames: int = 0) -> np.ndarray:
    """Which of ``count`` outputs is the first made with a freshly updated feature bank.

    The engine updates the bank at the end of call ``c`` when ``c > 0`` and ``c % interval ==
    0``; output ``j`` leaves call ``j + latency_frames``. So output ``j`` is "after an update"
    when call ``j + latency_frames - 1`` updated. ``interval=None`` (no bank): all False.
    """
    flags = np.zeros(count, dtype=bool)
    if not interval:
        return flags
    calls = np.arange(count) + latency_frames - 1
    flags[:] = (calls > 0) & (calls % interval == 0)
    return flags


def split_mad(mad: np.ndarray, after_update: np.ndarray) -> tuple[float | None, float | None]:
    """(MAD into frames after an update, MAD into the other frames); ``mad[i]`` is the change
    from output ``i`` to ``i + 1``, so it counts as "after update" when output ``i + 1`` is."""
    into = after_update[1 : len(mad) + 1]
    after, other = mad[into], mad[~into]
    if not len(after) or not len(other):
        return None, None
    return float(after.mean()), float(other.mean())


# --------------------------------------------------------------------------- warp error
def fit_to(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop ``frame`` to the aspect of ``width`` x ``height`` and resize to it: what the
    engine does to an input frame, so the source lines up with the output pixel for pixel."""
    h, w = frame.shape[:2]
    if h * width > w * height:
        ch = max(1, round(w * height / width))
        frame = frame[(h - ch) // 2 : (h - ch) // 2 + ch]
    elif h * width < w * height:
        cw = max(1, round(h * width / height))
        frame = frame[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class SourceMotion:
    """The source clip's optical flow between consecutive frames, computed once per clip and
    shared by every variant measured against it.

    ``maps[t]`` [H, W, 2] float32: where pixel (x, y) of frame t lands in frame t + 1 (absolute
    coordinates, ready for ``cv2.remap``); ``valid[t]`` [H, W] bool: the flow is trusted there.
    """

    maps: tuple[np.ndarray, ...]
    valid: tuple[np.ndarray, ...]

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.valid[0].shape
        return w, h


def source_motion(
    source: Sequence[np.ndarray], size: tuple[int, int] | None = None
) -> SourceMotion:
    """Flow of ``source`` (fitted to ``size`` = (width, height) first, as the engine fits its
    input) with a forward-backward consistency mask (occlusions, and pixels that leave the
    frame, are not trusted)."""
    _check_frames(source, "source_motion")
    if size is not None:
        source = [fit_to(f, *size) for f in source]
    h, w = source[0].shape[:2]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in source]
    dis = cv2.DISOpticalFlow_create(DIS_PRESET)
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), axis=-1).astype(np.float32)
    maps, valid = [], []
    for a, b in itertools.pairwise(gray):
        fwd = dis.calc(a, b, None)  # frame t -> t + 1
        bwd = dis.calc(b, a, None)  # frame t + 1 -> t
        target = grid + fwd
        # The backward flow where each pixel lands: a consistent pair cancels out there.
        bwd_there = cv2.remap(bwd, target[..., 0], target[..., 1], cv2.INTER_LINEAR)
        mismatch = ((fwd + bwd_there) ** 2).sum(-1)
        bound = FB_ALPHA * ((fwd**2).sum(-1) + (bwd_there**2).sum(-1)) + FB_BETA
        inside = (
            (target[..., 0] >= 0)
            & (target[..., 0] <= w - 1)
            & (target[..., 1] >= 0)
            & (target[..., 1] <= h - 1)
        )
        maps.append(target)
        valid.append(inside & (mismatch <= bound))
    return SourceMotion(tuple(maps), tuple(valid))


def warp_errors(frames: Sequence[np.ndarray], motion: SourceMotion) -> np.ndarray:
    """Per pair t: mean |frames[t] - frames[t+1] warped onto t| in 0..255 over the pixels the
    source flow trusts (NaN where it trusts none). ``frames`` must have the motion's size and
    as many frames as the source (one per source frame)."""
    _check_frames(frames, "warp_errors")
    w, h = motion.size
    if frames[0].shape[:2] != (h, w):
        raise ValueError(
            f"warp_errors: frames are {frames[0].shape[1]}x{frames[0].shape[0]} but the source "
            f"motion is {w}x{h}: compute the motion at the output size"
        )
    if len(frames) != len(motion.maps) + 1:
        raise ValueError(
            f"warp_errors: {len(frames)} frames for a source of {len(motion.maps) + 1}: the "
            "output must have one frame per source frame"
        )
    errors = np.full(len(motion.maps), np.nan)
    for t, (target, valid) in enumerate(zip(motion.maps, motion.valid)):
        if not valid.any():
            continue
        nxt = frames[t + 1].astype(np.float32)
        warped = cv2.remap(nxt, target[..., 0], target[..., 1], cv2.INTER_LINEAR)
        diff = np.abs(frames[t].astype(np.float32) - warped).mean(-1)
        errors[t] = float(diff[valid].mean())
    return errors


# --------------------------------------------------------------------------- structure
def edge_map(frame: np.ndarray) -> np.ndarray:
    """Canny edges of an RGB uint8 frame as [H, W] bool (see :data:`CANNY_THRESHOLDS`)."""
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    gray = cv2.GaussianBlur(gray, (0, 0), EDGE_BLUR)
    low, high = CANNY_THRESHOLDS
    return cv2.Canny(gray, low, high, L2gradient=True) > 0


def _edge_distance(edges: np.ndarray) -> np.ndarray:
    """Distance (px) of every pixel to the nearest edge pixel (inf-like without edges)."""
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


@dataclass(frozen=True)
class SourceEdges:
    """The source clip's edge maps and their distance maps, computed once per clip and shared
    by every variant measured against it."""

    edges: tuple[np.ndarray, ...]  #: [H, W] bool per frame
    distance: tuple[np.ndarray, ...]  #: [H, W] float32 px to the nearest edge

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.edges[0].shape
        return w, h


def source_edges(source: Sequence[np.ndarray], size: tuple[int, int] | None = None) -> SourceEdges:
    """Edges of ``source`` (fitted to ``size`` = (width, height) first, as the engine fits its
    input)."""
    _check_frames(source, "source_edges")
    if size is not None:
        source = [fit_to(f, *size) for f in source]
    edges = tuple(edge_map(f) for f in source)
    return SourceEdges(edges, tuple(_edge_distance(e) for e in edges))


def edge_f1(
    edges: np.ndarray,
    reference: np.ndarray,
    tolerance: float = EDGE_TOLERANCE,
    *,
    reference_distance: np.ndarray | None = None,
) -> float:
    """F1 of the edge map ``edges`` against ``reference`` (both [H, W] bool): precision is the
    share of ``edges`` pixels within ``tolerance`` px of a reference edge, recall the share of
    reference pixels within ``tolerance`` px of an edge. Both empty: 1; one empty: 0."""
    if edges.shape != reference.shape:
        raise ValueError(f"edge_f1: edge maps of {edges.shape} and {reference.shape} differ")
    n_out, n_ref = int(edges.sum()), int(reference.sum())
    if n_out == 0 or n_ref == 0:
        return float(n_out == n_ref)
    if reference_distance is None:
        reference_distance = _edge_distance(reference)
    precision = float((reference_distance[edges] <= tolerance).mean())
    recall = float((_edge_distance(edges)[reference] <= tolerance).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def structure_scores(frames: Sequence[np.ndarray], reference: SourceEdges) -> np.ndarray:
    """Per frame t: :func:`edge_f1` of output frame t's edges against source frame t's."""
    _check_frames(frames, "structure_scores")
    w, h = reference.size
    if frames[0].shape[:2] != (h, w):
        raise ValueError(
            f"structure_scores: frames are {frames[0].shape[1]}x{frames[0].shape[0]} but the "
            f"source edges are {w}x{h}: compute them at the output size"
        )
    if len(frames) != len(reference.edges):
        raise ValueError(
            f"structure_scores: {len(frames)} frames for a source of {len(reference.edges)}: "
            "the output must have one frame per source frame"
        )
    return np.array(
        [
            edge_f1(edge_map(f), e, reference_distance=d)
            for f, e, d in zip(frames, reference.edges, reference.distance)
        ]
    )


# --------------------------------------------------------------------------- one clip
@dataclass(frozen=True)
class ClipQuality:
    """The temporal figures of one output clip (0..255 pixel scale)."""

    frame_mad: np.ndarray  #: [T - 1] consecutive-frame MAD
    mad: float
    flicker_score: float  #: VBench normalised, 1 = no change at all
    warp_errors: np.ndarray | None  #: [T - 1] per pair, None without a source
    warp_error: float | None
    after_update: np.ndarray  #: [T] output is the first after a bank update
    mad_after_update: float | None
    mad_other: float | None
    structure: np.ndarray | None = None  #: [T] edge F1 against the source, None without one
    edge_f1: float | None = None  #: its mean (1 = the source's edges kept exactly)


def measure(
    frames: Sequence[np.ndarray],
    motion: SourceMotion | None = None,
    *,
    edges: SourceEdges | None = None,
    interval: int | None = None,
    latency_frames: int = 0,
    skip: int = 0,
) -> ClipQuality:
    """All pixel figures of ``frames`` (the output clip, one frame per source frame). The first
    ``skip`` frames (the stream's and bank's warm-up) are left out of every mean; ``interval``
    is the bank's update interval (None: no bank, no update split); ``edges``, the source's,
    give the structure figure."""
    _check_frames(frames, "measure")
    if skip >= len(frames) - 1:
        raise ValueError(f"skip={skip} leaves fewer than 2 of {len(frames)} frames to measure")
    mad = frame_mad(frames)
    after = after_update_flags(len(frames), interval, latency_frames)
    mad_after, mad_other = split_mad(mad[skip:], after[skip:])
    warp = warp_errors(frames, motion) if motion is not None else None
    counted = warp[skip:] if warp is not None else None
    warp_mean = None
    if counted is not None and not np.isnan(counted).all():
        warp_mean = float(np.nanmean(counted))
    mean_mad = float(mad[skip:].mean())
    structure = structure_scores(frames, edges) if edges is not None else None
    return ClipQuality(
        frame_mad=mad,
        mad=mean_mad,
        flicker_score=flicker_score(mean_mad),
        warp_errors=warp,
        warp_error=warp_mean,
        after_update=after,
        mad_after_update=mad_after,
        mad_other=mad_other,
        structure=structure,
        edge_f1=float(structure[skip:].mean()) if structure is not None else None,
    )


# --------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class ClipConsistency:
    """CLIP frame consistency, or why it was not measured (``value`` None, ``note`` says)."""

    value: float | None
    model: str | None
    note: str


class ClipEmbedder:
    """A CLIP image encoder read from a local folder or the local Hugging Face cache (never
    downloaded). Load it once with :meth:`load` and measure any number of clips."""

    def __init__(self, name: str, processor: Any, encoder: Any) -> None:
        self.name = name
        self._processor = processor
        self._encoder = encoder.eval()

    @classmethod
    def load(cls, model: str | None = None) -> ClipEmbedder | str:
        """``model`` (hub id or folder), or the first of :data:`CLIP_MODELS` in the local cache;
        without one, the note that says why there is no CLIP figure."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        candidates = (model,) if model else CLIP_MODELS
        for name in candidates:
            try:
                processor = CLIPImageProcessor.from_pretrained(name, local_files_only=True)
                encoder = CLIPVisionModelWithProjection.from_pretrained(name, local_files_only=True)
            except OSError:
                continue
            return cls(name, processor, encoder)
        return (
            "not measured: no CLIP model in the local Hugging Face cache (tried "
            f"{', '.join(candidates)}); download one once, e.g. `huggingface-cli download "
            "openai/clip-vit-base-patch32`, or pass a local folder"
        )

    def consistency(self, frames: Sequence[np.ndarray], batch: int = 16) -> ClipConsistency:
        """Mean cosine similarity of the CLIP image embeddings of consecutive frames (1 = the
        same picture)."""
        import torch

        _check_frames(frames, "clip consistency")
        embeds = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch):
                pixels = self._processor(
                    images=list(frames[start : start + batch]), return_tensors="pt"
                )
                out = self._encoder(pixel_values=pixels.pixel_values)
                embeds.append(out.image_embeds.float())
        e = torch.nn.functional.normalize(torch.cat(embeds), dim=-1)
        value = float((e[1:] * e[:-1]).sum(-1).mean())
        return ClipConsistency(value, self.name, f"CLIP image embeddings of {self.name}")


def clip_consistency(frames: Sequence[np.ndarray], model: str | None = None) -> ClipConsistency:
    """:class:`ClipEmbedder` loaded and used once (None with a note when there is no model)."""
    embedder = ClipEmbedder.load(model)
    if isinstance(embedder, str):
        return ClipConsistency(None, None, embedder)
    return embedder.consistency(frames)
