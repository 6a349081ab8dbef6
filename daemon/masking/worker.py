"""The mask thread: segments each frame the engine takes, beside the engine thread, and keeps the
masks by the frame's tag (its capture time) for the output thread's composite.

The engine thread only hands the frame over (:meth:`MaskWorker.offer`: an append under a lock).
Stream batch delays the engine's output by steps-1 frames; the output carries its input's tag,
so :meth:`MaskWorker.composite` finds the mask of the very frame the styled output came from.

What gets the style is ``a + b * person`` (none: a=1, b=0; person: 0, 1; background: 1, -1); a
preset switch moves (a, b) linearly over the new preset's transition frames, so masked and
unmasked presets blend like the rest of a switch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from daemon.control.metrics import Rolling
from daemon.dataplane.frames import Frame, crop_to_aspect, fit_to
from daemon.masking.composite import Compositor
from daemon.masking.runtime import MaskUnavailable
from daemon.masking.segmenter import PersonSegmenter

if TYPE_CHECKING:
    from daemon.styles.presets import Preset

log = logging.getLogger("streamv2v")

#: (a, b) per mask mode: the style's weight is a + b * person probability.
MODES = {"none": (1.0, 0.0), "person": (0.0, 1.0), "background": (1.0, -1.0)}


@dataclass(frozen=True, slots=True)
class Masked:
    """The camera frame an output came from, cropped as the engine's input is but at the
    output's size (never through the engine's size: the kept region stays as sharp as the
    camera), and the style's weight over it (the mask's own resolution, upsampled at the
    composite)."""

    tag: float
    camera: np.ndarray
    weight: np.ndarray


class MaskWorker:
    """Segments offered frames in a thread of its own; composites styled frames on request."""

    def __init__(self, engine_size: tuple[int, int], output_size: tuple[int, int], keep: int = 32):
        self.engine_size = engine_size
        self.output_size = output_size
        self._pending: collections.deque[tuple[Frame, Preset, bool]] = collections.deque(
            maxlen=keep
        )
        # tag -> its mask, or None for a frame styled everywhere (no mask).
        self._done: collections.OrderedDict[float, Masked | None] = collections.OrderedDict()
        self._busy = False  # a frame is being segmented (out of _pending, not yet in _done)
        self._keep = keep
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mask", daemon=True)
        self._segmenter: PersonSegmenter | None = None
        self._failed = False
        self._compositor = Compositor("cpu")
        #: Where the composite runs: the engine's device when it is CUDA (measured there: 0.6 ms
        #: at 512x512 against 4-6 ms on one CPU thread, transfers included), else the CPU.
        self.device = torch.device("cpu")
        self._ab = MODES["none"]  # where the style weight is now
        self._from, self._to, self._step, self._steps = MODES["none"], MODES["none"], 0, 0
        self._smooth: np.ndarray | None = None  # the temporally smoothed person probability
        self.mode = "none"
        self.segment_ms = Rolling()
        self.composite_ms = Rolling()
        self.masked_frames = 0  # styled frames composited with their own frame's mask
        self.missed = 0  # styled frames whose own mask was not there (the nearest older used)
        self.last_pair: tuple[float, float] | None = None  # (output tag, mask tag) last used

    def start(self) -> None:
        self._thread.start()

    def use_device(self, device: torch.device) -> None:
        """The engine's device: the composite runs there when it is CUDA."""
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def offer(self, frame: Frame, preset: Preset, restart: bool = False) -> None:
        """A frame the engine is about to style with ``preset`` (cheap: no work here);
        ``restart``: the stream restarted (nothing styled before it to blend from)."""
        if preset.mask == "none" and self.mode == "none" and self._ab == MODES["none"]:
            return  # nothing masked now or fading out: no segmentation at all
        with self._cond:
            self._pending.append((frame, preset, restart))
            self._cond.notify()

    # ------------------------------------------------------------------ mask thread
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop.is_set(), 0.5)
                if not self._pending:
                    continue
                frame, preset, restart = self._pending.popleft()
                self._busy = True
            try:
                masked = self.process(frame, preset, restart)
            finally:
                with self._cond:
                    self._busy = False
                    self._done[frame.captured_at] = masked
                    while len(self._done) > self._keep:
                        self._done.popitem(last=False)
                    self._cond.notify_all()

    def process(self, frame: Frame, preset: Preset, restart: bool = False) -> Masked | None:
        """The style weight for ``frame`` under ``preset`` (None: style everywhere)."""
        self._follow(preset, restart)
        a, b = self._ab
        if b == 0.0 and a == 1.0:
            self._smooth = None  # a later mask starts from its first frame, not a stale one
            return None
        if self._segmenter is None:
            if self._failed:
                return None
            try:
                self._segmenter = PersonSegmenter()
            except MaskUnavailable as err:
                log.error("person mask: %s; styling the whole frame", err)
                self._failed = True
                return None
        t0 = time.perf_counter()
        # The part of the frame the engine styles (a view), segmented (the segmenter resizes
        # it once to its input) and kept at the output's size (one resize from the camera).
        region = crop_to_aspect(frame.image, *self.engine_size)
        person = self._segmenter(region)
        smoothing = preset.mask_smoothing
        if self._smooth is None or smoothing == 0.0:
            self._smooth = person
        else:
            # A moving average where the mask changes a little (edge noise: it settles instead
            # of flickering), none where it changes a lot (motion: no trailing ghost edge).
            change = person - self._smooth
            keep = np.abs(change)
            np.subtract(np.float32(1.0), keep, out=keep)
            keep *= keep  # (1 - |change|)^2: a fading person lets go of the mask fast
            keep *= smoothing
            self._smooth += (1.0 - keep) * change
        weight = self._smooth * np.float32(b) + np.float32(a)
        weight = self._output_part(weight)
        if preset.mask_feather > 0:  # feather pixels are output pixels: scaled per axis
            (mh, mw), (ow, oh) = weight.shape, self.output_size
            sx, sy = preset.mask_feather * mw / ow, preset.mask_feather * mh / oh
            weight = cv2.GaussianBlur(weight, (0, 0), sigmaX=sx, sigmaY=sy)
        np.clip(weight, 0.0, 1.0, out=weight)
        camera = fit_to(region, *self.output_size)
        self.segment_ms.add((time.perf_counter() - t0) * 1000)
        return Masked(frame.captured_at, camera, weight)

    def _output_part(self, weight: np.ndarray) -> np.ndarray:
        """The part of the mask (over the engine's frame) that the output shows: the output
        crops the engine's frame to its own aspect, the mask is cropped alike (a view)."""
        (ew, eh), (ow, oh) = self.engine_size, self.output_size
        if ew * oh == ow * eh:
            return weight
        ch, cw = crop_to_aspect(np.empty((eh, ew, 0), np.uint8), ow, oh).shape[:2]
        mh, mw = weight.shape
        keep_h, keep_w = max(1, round(mh * ch / eh)), max(1, round(mw * cw / ew))
        y0, x0 = (mh - keep_h) // 2, (mw - keep_w) // 2
        return weight[y0 : y0 + keep_h, x0 : x0 + keep_w]

    def _follow(self, preset: Preset, restart: bool) -> None:
        """Move (a, b) one frame on towards the preset's mask mode (at once on a restart)."""
        if restart:
            self.mode, self._ab = preset.mask, MODES[preset.mask]
            self._from = self._to = self._ab
        if preset.mask != self.mode:
            self.mode = preset.mask
            self._from, self._to = self._ab, MODES[preset.mask]
            self._step, self._steps = 0, max(1, preset.transition_frames)
        if self._ab != self._to:
            self._step += 1
            w = min(1.0, self._step / self._steps)
            (a0, b0), (a1, b1) = self._from, self._to
            self._ab = self._to if w >= 1.0 else (a0 + w * (a1 - a0), b0 + w * (b1 - b0))

    # ------------------------------------------------------------------ output thread
    def lookup(self, tag: float, timeout: float) -> Masked | None:
        """The mask of the frame tagged ``tag``, waiting up to ``timeout`` s for it; else the
        newest older one (counted as missed), or None when there is none."""
        with self._cond:
            if tag in self._done:
                return self._done[tag]
            self._cond.wait_for(
                lambda: (
                    tag in self._done or not (self._pending or self._busy) or self._stop.is_set()
                ),
                timeout,
            )
            if tag in self._done:
                return self._done[tag]
            # Never offered (no mask in use), or not done in time: the newest older frame's.
            older = [t for t in self._done if t <= tag]
            found = self._done[older[-1]] if older else None
            self.missed += found is not None
            return found

    def composite(self, styled: Frame, image: np.ndarray, timeout: float) -> np.ndarray:
        """``image`` (``styled`` at the output size) with the camera where the mask keeps it."""
        masked = self.lookup(styled.captured_at, timeout)
        if masked is None:
            return image
        t0 = time.perf_counter()
        if self._compositor.device != self.device:
            self._compositor = Compositor(self.device)
        h, w = image.shape[:2]
        out = self._compositor(image, fit_to(masked.camera, w, h), masked.weight)
        self.composite_ms.add((time.perf_counter() - t0) * 1000)
        self.masked_frames += 1
        self.last_pair = (styled.captured_at, masked.tag)
        return out
