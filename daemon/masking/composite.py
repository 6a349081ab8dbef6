"""The composite: the styled frame where the mask says "style", the camera frame elsewhere.

Torch ops on one device (one code path): the output thread composites on the host, where both
frames already are (the engine downloads its output once for the sinks); bench/mask.py and
bench/gpu.py measure the same code on CUDA. Buffers are kept per output size: nothing grows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Compositor:
    """``camera + mask * (styled - camera)`` at the output size, the mask upsampled bilinearly.

    Not thread-safe: one thread (the output thread) owns it.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._size: tuple[int, int] | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _buffers(self, h: int, w: int) -> None:
        if self._size == (h, w):
            return
        self._size = (h, w)
        make = torch.empty
        self._camera = make((h, w, 3), dtype=torch.float32, device=self.device)
        self._styled = make((h, w, 3), dtype=torch.float32, device=self.device)
        self._out = make((h, w, 3), dtype=torch.uint8, device=self.device)
        self._host = torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=self._stream is not None)

    @torch.inference_mode()
    def __call__(self, styled: np.ndarray, camera: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``styled`` and ``camera``: HxWx3 uint8 (the output size); ``mask``: float32 hxw in
        0..1, the style's weight (any size: upsampled to HxW). Returns a new HxWx3 uint8 array."""
        h, w = styled.shape[:2]
        if camera.shape != styled.shape:
            raise ValueError(f"camera {camera.shape} and styled {styled.shape} differ")
        self._buffers(h, w)
        if self._stream is not None:
            # Its own stream, waiting for nothing queued: the inputs come from host memory, so
            # the engine's work in flight never delays the composite (nor the reverse).
            with torch.cuda.stream(self._stream):
                self._blend(styled, camera, mask)
                self._host.copy_(self._out, non_blocking=True)
            self._stream.synchronize()
            return self._host.numpy().copy()
        self._blend(styled, camera, mask)
        return self._out.numpy().copy()

    def _blend(self, styled: np.ndarray, camera: np.ndarray, mask: np.ndarray) -> None:
        h, w = self._size  # type: ignore[misc]
        dev = self.device
        self._camera.copy_(torch.from_numpy(camera).to(dev, non_blocking=True))
        self._styled.copy_(torch.from_numpy(styled).to(dev, non_blocking=True))
        m = torch.from_numpy(mask).to(dev, non_blocking=True)[None, None]
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        # camera + m * (styled - camera), rounded (+0.5, then the cast truncates: values are
        # >= 0): where m is 0 the camera comes back exactly.
        torch.lerp(self._camera, self._styled, m[0, 0, :, :, None], out=self._styled)
        self._out.copy_(self._styled.add_(0.5))
