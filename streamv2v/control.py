"""ControlNet conditioning in the stream batch.

Every UNet call of a frame gets, for each ControlNet, a preallocated buffer of control images with
one row per batch row. In stream batch, row i holds slot i's frame, i.e. the frame of i calls ago:
before each call the rows move one slot on with their frames (exactly like the latents and the
residual-CFG stock) and row 0 takes the new frame's control image. Guidance rows (the
unconditional rows of "full"/"initialize") get the same control as the row they guide. The
control image is computed once per input frame, never per step.

The ControlNets run on the same rows, timesteps and embeddings as the UNet; their residuals,
times a per-ControlNet scale held in a device tensor, go into the UNet's
``down_block_additional_residuals``/``mid_block_additional_residual``. A scale change is a
tensor write: no re-prepare, no recompile. ControlNet and UNet are one callable, compiled as one
graph. The feature bank's attention processors sit on the UNet only: the ControlNet's own
self-attention is not banked.

Guess mode (diffusers'): a ControlNet whose config sets ``global_pool_conditions`` (shuffle) or
whose spec asks for ``guess_mode`` runs on the conditional rows only; the unconditional rows of
"full"/"initialize" guidance get no residual from it. Without ``global_pool_conditions`` diffusers'
guess-mode scales apply too (the residuals fade from 1 at the mid block to 0.1 at the first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from streamv2v.config import ControlSpec
from streamv2v.errors import ModelLoadError

#: ControlNet config keys that must equal the UNet's for its residuals to fit.
_MUST_MATCH = (
    "addition_embed_type",  # SD1.5/2.1 (None) or SDXL ("text_time"): the family
    "block_out_channels",
    "cross_attention_dim",
    "in_channels",
    "layers_per_block",
)


def _first(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``t`` (a 0-d timestep as it is)."""
    return t if t.ndim == 0 or t.shape[0] == n else t[:n]


def _added(added_cond_kwargs: dict[str, torch.Tensor] | None, n: int) -> dict:
    """SDXL's added conditions for the first ``n`` rows (none for SD1.5/2.1)."""
    if added_cond_kwargs is None:
        return {}
    return {"added_cond_kwargs": {k: _first(v, n) for k, v in added_cond_kwargs.items()}}


