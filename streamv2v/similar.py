"""The similar-image filter: skip the model when the input barely changed since the last frame
that was *processed* (so slow motion adds up to a change), for a bounded run.

The cosine similarity is taken on the image average-pooled to at most 64 px a side, in the
model's dtype: a few thousand numbers instead of the full frame. Its one ``.item()`` waits only
for this frame's upload and pooling, the queue's whole content at that point. "probabilistic"
(the reference's rule) skips with probability ``max(0, 1 - (1 - cos) / (1 - threshold))``,
drawn from a generator seeded by the engine's seed (reset with the stream, so runs are
reproducible); "threshold" skips whenever ``cos > threshold``.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from streamv2v.config import EngineConfig


class SimilarFilter:
    """One configuration's filter: its pooled reference image (allocated once) and the state
    of the current stream (consecutive skips, the draws, a pending forced recompute)."""

    def __init__(self, cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config = cfg
        self.pool = max(1, max(cfg.height, cfg.width) // 64)
        small = (cfg.height // self.pool, cfg.width // self.pool)
        self.ref = torch.zeros((1, 3, *small), device=device, dtype=dtype)
        #: The next frame is processed whatever it looks like (a new prompt or new LoRA
        #: weights: the last output is of the old style and must not be repeated).
        self.recompute = False
        self.reset()

    def reset(self) -> None:
        """A new stream: no skips so far, the draws from the seed again."""
        self.recompute = False
        self.skipped = 0
        self.rng = random.Random(self.config.seed)

    def skip(self, image: torch.Tensor, have_last: bool) -> bool:
        """Whether ``image`` ([1, 3, H, W], model dtype) may reuse the last output (there is
        one when ``have_last``); when not, it becomes the reference."""
        cfg = self.config
        if not cfg.similar_filter:
            return False
        small = F.avg_pool2d(image, self.pool) if self.pool > 1 else image
        recompute, self.recompute = self.recompute, False
        if not recompute and have_last and self.skipped < cfg.similar_max_skip:
            cos = F.cosine_similarity(small.flatten().float(), self.ref.flatten().float(), 0)
            cos = cos.item()
            if cfg.similar_skip == "threshold":
                skip = cos > cfg.similar_threshold
            else:
                p_skip = 1.0 - (1.0 - cos) / (1.0 - cfg.similar_threshold)
                skip = self.rng.random() < p_skip
            if skip:
                self.skipped += 1
                return True
        self.ref.copy_(small)
        self.skipped = 0
        return False
