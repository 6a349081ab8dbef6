"""The self-attention processor that applies Extended self-Attention (EA) and Feature Fusion (FF)
with the feature bank, and the function that installs it on a UNet's self-attention layers.

A plain callable with diffusers' processor signature; cross-attention layers keep their own.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from streamv2v.bank import FeatureBank, fuse_features, multihead_attention


class FeatureBankAttnProcessor:
    """Self-attention over the current frame's tokens plus the banked ones (EA), then top-1
    cosine fusion of the output with the banked outputs (FF, in the configured layers)."""

    def __init__(self, bank: FeatureBank, name: str, fusion: bool) -> None:
        self.bank = bank
        self.name = name
        self.fusion = fusion
        if fusion:
            bank.has_fusion = True

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            # Not a plain self-attention call: nothing to bank.
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)
        bank, call, cfg = self.bank, self.bank.call, self.bank.config
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_input = hidden_states.ndim == 4
        if image_input:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        n = k.shape[1]
        buf = bank.buffer(self.name, n, k.shape[-1], k.dtype)[call.rows]  # [B, 3, M + N, C]
        m = buf.shape[2] - n
        fill = bank.fill_mask[call.rows]  # [B, 1, 1, 1]: rows whose bank starts as this frame
        # The current frame's keys/values go into the tail: EA then reads bank + frame as one.
        buf[:, 0, m:].copy_(k)
        buf[:, 1, m:].copy_(v)
        _fill_where(buf[:, 0:2], fill, n)
        bias = None
        if cfg.extended_attention:
            k, v = buf[:, 0], buf[:, 1]
            bias = bank.attn_bias(n, q.dtype)
            if bias is not None:
                bias = bias[call.rows]
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("feature bank with q/k-normalised attention")
        out = multihead_attention(q, k, v, attn.heads, attn.scale, bias).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        # O is stored every call (N tokens: cheap), so no per-frame flag decides it.
        buf[:, 2, m:].copy_(out)
        _fill_where(buf[:, 2:3], fill, n)
        if self.fusion:
            out, fused = fuse_features(
                out, buf[:, 2, :m], cfg.fusion_threshold, cfg.fusion_strength
            )
            stats = bank.fused_stats
            stats[0].add_(fused.sum())
            stats[1].add_(fused.numel())

        if image_input:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fill_where(buf: torch.Tensor, fill: torch.Tensor, tokens: int) -> None:
    """``buf`` [B, P, M + N, C]: in the rows where ``fill`` [B, 1, 1, 1] is set, the current
    frame (the tail) becomes every banked frame; other rows are left as they are. A tensor select
    (no Python branch on per-frame state), exact: the selected values are copies."""
    b, p, t, c = buf.shape
    m = t - tokens
    if m == 0:
        return
    cur = buf[:, :, m:].unsqueeze(2).expand(b, p, m // tokens, tokens, c).reshape(b, p, m, c)
    buf[:, :, :m].copy_(torch.where(fill, cur, buf[:, :, :m]))


def self_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """The UNet's self-attention modules (``attn1`` of every transformer block), by name."""
    return {
        name: mod
        for name, mod in unet.named_modules()
        if isinstance(mod, Attention) and name.endswith("attn1") and not mod.is_cross_attention
    }


class _ShapeRecorder:
    """A processor that notes the self-attention layer's (tokens, channels), then runs SDPA."""

    def __init__(self, shapes: dict[str, tuple[int, int]], name: str) -> None:
        self.shapes, self.name = shapes, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):  # fmt: skip
        if encoder_hidden_states is None:
            h = hidden_states
            tokens = h.shape[1] if h.ndim == 3 else h.shape[2] * h.shape[3]
            self.shapes[self.name] = (int(tokens), attn.to_k.out_features)
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def self_attention_shapes(
    unet: torch.nn.Module,
    latent_hw: tuple[int, int],
    embeds: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[int, int]]:
    """(tokens per frame, channels) of every self-attention layer at latent size ``latent_hw``.
    ``added_cond_kwargs``: SDXL's added conditions (any row count: the first row is used).

    Read off the UNet's blocks for diffusers' UNet2DConditionModel (:func:`_shapes_from_structure`),
    else found by one UNet pass on fake tensors (:func:`shapes_by_fake_pass`); kept per UNet and
    latent size. ``serve`` builds an engine on the shared UNet for every session that joins, on
    the one engine thread: the pass (~1 s there for the tiny model on this CPU, 3.4 s on a loaded
    2-core box) stalled every running session's frames each time."""
    known = _SHAPES.setdefault(unet, {})
    if latent_hw not in known:
        shapes = _shapes_from_structure(unet, latent_hw)
        if shapes is None:
            shapes = shapes_by_fake_pass(unet, latent_hw, embeds, added_cond_kwargs)
        known[latent_hw] = shapes
    return dict(known[latent_hw])


