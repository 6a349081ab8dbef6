"""How much accelerator memory an engine configuration needs, worked out before anything is
loaded, and the ladder of lighter configurations to fall back on.

Pure functions over numbers read from a model's config files (no weights, no device): the
daemon compares :func:`estimate_memory` with the free memory on CUDA before it loads, and walks
:func:`lower` (feature-bank frames first, then steps, then size) both to name what to lower when
it will not fit and to step down after an out-of-memory error at run time.

The parts, in bytes at the run dtype:

- weights: every parameter the engine loads (UNet, text encoder, VAE, ControlNets and a depth
  preprocessor's model) x the dtype's size;
- feature bank: per self-attention layer and per bank row, K/V/O buffers of ``max_frames + 1``
  frames of tokens (what :class:`~streamv2v.bank.FeatureBank` allocates, exactly);
- activations: what one UNet call keeps alive, per row of its batch (stream-batch slots x
  guidance rows): the skip connections of the down path, plus the working set of the largest
  transformer block (hidden states, Q/K/V/out, the feed-forward's 8x inner projection). SDPA's
  fused kernels on CUDA never hold the attention matrix, so it is not counted; each ControlNet
  runs a copy of the down path on the same rows, and its residuals are held for the UNet: one
  more skip set and working set per row;
- VAE: encoding and decoding one frame at full resolution (a few full-size feature maps);
- the presets' style LoRAs, when given: their factors and the base copies of the layers they
  touch (:mod:`streamv2v.lora_memory`, from the files' headers);

times ``captured`` for activations when CUDA graphs keep one memory pool per warmed
configuration, plus ``OVERHEAD`` for the allocator's fragmentation and cuBLAS workspaces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamv2v.config import BankConfig, EngineConfig

#: Allocator slack (fragmentation, cuBLAS/cuDNN workspaces) on top of the estimate.
OVERHEAD = 1.15
#: Working set of a transformer block in units of tokens x channels (see the module doc).
_BLOCK_WORKING_SET = 20
#: Full-resolution feature maps alive at once while the VAE encodes or decodes a frame.
_VAE_MAPS = 6
_GIB = 1024**3


@dataclass(frozen=True)
class UNetLayout:
    """What the estimate needs of a UNet, read from its ``config.json``."""

    block_out_channels: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool
    layers_per_block: tuple[int, ...]
    transformer_layers: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """From a diffusers ``UNet2DConditionModel`` config (the dict of its config.json)."""
        channels = tuple(int(c) for c in config["block_out_channels"])
        levels = len(channels)

        def per_level(value: Any) -> tuple[int, ...]:
            return (
                tuple(int(v) for v in value)
                if isinstance(value, Sequence)
                else (int(value),) * levels
            )

        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            block_out_channels=channels,
            down_attention=tuple("CrossAttn" in t for t in config["down_block_types"]),
            up_attention=tuple("CrossAttn" in t for t in config["up_block_types"]),
            mid_attention=mid is not None and "CrossAttn" in mid,
            layers_per_block=per_level(config.get("layers_per_block", 2)),
            transformer_layers=per_level(config.get("transformer_layers_per_block", 1)),
        )

    def levels(self, latent_hw: tuple[int, int]) -> list[int]:
        """Tokens at each resolution level (a stride-2 downsample rounds up)."""
        h, w = latent_hw
        tokens = []
        for _ in self.block_out_channels:
            tokens.append(h * w)
            h, w = (h + 1) // 2, (w + 1) // 2
        return tokens

    def self_attention(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(tokens, channels) of every self-attention layer, down, mid and up."""
        tokens = self.levels(latent_hw)
        layers: list[tuple[int, int]] = []
        for i, c in enumerate(self.block_out_channels):
            if self.down_attention[i]:
                layers += [(tokens[i], c)] * (self.layers_per_block[i] * self.transformer_layers[i])
        if self.mid_attention:
            layers += [(tokens[-1], self.block_out_channels[-1])] * self.transformer_layers[-1]
        for j, i in enumerate(reversed(range(len(self.block_out_channels)))):
            if self.up_attention[j]:
                count = (self.layers_per_block[i] + 1) * self.transformer_layers[i]
                layers += [(tokens[i], self.block_out_channels[i])] * count
        return layers

    def skip_elements(self, latent_hw: tuple[int, int]) -> int:
        """Elements per batch row held for the up path: conv_in, then each down block's layer
        outputs and its downsample."""
        tokens = self.levels(latent_hw)
        held = tokens[0] * self.block_out_channels[0]
        last = len(self.block_out_channels) - 1
        for i, c in enumerate(self.block_out_channels):
            held += self.layers_per_block[i] * tokens[i] * c
            if i < last:
                held += tokens[i + 1] * c
        return held


@dataclass(frozen=True)
class MemoryNeed:
    """The estimate, in bytes, by part."""

    weights: int
    activations: int
    bank: int
    vae: int
    #: the presets' style LoRAs (streamv2v.lora_memory): their factors, and the base copies
    #: of the layers they touch (0 when those are kept in host memory)
    lora_factors: int = 0
    lora_base: int = 0

    @property
    def total(self) -> int:
        parts = self.weights + self.activations + self.bank + self.vae
        return int((parts + self.lora_factors + self.lora_base) * OVERHEAD)

    def describe(self) -> str:
        loras = (
            [("LoRAs", self.lora_factors), ("LoRA base copies", self.lora_base)]
            if self.lora_factors or self.lora_base
            else []
        )
        parts = ", ".join(
            f"{name} {gib(value)}"
            for name, value in (
                ("weights", self.weights),
                ("activations", self.activations),
                ("bank", self.bank),
                ("VAE", self.vae),
                *loras,
            )
        )
        return f"{gib(self.total)} ({parts}, +{round((OVERHEAD - 1) * 100)}% slack)"


def gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB"


def unet_rows(config: EngineConfig) -> tuple[int, int]:
    """(rows of the largest UNet call, rows the feature bank keeps): stream-batch slots plus
    the unconditional rows of the guidance mode (none below a scale of 1, as the engine does)."""
    k = config.steps
    mode = config.guidance if config.guidance_scale > 1.0 else "none"
    extra = {"full": k, "initialize": 1}.get(mode, 0)
    if config.stream_batch:
        return k + extra, k + extra
    per_call = 2 if mode in ("full", "initialize") else 1
    return per_call, k + extra


def estimate_memory(
    config: EngineConfig,
    layout: UNetLayout,
    *,
    weight_params: int,
    dtype_bytes: int,
    vae_channels: int,
    captured: int = 1,
    controlnets: int = 0,
) -> MemoryNeed:
    """The memory ``config`` needs on a UNet of ``layout`` with ``weight_params`` parameters in
    all, at ``dtype_bytes`` per element; ``vae_channels``: the VAE's full-resolution channels;
    ``captured``: configurations whose CUDA graphs each keep their own activations;
    ``controlnets``: ControlNets run beside the UNet (their weights are in ``weight_params``)."""
    latent = (config.height // 8, config.width // 8)
    call_rows, bank_rows = unet_rows(config)
    attention = layout.self_attention(latent)
    bank = 0
    if config.bank.enabled:
        frames = config.bank.max_frames + 1  # the banked frames, then the current one
        bank = 3 * frames * bank_rows * sum(t * c for t, c in attention) * dtype_bytes
    block = max(
        (t * c for t, c in attention),
        default=max(t * c for t, c in zip(layout.levels(latent), layout.block_out_channels)),
    )
    per_row = (layout.skip_elements(latent) + _BLOCK_WORKING_SET * block) * (1 + controlnets)
    activations = per_row * call_rows * dtype_bytes * max(1, captured)
    vae = _VAE_MAPS * vae_channels * config.width * config.height * dtype_bytes
    return MemoryNeed(weight_params * dtype_bytes, activations, bank, vae)


def lower(config: EngineConfig) -> tuple[EngineConfig, str] | None:
    """One step lighter than ``config``, and what changed: feature-bank frames (halved, then
    the bank off), then steps (one fewer), then size (3/4 a side, multiples of 8, at least 64);
    None at the floor."""
    bank = config.bank
    if bank.enabled:
        frames = bank.max_frames // 2
        return with_bank_frames(config, frames), (
            f"bank.max_frames {bank.max_frames} -> {frames}" if frames else "feature bank off"
        )
    if config.steps > 1:
        return with_steps(config, config.steps - 1), f"steps {config.steps} -> {config.steps - 1}"
    width, height = (max(64, int(side * 0.75) // 8 * 8) for side in (config.width, config.height))
    if (width, height) == (config.width, config.height):
        return None
    old = f"{config.width}x{config.height}"
    return with_size(config, width, height), f"size {old} -> {width}x{height}"


def with_bank_frames(config: EngineConfig, frames: int) -> EngineConfig:
    """``config`` with a bank of ``frames`` frames (0: the bank off); a merging bank gets the
    merge ratio that keeps its size constant."""
    bank = config.bank
    if frames <= 0:
        return _with(config, bank=_bank(bank, enabled=False))
    ratio = 1.0 / (frames + 1) if bank.mode in ("dyme", "stable") else bank.merge_ratio
    return _with(config, bank=_bank(bank, max_frames=frames, merge_ratio=ratio))


def with_steps(config: EngineConfig, steps: int) -> EngineConfig:
    """``config`` with ``steps`` steps (timesteps derived from its strength again)."""
    return _with(config, steps=steps, t_index_list=None)


def with_size(config: EngineConfig, width: int, height: int) -> EngineConfig:
    return _with(config, width=width, height=height)


def config_changes(old: EngineConfig, new: EngineConfig) -> list[str]:
    """What :func:`lower` changed between ``old`` and ``new``, as settings keys."""
    changes = []
    if old.bank.enabled and not new.bank.enabled:
        changes.append("bank.enabled = false")
    elif new.bank.enabled and new.bank.max_frames < old.bank.max_frames:
        changes.append(f"bank.max_frames = {new.bank.max_frames}")
    if new.steps < old.steps:
        changes.append(f"steps = {new.steps}")
    if (new.width, new.height) != (old.width, old.height):
        changes.append(f"width = {new.width}, height = {new.height}")
    return changes


def fitting(
    config: EngineConfig, need: Callable[[EngineConfig], MemoryNeed], free: int
) -> tuple[EngineConfig | None, list[str]]:
    """Walk :func:`lower` from ``config`` until ``need(cfg).total`` fits in ``free`` bytes;
    returns the first that fits (None: none does) and the changes on the way."""
    changes: list[str] = []
    current = config
    while need(current).total > free:
        step = lower(current)
        if step is None:
            return None, changes
        current, change = step
        changes.append(change)
    return current, changes


def _with(config: EngineConfig, **update: Any) -> EngineConfig:
    return EngineConfig.model_validate({**config.model_dump(), **update})


def _bank(bank: BankConfig, **update: Any) -> BankConfig:
    return BankConfig.model_validate({**bank.model_dump(), **update})
