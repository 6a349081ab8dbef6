"""ControlNet preprocessors in torch, on the engine's device, on the frame already uploaded there.

Each takes the engine's model input (``[1, 3, H, W]`` in [-1, 1], the model's dtype) and returns
the control image a diffusers ControlNet expects (``[1, 3, H, W]`` in [0, 1], same dtype). None
of them syncs with the host or allocates per frame beyond its own temporaries, so each fits in a
compiled graph. No OpenCV: Canny is kornia's (torch), depth is a transformers model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from streamv2v.config import ControlSpec

log = logging.getLogger(__name__)

#: ImageNet statistics, the Depth-Anything/DPT default when a folder has no processor config.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (image * 0.5 + 0.5).clamp(0.0, 1.0)


class ImagePreprocessor:
    """The frame itself (tile and colour ControlNets)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return to_unit(image)


class CannyPreprocessor:
    """Canny edges (kornia) as a white-on-black 3-channel image.

    kornia's own hysteresis loops until nothing changes, a host sync per iteration; here weak
    edges grow into strong ones for a fixed number of 3x3 steps instead (``hysteresis_steps``),
    which keeps the frame free of syncs and the graph static.
    """

    def __init__(self, low: float, high: float, hysteresis_steps: int) -> None:
        self.low, self.high, self.steps = low, high, hysteresis_steps

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import kornia

        # float32: thresholds are absolute gradient magnitudes; fp16 would move them.
        gray = kornia.color.rgb_to_grayscale(to_unit(image.float()))
        _, edges = kornia.filters.canny(gray, self.low, self.high, hysteresis=False)
        strong = (edges >= 1.0).float()  # kornia: 1 strong, 0.5 weak, 0 none
        weak = (edges > 0.0).float()
        for _ in range(self.steps):
            strong = weak * F.max_pool2d(strong, 3, stride=1, padding=1)
        return strong.expand(-1, 3, -1, -1).to(image.dtype)


class DepthPreprocessor:
    """Relative depth from a transformers depth-estimation model (Depth-Anything, DPT, ...),
    normalised to [0, 1] per frame (near = bright, as the depth ControlNets were trained),
    resized back to the frame. The min/max stay on the device: no sync."""

    def __init__(self, model, size: tuple[int, int], mean, std, multiple: int) -> None:
        self.model, self.size, self.multiple = model, size, multiple
        dev, dt = model.device, model.dtype
        self.mean = torch.tensor(mean, device=dev, dtype=dt).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=dev, dtype=dt).view(1, 3, 1, 1)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The model's input height, the width following the frame's aspect (a multiple of
        the patch size)."""
        m = self.multiple
        th = self.size[0]
        tw = max(m, round(th * w / h / m) * m)
        return th, tw

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        x = to_unit(image).to(self.model.dtype)
        x = F.interpolate(x, self.input_size(h, w), mode="bilinear", align_corners=False)
        depth = self.model(pixel_values=(x - self.mean) / self.std).predicted_depth
        depth = F.interpolate(depth[:, None].float(), (h, w), mode="bilinear", align_corners=False)
        lo = depth.amin(dim=(2, 3), keepdim=True)
        hi = depth.amax(dim=(2, 3), keepdim=True)
        depth = (depth - lo) / (hi - lo).clamp_min(1e-6)
        return depth.expand(-1, 3, -1, -1).to(image.dtype)


def load_depth_model(name: str, *, device, dtype, allow_pickle: bool = False) -> DepthPreprocessor:
    """A transformers depth-estimation model (hub id or folder), loaded like the other weights:
    safetensors only unless ``allow_pickle``; its processor config (if any) gives the input
    size and normalisation."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from streamv2v.loading import _load, _offline, refuse_pickle_only

    refuse_pickle_only(Path(name).expanduser(), allow_pickle)
    common = {"local_files_only": _offline()}
    model = _load(
        "depth model",
        name,
        AutoModelForDepthEstimation.from_pretrained,
        dtype=dtype,
        use_safetensors=None if allow_pickle else True,
        **common,
    )
    model.to(device=device).eval().requires_grad_(False)
    size, mean, std, multiple = (518, 518), _IMAGENET_MEAN, _IMAGENET_STD, 14
    try:
        proc = AutoImageProcessor.from_pretrained(name, **common)
    except (OSError, ValueError) as exc:  # no preprocessor_config.json: the family's defaults
        log.info("depth model %s has no image processor config (%s); using 518 px", name, exc)
    else:
        s = getattr(proc, "size", None) or {}
        side = s.get("height") or s.get("shortest_edge")
        if side:
            size = (int(side), int(s.get("width", side)))
        mean = tuple(getattr(proc, "image_mean", None) or mean)
        std = tuple(getattr(proc, "image_std", None) or std)
        multiple = int(getattr(proc, "ensure_multiple_of", None) or multiple)
    return DepthPreprocessor(model, size, mean, std, multiple)


def make_preprocessor(spec: ControlSpec, *, device, dtype, allow_pickle: bool = False):
    """The preprocessor a :class:`ControlSpec` names."""
    if spec.preprocess == "canny":
        return CannyPreprocessor(spec.low_threshold, spec.high_threshold, spec.hysteresis_steps)
    if spec.preprocess == "image":
        return ImagePreprocessor()
    assert spec.depth_model is not None  # (the config checks it)
    return load_depth_model(spec.depth_model, device=device, dtype=dtype, allow_pickle=allow_pickle)