def shapes_by_fake_pass(
    unet: torch.nn.Module,
    latent_hw: tuple[int, int],
    embeds: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[int, int]]:
    """The shapes of :func:`self_attention_shapes` from one UNet pass on fake tensors (shapes
    only: no compute, no memory, any model and size). Leaves plain SDPA processors installed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layers = self_attention_layers(unet)
    shapes: dict[str, tuple[int, int]] = {}
    procs = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        procs[key] = _ShapeRecorder(shapes, name) if name in layers else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    c = unet.config.in_channels
    dev, dt = embeds.device, embeds.dtype
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True):
        sample = torch.empty((1, c, *latent_hw), device=dev, dtype=dt)
        t = torch.zeros(1, dtype=torch.long, device=dev)
        text = torch.empty((1, *embeds.shape[1:]), device=dev, dtype=dt)
        kw = {}
        if added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = {k: v[:1] for k, v in added_cond_kwargs.items()}
        unet(sample, t, encoder_hidden_states=text, return_dict=False, **kw)
    install_bank(unet, None)
    return shapes


def _shapes_from_structure(
    unet: torch.nn.Module, latent_hw: tuple[int, int]
) -> dict[str, tuple[int, int]] | None:
    """The shapes of :func:`self_attention_shapes` read off a diffusers UNet2DConditionModel's
    blocks (SD 1.x/2.x, SDXL): a down block's layers see its level's size, each downsampler
    (a 3x3 convolution, stride 2, padding 1) rounds it up by half, the mid block sees the last
    level and up block j the level n-1-j (diffusers upsamples to the skip's size). None for any
    other structure (the fake pass then finds them)."""
    down, up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    if type(unet).__name__ != "UNet2DConditionModel" or down is None or len(down) != len(up):
        return None
    sizes = [tuple(latent_hw)]
    for block in down[:-1]:
        samplers = getattr(block, "downsamplers", None) or []
        if len(samplers) != 1:
            return None
        conv = getattr(samplers[0], "conv", None)
        if not (
            getattr(samplers[0], "use_conv", False)
            and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.stride == (2, 2)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
        ):
            return None
        sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
    if getattr(down[-1], "downsamplers", None):
        return None
    levels = len(sizes)
    shapes: dict[str, tuple[int, int]] = {}
    for name, attn in self_attention_layers(unet).items():
        part, index = [*name.split("."), ""][:2]
        if part == "mid_block":
            level = levels - 1
        elif part in ("down_blocks", "up_blocks") and index.isdigit():
            level = int(index) if part == "down_blocks" else levels - 1 - int(index)
        else:
            return None
        h, w = sizes[level]
        shapes[name] = (h * w, attn.to_k.out_features)
    return shapes


#: :func:`self_attention_shapes` by UNet (gone with it) and latent size.
_SHAPES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], dict]] = (
    weakref.WeakKeyDictionary()
)


def install_bank(unet: torch.nn.Module, bank: FeatureBank | None) -> list[str]:
    """Put bank processors on every self-attention layer (``bank=None``: plain SDPA everywhere).

    Returns the names of the layers that apply Feature Fusion.
    """
    layers = self_attention_layers(unet)
    procs = {}
    fusion_layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        if bank is not None and name in layers:
            fusion = bank.config.feature_fusion and any(
                tag in name for tag in bank.config.fusion_layers
            )
            if fusion:
                fusion_layers.append(name)
            procs[key] = FeatureBankAttnProcessor(bank, name, fusion)
        else:
            procs[key] = AttnProcessor2_0()
    unet.set_attn_processor(procs)  # (it consumes the dict it is given)
    return fusion_layers
