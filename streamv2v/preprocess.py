"""ControlNet preprocessors in torch, on the engine's device, on the frame already uploaded there.

Each takes the engine's model input (``[1, 3, H, W]`` in [-1, 1], the model's dtype) and returns
the control image a diffusers ControlNet expects (``[1, 3, H, W]`` in [0, 1], same dtype). None
of them syncs with the host or allocates per frame beyond its own temporaries, so each fits in a
compiled graph. No OpenCV: Canny is OpenCV's algorithm written in torch, depth is a
transformers model.
"""

from __future__ import annotations

import logging
import math
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


#: OpenCV's Canny: tan(22.5 deg) in 15-bit fixed point, its direction binning's constant.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)


def canny(image: torch.Tensor, low: float, high: float, hysteresis_steps: int) -> torch.Tensor:
    """OpenCV's ``cv2.Canny(rgb, low, high)`` (aperture 3, L1 gradient) on ``[N, C, H, W]``
    images in [0, 1] -> ``[N, 1, H, W]`` edges (0/1, the image's dtype).

    As OpenCV computes it: the image in 0-255 steps (rounded, so a uint8 frame gives OpenCV's
    integers whatever the dtype it travelled in), a 3x3 Sobel per channel (borders replicated),
    per pixel the channel with the largest L1 magnitude ``|dx| + |dy|`` (the first on ties),
    non-maximum suppression with OpenCV's fixed-point tangent binning into 4 directions and its
    comparisons (``>`` on the side before, ``>=`` on the side after; ``>`` on both diagonals;
    zero magnitude outside the image), then hysteresis from the pixels above ``high`` through
    8-connected pixels above ``low`` (thresholds floored, as OpenCV does).

    OpenCV's hysteresis follows every chain to its end, a loop whose length depends on the
    image; here it is ``hysteresis_steps`` 3x3 growth steps, a fixed count: no host sync and a
    static graph. A weak chain longer than that from its strong end is cut there.
    """
    x = torch.round(image.float() * 255.0)
    n, c, h, w = x.shape
    flat = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grad = F.conv2d(flat, torch.stack([kx, kx.t()])[:, None])  # [N*C, 2, H, W]: dx, dy
    grad = grad.reshape(n, c, 2, h, w)
    mag = grad.abs().sum(2)  # [N, C, H, W], L1
    best = mag.argmax(1, keepdim=True)  # the first channel of the largest magnitude
    mag = mag.gather(1, best)  # [N, 1, H, W]
    g = grad.gather(1, best[:, :, None].expand(-1, -1, 2, -1, -1))[:, 0].to(torch.int32)
    dx, dy = g[:, :1], g[:, 1:]

    # The 8 neighbours' magnitudes, zero outside the image (OpenCV's zeroed border rows).
    m = F.pad(mag, (1, 1, 1, 1))

    def at(oy: int, ox: int) -> torch.Tensor:
        return m[:, :, 1 + oy : 1 + oy + h, 1 + ox : 1 + ox + w]

    # OpenCV's binning in integers (|dy| << 15 exceeds float32's exact range).
    ax, ay = dx.abs(), dy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    s_pos = (dx ^ dy) >= 0  # same signs: the diagonal from top-left to bottom-right
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = torch.where(
        s_pos,
        (mag > at(-1, -1)) & (mag > at(1, 1)),
        (mag > at(-1, 1)) & (mag > at(1, -1)),
    )
    peak = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    weak = (peak & (mag > math.floor(low))).to(mag.dtype)
    strong = weak * (mag > math.floor(high)).to(mag.dtype)
    for _ in range(hysteresis_steps):
        strong = weak * F.max_pool2d(strong, 3, stride=1, padding=1)
    return strong.to(image.dtype)


class CannyPreprocessor:
    """Canny edges as the ControlNet annotators make them (:func:`canny`, OpenCV's on the RGB
    frame, thresholds in OpenCV's units), white on black in 3 channels."""

    def __init__(self, low: float, high: float, hysteresis_steps: int) -> None:
        self.low, self.high, self.steps = low, high, hysteresis_steps

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        edges = canny(to_unit(image.float()), self.low, self.high, self.steps)
        return edges.expand(-1, 3, -1, -1).to(image.dtype)


#: transformers depth models whose output is a metric distance (near = small) whatever their
#: config says; Depth Anything says it in ``depth_estimation_type``.
_DISTANCE_MODEL_TYPES = frozenset({"zoedepth", "glpn", "depth_pro"})


def outputs_distance(config) -> bool:
    """Whether a transformers depth model's output is a distance (near = small: metric models)
    rather than relative inverse depth (near = large: DPT/MiDaS, Depth Anything relative), from
    its config."""
    if getattr(config, "depth_estimation_type", None) == "metric":
        return True
    return getattr(config, "model_type", None) in _DISTANCE_MODEL_TYPES


class DepthPreprocessor:
    """Depth from a transformers depth-estimation model (Depth-Anything, DPT, ZoeDepth, ...),
    normalised to [0, 1] per frame, near = bright as the depth ControlNets were trained
    (``invert``: 1 - map, for models whose output is a distance), resized back to the frame.
    The min/max stay on the device: no sync."""

    def __init__(
        self, model, size: tuple[int, int], mean, std, multiple: int, invert: bool = False
    ) -> None:
        self.model, self.size, self.multiple, self.invert = model, size, multiple, invert
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
        if self.invert:
            depth = 1.0 - depth
        return depth.expand(-1, 3, -1, -1).to(image.dtype)


def load_depth_model(
    name: str, *, device, dtype, allow_pickle: bool = False, invert: bool | None = None
) -> DepthPreprocessor:
    """A transformers depth-estimation model (hub id or folder), loaded like the other weights:
    safetensors only unless ``allow_pickle``; its processor config (if any) gives the input
    size and normalisation. ``invert`` None: from the model's config
    (:func:`outputs_distance`)."""
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
    if invert is None:
        invert = outputs_distance(model.config)
        kind = "a distance (metric)" if invert else "relative inverse depth"
        log.info(
            "depth model %s outputs %s: near is bright %s (set invert to override)",
            name,
            kind,
            "after inverting" if invert else "as it is",
        )
    return DepthPreprocessor(model, size, mean, std, multiple, invert)


def make_preprocessor(spec: ControlSpec, *, device, dtype, allow_pickle: bool = False):
    """The preprocessor a :class:`ControlSpec` names."""
    if spec.preprocess == "canny":
        return CannyPreprocessor(spec.low_threshold, spec.high_threshold, spec.hysteresis_steps)
    if spec.preprocess == "image":
        return ImagePreprocessor()
    assert spec.depth_model is not None  # (the config checks it)
    return load_depth_model(
        spec.depth_model,
        device=device,
        dtype=dtype,
        allow_pickle=allow_pickle,
        invert=spec.invert,
    )
