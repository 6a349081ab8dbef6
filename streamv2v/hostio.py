"""Host <-> device copies of frames: pinned staging buffers on CUDA, so the upload and the
download are real asynchronous DMA transfers; plain copies elsewhere (pinning buys nothing on
the CPU). One code path for both: :class:`HostIO` decides once from the device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def frame_to_image(
    frame: np.ndarray | torch.Tensor, size: tuple[int, int], io: HostIO, dtype: torch.dtype
) -> torch.Tensor:
    """HxWx3 uint8 RGB -> [1, 3, height, width] in [-1, 1], ``dtype``, on ``io``'s device:
    center-cropped to the working aspect, uploaded as uint8, resized and scaled on the device."""
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(frame)
    if not isinstance(frame, torch.Tensor):
        raise TypeError(f"frame must be a numpy array or a torch tensor, not {type(frame)}")
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ValueError(
            f"frame must be HxWx3 uint8 RGB, got shape {tuple(frame.shape)} {frame.dtype}"
        )
    h, w = frame.shape[:2]
    th, tw = size
    # Center crop to the working aspect ratio (a view: costs nothing).
    if h * tw > w * th:
        ch = max(1, round(w * th / tw))
        frame = frame[(h - ch) // 2 : (h - ch) // 2 + ch]
    elif h * tw < w * th:
        cw = max(1, round(h * tw / th))
        frame = frame[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    # Upload uint8 (4x fewer bytes than float), then convert on the device.
    img = io.upload(frame[..., :3]).permute(2, 0, 1).unsqueeze(0)
    if img.shape[-2:] != (th, tw):
        img = F.interpolate(img.float(), size=(th, tw), mode="bilinear", antialias=True)
    # Contiguous whatever the path (resized or not): one memory layout, one compiled graph.
    img = img.to(dtype=dtype, memory_format=torch.contiguous_format)
    return img.mul_(2.0 / 255.0).sub_(1.0)
