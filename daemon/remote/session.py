"""The GPU side's engines: the model loaded once, and one engine per session sharing its weights.

Every session gets its own :class:`~streamv2v.StreamV2V` (its own stream buffers, noise and
feature bank) built from the first engine's modules, so N sessions hold one copy of the UNet, VAE
and text encoder. The feature bank works through attention processors installed on the shared
UNet, so all engine work runs on ONE thread (the accelerator runs one call at a time anyway) and
the session about to run puts its own bank's processors back on the UNet when another session
ran last (a dict swap, only when the session changes).

Prompt embeddings are cached by their text across sessions: a preset is encoded once, however
many daemons ask for it or switch back to it. Style LoRAs live in the shared weights' adapter
library: sessions may run different LoRA sets, so the session about to run rewrites the touched
layers to its own set when it differs from the set of the last frame run (bench/lora.py measures
what that costs; sessions on the same set pay nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from daemon.styles.loras import StyleLoras
from daemon.styles.presets import Preset
from daemon.styles.switching import Embeds, PromptKey, StyleSwitcher
from streamv2v import EngineConfig, StreamV2V
from streamv2v.attention import install_bank

log = logging.getLogger("streamv2v.serve")

#: Distinct (prompt, negative prompt) pairs kept encoded; the oldest is forgotten past this.
MAX_CACHED_PROMPTS = 128


class SharedModel:
    """The model's weights, loaded once, the thread every engine call runs on, and the prompt
    cache shared by the sessions."""

    def __init__(self, weights: StreamV2V) -> None:
        self.weights = weights  # holds the modules; its own stream state is never used
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.prompts: dict[PromptKey, Embeds] = {}
        #: The presets' LoRAs, loaded into the shared weights' adapter library (kept).
        self.loras = StyleLoras(weights, weights.config.loras)
        self.lora_switches = 0  #: rewrites because the next session runs another LoRA set
        self._active: StreamV2V | None = weights
        self._lock = threading.Lock()  # the executor has one thread; this guards misuse

    @classmethod
    def load(
        cls, model: str, config: EngineConfig, device: str | None, dtype: Any, allow_pickle: bool
    ) -> SharedModel:
        """Load ``model`` with ``config``'s VAE and LoRAs (what every session runs on)."""
        weights = StreamV2V.from_pretrained(
            model, config=config, device=device, dtype=dtype, allow_pickle=allow_pickle
        )
        return cls(weights)

    def new_engine(self, config: EngineConfig) -> StreamV2V:
        """An engine with its own stream state and bank on the shared weights."""
        w = self.weights
        config = config.model_copy(update={"vae": w.config.vae, "loras": w.config.loras})
        engine = StreamV2V(**w.parts(), config=config)  # (SDXL: both text encoders too)
        engine.adapters = w.adapters  # one library (and one set of base copies) per weights
        self._active = engine  # its constructor installed its bank on the UNet
        return engine

    def activate(self, engine: StreamV2V) -> None:
        """Put ``engine``'s feature-bank processors on the shared UNet (if another ran last)."""
        if self._active is not engine:
            install_bank(engine.unet, engine.bank)
            self._active = engine

    def encode(self, preset: Preset) -> None:
        """Make sure the preset's LoRAs are loaded and its prompts in the shared cache (engine
        thread). A LoRA that fails is logged; the preset then runs without it."""
        self.loras.sync([preset], free=False)
        scales = self.loras.scales(preset)
        key = (preset.prompt, preset.negative_prompt, self.loras.text_encoder_key(scales))
        embeds = self.prompts.pop(key, None)
        if embeds is None:
            w, te = self.weights, dict(key[2])
            embeds = (w.encode_prompt(key[0], te), w.encode_prompt(key[1], te))
        self.prompts[key] = embeds  # (re)inserted last: the dict's order is the LRU order
        while len(self.prompts) > MAX_CACHED_PROMPTS:
            del self.prompts[next(iter(self.prompts))]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class EngineSession:
    """One daemon's engine on the server. Every method runs on the shared engine thread."""

    def __init__(self, shared: SharedModel) -> None:
        self.shared = shared
        self.engine: StreamV2V | None = None
        self.switcher: StyleSwitcher | None = None
        self.base: EngineConfig | None = None
        self.preset: Preset | None = None
        self.frames = 0

    def apply(self, base: EngineConfig, preset: Preset) -> None:
        """Run ``preset`` (on the daemon's ``base`` settings): blended in as the daemon's own
        engine would (StyleSwitcher), or a fresh stream when the base settings changed."""
        shared = self.shared
        if preset.passthrough:
            self.preset = preset
            return
        shared.encode(preset)
        w = shared.weights.config  # the weights decide the VAE and the fused LoRAs
        base = base.model_copy(update={"vae": w.vae, "loras": w.loras})
        if self.engine is None or base != self.base:
            if self.engine is None:
                self.engine = shared.new_engine(preset.engine_config(base))
            shared.activate(self.engine)
            self.base = base
            self.switcher = StyleSwitcher(
                self.engine, base, embeds=shared.prompts, loras=shared.loras
            )
            self.switcher.start(preset)
        elif preset != self.preset:
            shared.activate(self.engine)
            assert self.switcher is not None
            if self.preset is None or self.preset.passthrough:
                self.switcher.start(preset)
            else:
                self.switcher.switch(preset)
        self.preset = preset

    def set_steps(self, steps: int, stream_batch: bool) -> None:
        """The daemon's latency controller chose a step count (not during a switch)."""
        engine = self.engine
        if engine is None or (self.switcher is not None and self.switcher.switching):
            return
        cfg = engine.config
        if (cfg.steps, cfg.stream_batch) == (steps, stream_batch):
            return
        update = {"steps": steps, "stream_batch": stream_batch, "t_index_list": None}
        self.shared.activate(engine)
        engine.set_config(type(cfg).model_validate({**cfg.model_dump(), **update}))

    def reset(self) -> None:
        if self.engine is not None:
            self.shared.activate(self.engine)
            self.engine.reset()

    def process(self, image: np.ndarray, pts: int) -> tuple[np.ndarray | None, int, float]:
        """One camera frame: (styled frame or None while the stream fills, its input pts, cost
        in ms)."""
        engine, switcher = self.engine, self.switcher
        if engine is None or switcher is None:
            return None, pts, 0.0
        t0 = time.perf_counter()
        self.shared.activate(engine)
        if engine.adapters.active != switcher.lora_scales:  # another session ran another set
            engine.set_loras(switcher.lora_scales)
            self.shared.lora_switches += 1
        switcher.before_frame()
        styled = engine(image, tag=pts)
        self.frames += 1
        cost_ms = (time.perf_counter() - t0) * 1000
        return styled, engine.output_tag if styled is not None else pts, cost_ms

    def figures(self) -> dict[str, Any]:
        cfg = self.engine.config if self.engine is not None else None
        return {
            "preset": self.preset.name if self.preset is not None else None,
            "steps": cfg.steps if cfg is not None else None,
            "stream_batch": cfg.stream_batch if cfg is not None else None,
            "frames": self.frames,
            # Which feature bank the session's engine runs: every session has its own.
            "bank_id": f"{id(self.engine.bank):x}" if self.engine is not None else None,
            "loras": dict(self.switcher.lora_scales) if self.switcher is not None else {},
        }
