"""Host <-> device copies of frames: pinned staging buffers on CUDA, so the upload and the
download are real asynchronous DMA transfers; plain copies elsewhere (pinning buys nothing on
the CPU). One code path for both: :class:`HostIO` decides once from the device."""

from __future__ import annotations

import numpy as np
import torch


class HostIO:
    """Uploads uint8 frames and downloads uint8 images through reusable staging buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._up: torch.Tensor | None = None  # pinned upload staging (reallocated on new shape)
        self._up_done: torch.cuda.Event | None = None  # the last upload has left the staging
        self._down: torch.Tensor | None = None
        self._down_done: torch.cuda.Event | None = None

    def upload(self, frame: torch.Tensor) -> torch.Tensor:
        """``frame`` (uint8, any device) on the engine's device. From the host on CUDA: copied into
        pinned memory, then sent with ``non_blocking=True`` (the copy overlaps queued work)."""
        if not self.pinned or frame.device.type != "cpu":
            return frame.to(self.device, non_blocking=True)
        if self._up is None or self._up.shape != frame.shape:
            self._up = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True)
            self._up_done = torch.cuda.Event()
        elif self._up_done is not None:
            self._up_done.synchronize()  # (normally long done) never overwrite a copy in flight
        self._up.copy_(frame)
        out = self._up.to(self.device, non_blocking=True)
        self._up_done.record()
        return out

    def download(self, image: torch.Tensor) -> np.ndarray:
        """``image`` (uint8 on the device) as a numpy array the caller owns. On CUDA: an async
        copy into a pinned buffer, an event, a wait on that event only, then one host copy (the
        caller may keep the array while the next frame downloads)."""
        if not self.pinned:
            return image.cpu().numpy()
        if self._down is None or self._down.shape != image.shape:
            self._down = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
            self._down_done = torch.cuda.Event()
        self._down.copy_(image, non_blocking=True)
        self._down_done.record()
        self._down_done.synchronize()
        return self._down.numpy().copy()
