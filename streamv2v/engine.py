"""The public engine object: frames in, frames out.

    engine = StreamV2V.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", config=...)
    engine.set_prompt("a claymation figure")
    out = engine(frame)      # numpy uint8 HxWx3 RGB in, same at the working size out (or None)

Every tensor the engine makes takes its device and dtype from the UNet, so the CPU (fp32) and
CUDA (fp16) paths are one code path.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from streamv2v.adapters import AdapterLibrary
from streamv2v.attention import install_bank, self_attention_shapes
from streamv2v.bank import FeatureBank
from streamv2v.calls import UNetCall, guidance_mode, plan_calls, write_embeds
from streamv2v.compiled import (
    compile_enabled,
    compile_fn,
    frame_begin,
    mark_static,
    run_warmup,
    warmup_configs,
)
from streamv2v.config import EngineConfig
from streamv2v.control import ControlStream, load_control
from streamv2v.families import family_of_unet
from streamv2v.hostio import HostIO, frame_to_image
from streamv2v.loading import default_device, default_dtype, load_components
from streamv2v.similar import SimilarFilter
from streamv2v.stream import (
    denoise,
    guide,
    make_schedule,
    renoise,
    update_stock_noise,
)

#: EngineConfig fields that need the weights reloaded (everything else is re-prepared in place).
_LOAD_FIELDS = ("vae", "loras", "compile")

#: What _prepare builds for one configuration. Kept per configuration (up to _KEPT_CONFIGS), so
#: returning to one reuses its tensors and processors: a compiled UNet finds its graph again.
_PREPARED = (
    "_schedule", "_calls", "_guidance", "_x", "_noise", "_beta_noise", "_next_noise", "_stock",
    "_stock_next", "_filter", "bank", "fusion_layers", "_processors",
)  # fmt: skip
_KEPT_CONFIGS = 16


class StreamV2V:
    """Real-time img2img on an SD-family model with StreamDiffusion-style stream batching."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        config: EngineConfig | None = None,
        control: ControlStream | None = None,
        *,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        self.unet, self.vae, self.control = unet, vae, control
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        #: SD1.5/SD2.1 or SDXL (streamv2v.families), from the UNet's config.
        self.family = family_of_unet(unet.config)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        if self.family.is_sdxl and (text_encoder_2 is None or tokenizer_2 is None):
            raise ValueError("an SDXL UNet needs text_encoder_2 and tokenizer_2 (its second CLIP)")
        self._encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        self._tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
        self._force_zeros = force_zeros_for_empty_prompt
        self.config = config or EngineConfig()
        self._latent_scale = float(getattr(vae.config, "scaling_factor", 1.0))
        #: Style LoRAs, switched in place by set_loras() (streamv2v.adapters).
        self.adapters = AdapterLibrary(
            unet, text_encoder, text_encoder_2, lora_base=self.config.lora_base
        )
        self._cond = self.encode_prompt("")
        self._uncond = self._cond
        self._io = HostIO(self.device)
        self._kept: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        #: torch.compile in use (EngineConfig.compile): UNet, encode and decode compiled.
        self.compiled = compile_enabled(self.config.compile, self.device)
        self._unet_fn, self._encode_fn, self._decode_fn = self.unet, self._encode, self._decode
        if control is not None:  # ControlNets + UNet: one module, one compiled graph
            self._unet_fn = control.model(self.unet)
        self._control_fn = control.preprocess if control is not None else None
        if self.compiled:
            self._unet_fn = compile_fn(self._unet_fn, self.device)
            if control is not None:
                self._control_fn = compile_fn(control.preprocess, self.device)
            self._encode_fn = compile_fn(self._encode, self.device)
            self._decode_fn = compile_fn(self._decode, self.device)
        self._prepare()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        allow_pickle: bool = False,
    ) -> StreamV2V:
        """Load ``model`` (hub id or local diffusers folder) and build an engine.

        ``device`` defaults to CUDA, then MPS, then CPU; ``dtype`` to float16 on accelerators and
        float32 on the CPU. Weights load from safetensors only unless ``allow_pickle`` is set.
        Raises :class:`~streamv2v.ModelLoadError` with the model's name and how to fetch it.
        """
        config = config or EngineConfig()
        dev = torch.device(device) if device is not None else default_device()
        parts = load_components(
            model,
            vae=config.vae,
            loras=config.loras,
            device=dev,
            dtype=dtype or default_dtype(dev),
            allow_pickle=allow_pickle,
        )
        control = load_control(config.control, parts["unet"], allow_pickle=allow_pickle)
        return cls(**parts, config=config, control=control)

    def parts(self) -> dict[str, Any]:
        """The loaded modules as the constructor takes them (another engine on these weights)."""
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
            "force_zeros_for_empty_prompt": self._force_zeros,
        }

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latency_frames(self) -> int:
        """How many calls an input lags behind before its output appears."""
        return self.config.steps - 1 if self.config.stream_batch else 0

    def set_config(self, config: EngineConfig) -> None:
        """Switch to a new configuration without reloading weights (steps, strength, size, seed,
        stream batch, guidance, filter, bank). Resets the stream: the next outputs follow the
        warm-up contract (``None`` until the buffer is full)."""
        changed = [f for f in _LOAD_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if config.control_load_key() != self.config.control_load_key():
            changed.append("control")
        if changed:
            raise ValueError(f"changing {', '.join(changed)} needs a reload (from_pretrained)")
        if config.lora_base != self.config.lora_base:  # (base copies moved, weights untouched)
            self.adapters.set_lora_base(config.lora_base, self.adapters.headroom_bytes)
        self.config = config
        self._prepare()

    @torch.inference_mode()
    def warmup(
        self,
        step_counts: Iterable[int | tuple[int, bool]],
        *,
        bank_off: bool = False,
        progress: bool = True,
    ) -> list[EngineConfig]:
        """Compile (and on CUDA capture) every configuration the latency controller may pick, so
        a later step change never stalls the stream: each of ``step_counts`` (a step count, or
        ``(steps, stream_batch)``) runs a few frames with the current settings, and with the bank
        off too when ``bank_off``. The current configuration is restored (its stream reset).
        Returns the configurations warmed. Without compilation it only prepares them."""
        wanted = warmup_configs(self.config, step_counts, bank_off=bank_off)
        run_warmup(self, wanted, progress=progress)
        return wanted

    def release_memory(self) -> None:
        """Free what is kept for other configurations, and the device's cached blocks (after
        an out-of-memory error, before a lighter configuration is set)."""
        self._kept.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prepare(self) -> None:
        cfg = self.config
        # Control scales are live values (a tensor write), not part of what is prepared.
        key = cfg.model_copy(update={"control": cfg.control_load_key()}).model_dump_json()
        kept = self._kept.pop(key, None)
        if kept is None:
            kept = self._build(cfg)
        self._kept[key] = kept  # most recently used last
        while len(self._kept) > _KEPT_CONFIGS:
            self._kept.popitem(last=False)
        self.__dict__.update(kept)
        if self.control is not None:
            self.control.set_scales([c.scale for c in cfg.control])
        self.unet.set_attn_processor(dict(self._processors))  # (it consumes the dict)
        self._write_embeds()
        self.reset()

    def _build(self, cfg: EngineConfig) -> dict[str, Any]:
        """Every tensor and processor of a configuration, allocated once, at fixed addresses."""
        dev, dt = self.device, self.dtype
        self._schedule = make_schedule(self.scheduler, cfg.timestep_indices(), dev, dt)
        self._guidance = guidance_mode(cfg)
        self._calls = plan_calls(cfg, self._schedule, self.family, self._cond, self.unet.config)
        k = cfg.steps
        lat_hw = (cfg.height // 8, cfg.width // 8)
        lat_shape = (k, self.unet.config.in_channels, *lat_hw)
        self._x = torch.zeros(lat_shape, device=dev, dtype=dt)
        self._noise = torch.empty(lat_shape, device=dev, dtype=dt)
        self._beta_noise = torch.empty_like(self._noise)
        self._next_noise = torch.empty_like(self._noise)
        self._stock = torch.empty_like(self._noise)
        self._stock_next = torch.empty_like(self._noise)
        self._filter = SimilarFilter(cfg, dev, dt)
        rows = self._calls[-1].bank_rows.stop
        self.bank = FeatureBank(cfg.bank, rows, cfg.seed, dev) if cfg.bank.enabled else None
        if self.bank is not None:
            call = self._calls[0]  # (shapes read off the UNet, kept per UNet and size)
            shapes = self_attention_shapes(
                self.unet, lat_hw, call.embeds[:1], call.unet_kwargs().get("added_cond_kwargs")
            )
            self.bank.allocate(shapes, dt)
        self.fusion_layers = install_bank(self.unet, self.bank)
        self._processors = dict(self.unet.attn_processors)
        if self.control is not None:
            self.control.allocate(self._calls, cfg.height, cfg.width)
        if self.compiled:
            static = [self._x, *(t for c in self._calls for t in c.static_tensors())]
            static += self.control.static_tensors(self._calls) if self.control else []
            mark_static(static + (self.bank.tensors() if self.bank is not None else []))
        return {name: getattr(self, name) for name in _PREPARED}

    def set_control_scales(self, scales: Any) -> None:
        """ControlNet scales from the next frame on: a list (one per ControlNet) or a table by
        name or index. A tensor write: the stream, its warm state and compiled graphs stay."""
        if self.control is None:
            raise ValueError("this engine has no ControlNet (EngineConfig.control is empty)")
        self.config = self.config.with_control_scales(scales)
        self.control.set_scales([c.scale for c in self.config.control])

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def encode_prompt(self, prompt: str, loras: Mapping[str, float] | None = None) -> torch.Tensor:
        """Text embeddings ``[1, tokens, dim]`` of ``prompt`` (one call per text encoder), with
        the text-encoder weights of the loaded LoRAs ``loras`` (name -> scale) applied. SDXL:
        both encoders' penultimate states, plus one row holding the pooled embedding
        (streamv2v.families); an empty prompt is all zeros when the model forces zeros for an
        empty prompt (SDXL's negative-prompt default)."""
        with self.adapters.text_encoder_loras(loras or {}):
            out = self.family.encode(prompt, self._encoders, self._tokenizers, self.dtype)
        return self.family.zeros_for_empty(prompt, out, self._force_zeros)

    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        """Encode the prompt once; every later frame reuses the embeddings."""
        # The negative prompt is encoded even when the guidance mode does not use it, so a later
        # set_config() to "full"/"initialize" guidance finds it ready.
        self.set_prompt_embeds(self.encode_prompt(prompt), self.encode_prompt(negative_prompt))

    def set_prompt_embeds(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        """Use precomputed embeddings (e.g. a preset's, or a blend of two) from the next frame on.

        No text encoder call and no re-prepare: the embeddings are copied into the engine's
        persistent buffers, so a prompt switch keeps the stream (and its warm state) running.
        """
        self._cond = cond.to(device=self.device, dtype=self.dtype)
        self._uncond = self._cond if uncond is None else uncond.to(self._cond)
        self._write_embeds()
        self._filter.recompute = True  # the similar-image filter must not repeat an old frame

    def set_loras(self, scales: Mapping[str, float]) -> int:
        """Use the loaded LoRAs ``scales`` (name -> scale; absent: off) from the next frame on,
        rewritten into the UNet's weights in place (no recompile; see streamv2v.adapters).
        Returns how many layers were rewritten."""
        rewritten = self.adapters.set_loras(scales)
        if rewritten:  # the similar-image filter must not repeat a frame of the old weights
            self._filter.recompute = True
        return rewritten

    @property
    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and unconditional embeddings in use (``[1, tokens, dim]`` each)."""
        return self._cond, self._uncond

    @torch.inference_mode()
    def reset_bank(self) -> None:
        """Forget the feature bank's frames (e.g. after a style switch, so the old style's
        features stop steering attention); the next frame refills it. The stream keeps running:
        unlike :meth:`reset`, no warm-up follows."""
        if self.bank is not None:
            self.bank.reset()
            self._refill_bank = True

    @torch.inference_mode()
    def _write_embeds(self) -> None:
        write_embeds(self._calls, self.family, self._cond, self._uncond)

    # ------------------------------------------------------------------ stream state
    @torch.inference_mode()
    def reset(self) -> None:
        """Empty the stream buffer and redraw the fixed noise from the seed (own generator)."""
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        # Drawn on the CPU so the same seed gives the same noise on every device.
        noise = torch.randn(self._noise.shape, generator=gen, dtype=torch.float32)
        self._noise.copy_(noise)
        self._beta_noise.copy_(self._schedule.beta * self._noise)
        self._next_noise.copy_(torch.roll(self._noise, -1, dims=0))
        # RCFG's first estimate of each slot's unconditional noise: the noise it really holds.
        self._stock.copy_(self._noise)
        self._x.zero_()
        if self.bank is not None:
            self.bank.reset()
        self._frames = 0  # UNet-processed frames since reset
        self._refill_bank = False  # reset_bank() was called: the next frame fills every slot
        self._filter.reset()
        self._last_output: Any = None
        self._tags: collections.deque = collections.deque(maxlen=self.latency_frames + 1)
        self.output_tag: Any = None

    # ------------------------------------------------------------------ the hot path
    @torch.inference_mode()
    def __call__(
        self, frame: np.ndarray | torch.Tensor, *, tag: Any = None, output_type: str = "np"
    ) -> np.ndarray | torch.Tensor | None:
        """Translate one frame.

        ``frame`` is HxWx3 uint8 RGB, a numpy array or a tensor (a tensor already on the engine's
        device avoids the host-to-device copy). It is center-cropped to the working aspect and
        resized. Returns the translated frame (HxWx3 uint8 RGB at the working size, numpy, or a
        tensor on the engine's device with ``output_type="pt"``; the x0 latent with
        ``"latent"``), or ``None`` while the stream
        buffer fills after a reset, so no caller can publish a warm-up frame. ``tag`` (e.g. the
        capture time) travels with the frame: ``self.output_tag`` is the tag of the returned one.
        """
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        if self.compiled:
            frame_begin(self.device)
        image = self._to_model_input(frame)
        if self._filter.skip(image, self._last_output is not None):
            return self._last_output
        latent = self._encode_fn(image)
        if self.control is not None:  # once per frame: the rows move on with their frames
            images = self._control_fn(image)
            self.control.begin_frame(images, self._calls, self.config.stream_batch)
        if self.bank is not None:
            self.bank.begin_frame(self._frames)
        x0 = self._denoise_frame(latent)
        if self.bank is not None:
            self.bank.end_frame()
            self._refill_bank = False
        self._frames += 1
        self._tags.append(tag)
        if self._frames <= self.latency_frames:
            return None
        self.output_tag = self._tags[0]
        if output_type == "latent":
            out = x0
        else:
            out = self._decode_fn(x0)
            if output_type == "np":
                out = self._io.download(out)
            elif self.compiled:
                out = out.clone()  # a CUDA graph's output is overwritten by the next replay
        self._last_output = out
        return out

    def _denoise_frame(self, latent: torch.Tensor) -> torch.Tensor:
        """Put the new frame's noised latent into slot 0, run the frame's UNet call(s), return the
        x0 estimate that leaves the stream (the oldest slot's, in stream-batch mode)."""
        s = self._schedule
        x = self._x
        renoise(latent, s.alpha[0], self._beta_noise[0:1], out=x[0:1])
        if self.config.stream_batch:
            den = denoise(x, self._predict(x, self._calls[0]), s.x_coef, s.pred_coef)
            if den.shape[0] > 1:  # each slot moves one timestep on, into the next slot
                renoise(den[:-1], s.alpha[1:], self._beta_noise[1:], out=x[1:])
            return den[-1:]
        xi = x[0:1]
        for call in self._calls:
            i = call.slots
            den = denoise(xi, self._predict(xi, call), s.x_coef[i], s.pred_coef[i])
            if i.stop < s.steps:
                xi = renoise(den, s.alpha[i.stop], self._beta_noise[i.stop : i.stop + 1])
        return den

    def _predict(self, x: torch.Tensor, call: UNetCall) -> torch.Tensor:
        """Model output for latents ``x`` at ``call``'s slots, with the configured guidance."""
        mode = self._guidance
        if self.bank is not None:
            self.bank.begin_call(call.bank_rows, self._fill_rows(call))
        rows = x if call.uncond_rows is None else torch.cat([x, x[call.uncond_rows]])
        kw = call.unet_kwargs()
        if call.control is not None:  # (guess-mode ControlNets: the conditional rows only)
            kw["cond_rows"] = x.shape[0]
        out = self._unet_fn(
            rows, call.timesteps, encoder_hidden_states=call.embeds, return_dict=False, **kw
        )[0]
        if mode == "none":
            return out
        n = x.shape[0]
        cond, scale = out[:n], self.config.guidance_scale
        if mode == "full":
            return guide(cond, out[n:], scale)
        # Residual CFG: the unconditional prediction is estimated from the stream's own noise.
        slots = call.slots
        stock = self._stock[slots]
        if call.uncond_rows is not None:  # "initialize": slot 0's real unconditional output
            stock[call.uncond_rows] = out[n:]
        pred = guide(cond, stock * self.config.guidance_delta, scale)
        est = update_stock_noise(
            stock, pred, self._schedule, slots, self._next_noise[slots], self._stock_next[slots]
        )
        # Each estimate moves one slot on with its frame (the last slot's leaves the stream), and
        # the frame entering slot 0 starts from its fixed noise: every estimate comes from the
        # step before it, in stream batch and sequential mode alike, for any k.
        k = self.config.steps
        moved = min(slots.stop, k - 1) - slots.start
        if moved > 0:
            self._stock[slots.start + 1 : slots.start + 1 + moved].copy_(est[:moved])
        if slots.start == 0:
            self._stock[0:1].copy_(self._noise[0:1])
        return pred

    def _fill_rows(self, call: UNetCall) -> tuple[int, ...]:
        """Rows of ``call`` that hold a real frame for the first time since the reset (their bank
        starts as a copy of it). In stream-batch mode the slot of step i gets its first real
        frame at frame i; before that it only carries warm-up latents that are never output."""
        n = self._frames
        if self._refill_bank:
            return tuple(range(len(call.row_steps)))
        if not self.config.stream_batch:
            return tuple(range(len(call.row_steps))) if n == 0 else ()
        if n >= self.config.steps:
            return ()
        return tuple(r for r, step in enumerate(call.row_steps) if step == n)

    # ------------------------------------------------------------------ pixels <-> latents
    def _to_model_input(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """HxWx3 uint8 -> [1, 3, height, width] in [-1, 1], model dtype, engine device."""
        return frame_to_image(frame, (self.config.height, self.config.width), self._io, self.dtype)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        enc = self.vae.encode(image)
        latent = enc.latents if hasattr(enc, "latents") else enc.latent_dist.mode()
        return latent * self._latent_scale

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self._latent_scale, return_dict=False)[0]
        # [-1, 1] -> [0, 255], rounded (+0.5 before the truncating cast), in two fused passes.
        image = (image[0] * 127.5 + 128.0).clamp_(0, 255)
        return image.to(torch.uint8).permute(1, 2, 0).contiguous()

    def stats(self) -> dict[str, Any]:
        """Counters of the current stream (since the last reset) and of the feature bank."""
        bank = self.bank
        fused = bank.last_fused_fraction if bank is not None else None
        return {
            "frames": self._frames,
            "steps": self.config.steps,
            "stream_batch": self.config.stream_batch,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "bank_enabled": bank is not None,
            "bank_bytes": bank.nbytes if bank is not None else 0,
            "bank_tokens_per_layer": bank.tokens_per_layer() if bank is not None else {},
            # Fraction of the FF layers' output tokens fused on the last frame (None: no FF ran).
            "fused_fraction": None if fused is None else float(fused),
            **self.adapters.memory(),  # style LoRAs: lora_bytes, lora_base_bytes, loras_loaded
        }