class ControlledUNet(torch.nn.Module):
    """The UNet with its ControlNets: ``unet(sample, t, encoder_hidden_states=...)`` plus
    ``control`` (one ``[rows, 3, H, W]`` image batch per ControlNet). One module, so the
    compiled path compiles ControlNets and UNet as one graph."""

    def __init__(
        self,
        unet,
        nets: Sequence[torch.nn.Module],
        scales: torch.Tensor,
        guess: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.nets = torch.nn.ModuleList(nets)
        self.scales = scales
        self.guess = list(guess) if guess is not None else [False] * len(nets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        control: Sequence[torch.Tensor],
        return_dict: bool = False,
        cond_rows: int | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor]:
        """``cond_rows``: the first rows are conditional, the rest guidance's unconditional
        rows (None: all conditional). A guess-mode ControlNet runs on the conditional rows only
        and adds nothing to the others, as diffusers' pipelines do. ``added_cond_kwargs``
        (SDXL: pooled text, time ids) go to ControlNets and UNet alike."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        rows = sample.shape[0]
        for i, (net, image) in enumerate(zip(self.nets, control)):
            n = cond_rows if self.guess[i] and cond_rows is not None else rows
            d, m = net(
                _first(sample, n),
                _first(timestep, n),
                encoder_hidden_states=_first(encoder_hidden_states, n),
                controlnet_cond=_first(image, n),
                conditioning_scale=self.scales[i],  # a 0-d device tensor: a write, no recompile
                guess_mode=self.guess[i],
                return_dict=False,
                **_added(added_cond_kwargs, n),
            )
            if n < rows:  # zero residuals on the unconditional rows
                d = [torch.cat([r, r.new_zeros((rows - n, *r.shape[1:]))]) for r in d]
                m = torch.cat([m, m.new_zeros((rows - n, *m.shape[1:]))])
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **_added(added_cond_kwargs, rows),
        )


class ControlStream:
    """The ControlNets of an engine, their preprocessors, scales and per-call control rows."""

    def __init__(
        self,
        nets: Sequence[torch.nn.Module],
        preprocessors: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        specs: Sequence[ControlSpec],
    ) -> None:
        if not (len(nets) == len(preprocessors) == len(specs)) or not nets:
            raise ValueError("one ControlNet and one preprocessor per ControlSpec")
        self.nets = list(nets)
        self.preprocessors = list(preprocessors)
        self.names = [s.name for s in specs]
        #: diffusers' guess mode, per ControlNet: asked for, or implied by its config
        self.guess = [
            bool(s.guess_mode or getattr(net.config, "global_pool_conditions", False))
            for s, net in zip(specs, self.nets)
        ]
        ref = self.nets[0]
        self.scales = torch.tensor([s.scale for s in specs], device=ref.device, dtype=ref.dtype)

    def model(self, unet) -> ControlledUNet:
        """UNet + ControlNets as one module (what the engine calls, or compiles)."""
        return ControlledUNet(unet, self.nets, self.scales, self.guess)

    def preprocess(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Each ControlNet's control image of one frame (``[1, 3, H, W]``, [0, 1])."""
        return [p(image) for p in self.preprocessors]

    def allocate(self, calls: Sequence[Any], height: int, width: int) -> None:
        """Give each UNet call its control rows: one buffer per ControlNet, one row per batch
        row, allocated once per configuration (fixed addresses: static for compiling)."""
        ref = self.nets[0]
        for call in calls:
            rows = call.timesteps.shape[0]
            call.control = [
                torch.zeros((rows, 3, height, width), device=ref.device, dtype=ref.dtype)
                for _ in self.nets
            ]

    def begin_frame(
        self, images: Sequence[torch.Tensor], calls: Sequence[Any], stream_batch: bool
    ) -> None:
        """A new frame enters the stream: in stream batch every row's control image moves one
        slot on with its frame and row 0 takes the new one; sequentially every call denoises
        the new frame. Guidance rows copy the rows they guide. In-place copies only."""
        for call in calls:
            n = call.slots.stop - call.slots.start
            for buf, image in zip(call.control, images):
                if stream_batch:
                    for i in range(n - 1, 0, -1):  # oldest first: no row is overwritten unread
                        buf[i].copy_(buf[i - 1])
                    buf[0:1].copy_(image)
                else:
                    buf[:n].copy_(image.expand(n, -1, -1, -1))
                if call.uncond_rows is not None:
                    buf[n:].copy_(buf[call.uncond_rows])

    def set_scales(self, scales: Sequence[float]) -> None:
        """Write the scales into the device tensor the graphs read (no recompile)."""
        self.scales.copy_(torch.tensor([float(s) for s in scales], dtype=self.scales.dtype))

    def static_tensors(self, calls: Sequence[Any]) -> list[torch.Tensor]:
        return [self.scales, *(t for call in calls for t in call.control)]


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def load_control(
    specs: Sequence[ControlSpec],
    unet,
    *,
    allow_pickle: bool = False,
) -> ControlStream | None:
    """Load each spec's ControlNet (diffusers ``ControlNetModel``, hub id or folder, safetensors
    only unless ``allow_pickle``) and preprocessor, on the UNet's device and dtype."""
    if not specs:
        return None
    from diffusers import ControlNetModel

    from streamv2v.families import family_of_unet
    from streamv2v.loading import _load, _offline, refuse_pickle_only
    from streamv2v.preprocess import make_preprocessor

    dev, dt = unet.device, unet.dtype
    nets, preps = [], []
    for spec in specs:
        refuse_pickle_only(Path(os.path.expanduser(spec.model)), allow_pickle)
        net = _load(
            "ControlNet",
            spec.model,
            ControlNetModel.from_pretrained,
            torch_dtype=dt,
            use_safetensors=None if allow_pickle else True,
            local_files_only=_offline(),
        )
        for key in _MUST_MATCH:
            want, got = _plain(unet.config.get(key)), _plain(net.config.get(key))
            if want != got:
                family = family_of_unet(unet.config).label
                raise ModelLoadError(
                    f"ControlNet {spec.model!r} does not fit the model: its {key} is {got}, the "
                    f"UNet's is {want}; use a ControlNet trained for this base model family "
                    f"({family})"
                )
        net.to(device=dev).eval().requires_grad_(False)
        nets.append(net)
        preps.append(make_preprocessor(spec, device=dev, dtype=dt, allow_pickle=allow_pickle))
    return ControlStream(nets, preps, specs)
