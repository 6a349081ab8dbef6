"""Engine settings as data (pydantic): validated once, read by the engine, never mutated."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Length of the LCM training-style schedule that ``t_index_list`` indexes into.
SCHEDULE_STEPS = 50

#: The tiny autoencoder (TAESD) that makes real time possible; ``vae="model"`` uses the model's own.
DEFAULT_VAE = "madebyollin/taesd"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class LoraSpec(_Strict):
    """A LoRA adapter fused into the UNet at load time (e.g. the LCM-LoRA for SD1.5 models)."""

    id: str = Field(description="Hub id, local folder or .safetensors file of the LoRA.")
    scale: float = Field(1.0, ge=-4.0, le=4.0)
    weight_name: str | None = Field(None, description="File inside a hub repo or folder.")


#: A canny ``high_threshold`` below this is in the old 0-1 units (before OpenCV's): refused.
#: OpenCV's gradient of a single 0-255 step is 4, so no useful threshold lies below it.
OLD_CANNY_UNITS_BELOW = 5.0


class ControlSpec(_Strict):
    """One ControlNet in the stream: its weights, what it is conditioned on, and its scale.

    ``model`` and the preprocessor settings are load fields (changing them reloads); ``scale``
    changes live (a tensor write: no re-prepare, no recompile) and blends in preset transitions.
    """

    model: str = Field(description="Hub id or local folder of a diffusers ControlNetModel.")
    preprocess: Literal["canny", "image", "depth"] = Field(
        description="What the ControlNet sees: canny edges of the frame, the frame itself "
        "(tile/colour ControlNets), or a depth map from depth_model."
    )
    scale: float = Field(1.0, ge=0.0, le=4.0, description="0 turns it off without a reload.")
    name: str = Field(
        "", pattern=r"^[A-Za-z0-9_.-]*$", description="Presets name it in control_scales."
    )
    low_threshold: float = Field(
        100.0,
        ge=0.0,
        le=2040.0,
        description="canny: weak edge, in OpenCV's units (cv2.Canny on the 0-255 RGB frame, "
        "L1 gradient of a 3x3 Sobel: a black-to-white step is 1020); the annotators' 100/200.",
    )
    high_threshold: float = Field(200.0, ge=0.0, le=2040.0, description="canny: strong edge.")
    hysteresis_steps: int = Field(
        64,
        ge=0,
        le=512,
        description="canny: weak-to-strong edge growth steps (a fixed count: no host sync); "
        "a weak chain longer than this from its strong end is cut.",
    )
    depth_model: str | None = Field(
        None, description="depth: hub id or folder of a transformers depth-estimation model."
    )
    guess_mode: bool = Field(
        False,
        description="diffusers' guess mode: the ControlNet steers the conditional rows only "
        "(none on guidance's unconditional rows), its residuals scaled from 0.1 (first block) "
        "to 1 (mid block). On by itself for ControlNets whose config sets "
        "global_pool_conditions (e.g. shuffle), as diffusers does.",
    )
    invert: bool | None = Field(
        None,
        description="depth: turn the normalised map around (1 - map). None: from the depth "
        "model's config, so that near is bright as depth ControlNets expect: relative "
        "inverse-depth models (DPT, Depth Anything) as they are, metric ones whose output is "
        "a distance (Depth Anything metric, ZoeDepth, GLPN, Depth Pro) inverted.",
    )

    @model_validator(mode="after")
    def _fits(self) -> ControlSpec:
        if self.low_threshold >= self.high_threshold:
            raise ValueError(
                f"control {self.model!r}: low_threshold ({self.low_threshold}) must be below "
                f"high_threshold ({self.high_threshold})"
            )
        if self.preprocess == "canny" and self.high_threshold < OLD_CANNY_UNITS_BELOW:
            raise ValueError(
                f"control {self.model!r}: high_threshold {self.high_threshold} looks like the old "
                "0-1 units (kornia's gradient on a grey frame); canny thresholds are now "
                "OpenCV's, as the ControlNet annotators call cv2.Canny on the 0-255 RGB frame: "
                "low_threshold = 100, high_threshold = 200 (the defaults) for the old 0.1/0.2"
            )
        if self.preprocess == "depth" and not self.depth_model:
            raise ValueError(
                f"control {self.model!r}: preprocess='depth' needs depth_model (a hub id or "
                "folder of a Depth-Anything/DPT model, e.g. "
                "'depth-anything/Depth-Anything-V2-Small-hf')"
            )
        if self.preprocess != "depth" and self.depth_model:
            raise ValueError(
                f"control {self.model!r}: depth_model is set but preprocess is "
                f"{self.preprocess!r}; use preprocess='depth' or drop depth_model"
            )
        if self.preprocess != "depth" and self.invert is not None:
            raise ValueError(
                f"control {self.model!r}: invert is for depth maps but preprocess is "
                f"{self.preprocess!r}; drop invert"
            )
        if not self.name:
            object.__setattr__(self, "name", self.preprocess)
        return self


class BankConfig(_Strict):
    """Feature bank settings (StreamV2V section 2). Defaults are the reference defaults but for
    ``mode``: "stable" instead of the reference's Dynamic Merging, whose random re-pairing makes
    the output jump at every update (measured by ``streamv2v eval``; see the README)."""

    enabled: bool = True
    extended_attention: bool = True
    feature_fusion: bool = True
    fusion_strength: float = Field(0.8, ge=0.0, le=1.0)
    fusion_threshold: float = Field(0.98, ge=-1.0, le=1.0)
    fusion_layers: tuple[str, ...] = Field(
        ("mid_block", "up_blocks.1"),
        description="Self-attention layers whose module name contains one of these apply FF.",
    )
    interval: int = Field(4, ge=1, le=1000, description="Bank update every N frames.")
    mode: Literal["dyme", "stable", "fifo"] = Field(
        "stable",
        description="How an update folds the new frame in. dyme: Dynamic Merging (a random "
        "split of bank + frame tokens, re-drawn at every update: the reference's). stable: the "
        "oldest banked frame merges into its most similar tokens among the rest, which keep "
        "their places (a fixed split: no wholesale re-pairing, so no update pulse). fifo: the "
        "new frame replaces the oldest.",
    )
    merge_threshold: float = Field(
        0.98,
        ge=-1.0,
        le=1.0,
        description="stable: an old token merges into its best match only where their keys' "
        "cosine similarity is at least this; elsewhere (content that moved away or changed) "
        "it is forgotten instead of blurred into an unrelated token. -1: always merge.",
    )
    max_frames: int = Field(1, ge=1, le=16, description="Frames of tokens the bank holds.")
    merge_ratio: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="DyMe: fraction of the bank+frame tokens merged away as sources.",
    )

    @model_validator(mode="after")
    def _static_size(self) -> BankConfig:
        if self.mode in ("dyme", "stable"):
            want = 1.0 / (self.max_frames + 1)
            if abs(self.merge_ratio - want) > 1e-6:
                raise ValueError(
                    f"merge_ratio={self.merge_ratio} with mode={self.mode!r} and "
                    f"max_frames={self.max_frames} would change the bank's size at every update; "
                    f"use merge_ratio={want:g} "
                    "(= 1 / (max_frames + 1)) so the bank keeps exactly max_frames frames of tokens"
                )
        return self


class EngineConfig(_Strict):
    """Settings of one :class:`~streamv2v.StreamV2V` engine.

    ``steps`` and ``strength`` derive ``t_index_list`` as the reference does; an explicit
    ``t_index_list`` (indices into the 50-step LCM schedule, ascending) overrides both.
    """

    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(4, ge=1, le=SCHEDULE_STEPS)
    strength: float = Field(0.4, gt=0.0, le=1.0)
    t_index_list: tuple[int, ...] | None = None
    stream_batch: bool = True
    seed: int = Field(2, ge=0, lt=2**63)
    vae: str = Field(DEFAULT_VAE, description="Hub id or folder of a VAE, or 'model'.")
    loras: tuple[LoraSpec, ...] = ()
    lora_base: Literal["device", "host", "auto"] = Field(
        "auto",
        description="Where the base copies of the layers a preset's LoRA touches are kept: "
        "'device' (a switch is a device copy: fastest), 'host' (host memory, page-locked on "
        "CUDA: a switch uploads from there; frees the device memory of the copies), 'auto' "
        "(the device unless the memory estimate says it is short).",
    )
    guidance: Literal["none", "self", "initialize", "full"] = "none"
    guidance_scale: float = Field(1.2, ge=1.0, le=20.0)
    guidance_delta: float = Field(1.0, ge=0.0, le=2.0, description="RCFG delta (self/initialize).")
    similar_filter: bool = False
    similar_threshold: float = Field(0.98, gt=0.0, lt=1.0)
    similar_max_skip: int = Field(10, ge=1, le=1000)
    similar_skip: Literal["probabilistic", "threshold"] = Field(
        "probabilistic",
        description="Similar-image filter rule: skip with a probability that grows with the "
        "similarity (the reference's), or whenever it is above the threshold.",
    )
    bank: BankConfig = BankConfig()
    control: tuple[ControlSpec, ...] = Field(
        (), description="ControlNets conditioning every frame (see README: ControlNet presets)."
    )
    compile: Literal["auto", "off", "on"] = Field(
        "auto",
        description="torch.compile the UNet and the autoencoder (CUDA graphs on CUDA). 'auto': "
        "on on CUDA, off elsewhere (on the CPU each new configuration costs ~40 s of "
        "compiling for a ~1.8x faster frame).",
    )

    @field_validator("t_index_list")
    @classmethod
    def _check_indices(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("t_index_list must name at least one step, e.g. [30, 35, 40, 45]")
        if any(i < 0 or i >= SCHEDULE_STEPS for i in v):
            raise ValueError(
                f"t_index_list values must be in 0..{SCHEDULE_STEPS - 1}, got {list(v)}"
            )
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"t_index_list must be strictly ascending, got {list(v)}")
        return v

    @field_validator("control")
    @classmethod
    def _unique_names(cls, v: tuple[ControlSpec, ...]) -> tuple[ControlSpec, ...]:
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"two ControlNets are named {dup[0]!r}: give each a distinct name "
                "(presets set their scales by name)"
            )
        return v

    def control_load_key(self) -> tuple[ControlSpec, ...]:
        """The control settings that need a reload when changed (all but the scales)."""
        return tuple(c.model_copy(update={"scale": 0.0}) for c in self.control)

    def with_control_scales(self, scales: Sequence[float] | Mapping[str, float]) -> EngineConfig:
        """This configuration with the ControlNets' scales replaced: a list (one per ControlNet)
        or a table by name or index (those left out keep theirs). ValueError names the problem."""
        if isinstance(scales, Mapping):
            names, table = [c.name for c in self.control], scales
            scales = [c.scale for c in self.control]
            for key, value in table.items():
                if str(key).isdigit() and int(key) < len(names):
                    scales[int(key)] = value
                elif key in names:
                    scales[names.index(key)] = value
                else:
                    raise ValueError(
                        f"control scale for {key!r}: no ControlNet has that name or index "
                        f"(the engine's ControlNets: {names or 'none'})"
                    )
        scales = [float(s) for s in scales]
        bad = [s for s in scales if not 0.0 <= s <= 4.0]
        if bad:
            raise ValueError(f"control scale {bad[0]} is outside 0..4")
        if len(scales) != len(self.control):
            raise ValueError(
                f"{len(scales)} control scales for {len(self.control)} ControlNets: give one "
                "per entry of engine control, or a table by name"
            )
        control = tuple(c.model_copy(update={"scale": s}) for c, s in zip(self.control, scales))
        return self.model_copy(update={"control": control})

    @model_validator(mode="after")
    def _steps_fit(self) -> EngineConfig:
        if self.t_index_list is not None:
            if "steps" in self.model_fields_set and self.steps != len(self.t_index_list):
                raise ValueError(
                    f"steps={self.steps} disagrees with t_index_list={list(self.t_index_list)}: "
                    "give one of them, or make steps equal its length"
                )
            object.__setattr__(self, "steps", len(self.t_index_list))
        elif int(SCHEDULE_STEPS * self.strength) < self.steps:
            raise ValueError(
                f"strength={self.strength} leaves only {int(SCHEDULE_STEPS * self.strength)} of "
                f"{SCHEDULE_STEPS} schedule steps for steps={self.steps}: raise strength to at "
                f"least {self.steps / SCHEDULE_STEPS:g} or lower steps"
            )
        return self

    def timestep_indices(self) -> tuple[int, ...]:
        """Indices into the 50-step schedule, one per denoising step (first = noisiest)."""
        if self.t_index_list is not None:
            return self.t_index_list
        start = int(SCHEDULE_STEPS * (1.0 - self.strength))
        stride = int(SCHEDULE_STEPS * self.strength) // self.steps
        return tuple(start + i * stride for i in range(self.steps))
