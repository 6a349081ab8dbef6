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
what that costs; sessions on the same set pay nothing). A LoRA is freed when the last session
that named it ends; ControlNets and depth models load with the first session that names them and
are shared and freed the same way (daemon/remote/shelf.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from daemon.control.metrics import Rolling
from daemon.models.registry import control_location
from daemon.remote.shelf import ControlShelf, LoraUsers, module_bytes
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

    def __init__(self, weights: StreamV2V, allow_pickle: bool = False) -> None:
        self.weights = weights  # holds the modules; its own stream state is never used
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.prompts: dict[PromptKey, Embeds] = {}
        #: The presets' LoRAs, loaded into the shared weights' adapter library while a session
        #: that named them runs (``lora_users`` counts them).
        self.loras = StyleLoras(weights, weights.config.loras, allow_pickle=allow_pickle)
        self.lora_users = LoraUsers()
        #: The sessions' ControlNets and depth models, shared per distinct model.
        self.controls = ControlShelf(weights.unet, allow_pickle=allow_pickle)
        self.lora_switches = 0  #: rewrites because the next session runs another LoRA set
        self.model_bytes = sum(
            module_bytes(m) for m in (weights.unet, weights.vae, weights.text_encoder)
        )
        self._active: StreamV2V | None = weights
        self._lock = threading.Lock()  # the executor has one thread; this guards misuse

    @classmethod
    def load(
        cls, model: str, config: EngineConfig, device: str | None, dtype: Any, allow_pickle: bool
    ) -> SharedModel:
        """Load ``model`` with ``config``'s VAE and LoRAs (what every session runs on)."""
        from daemon.models.load_lock import LOAD_LOCK

        with LOAD_LOCK:  # (one load at a time in a process: see load_lock)
            weights = StreamV2V.from_pretrained(
                model,
                config=config.model_copy(update={"control": ()}),  # (ControlNets: per session)
                device=device,
                dtype=dtype,
                allow_pickle=allow_pickle,
            )
        return cls(weights, allow_pickle=allow_pickle)

    def new_engine(self, config: EngineConfig, owner: int) -> StreamV2V:
        """An engine with its own stream state and bank on the shared weights, and the
        ControlNets ``config`` lists (shared; held for ``owner`` until :meth:`release`)."""
        w = self.weights
        config = config.model_copy(update={"vae": w.config.vae, "loras": w.config.loras})
        control = self.controls.acquire(owner, config.control)
        try:  # (SDXL: both text encoders too)
            engine = StreamV2V(**w.parts(), config=config, control=control)
        except Exception:
            self.controls.release(owner)
            raise
        engine.adapters = w.adapters  # one library (and one set of base copies) per weights
        self._active = engine  # its constructor installed its bank on the UNet
        return engine

    def drop_engine(self, owner: int, engine: StreamV2V | None) -> None:
        """``owner``'s engine is gone: the ControlNets only it used are freed."""
        self.controls.release(owner)
        if self._active is engine:
            self._active = None  # (its bank's processors stay on the UNet until the next runs)

    def release(self, owner: int, engine: StreamV2V | None) -> None:
        """``owner``'s session ended: its ControlNets, and the LoRAs no other session named,
        are freed."""
        self.drop_engine(owner, engine)
        unused = self.lora_users.release(owner)
        freed = set(self.weights.adapters.retain(self.lora_users.named())) if unused else set()
        if freed:
            log.info("LoRA freed (no session names it): %s", ", ".join(sorted(freed)))
            # Prompts encoded with a freed text-encoder LoRA: stale once it is gone.
            for key in [k for k in self.prompts if any(n in freed for n, _ in k[2])]:
                del self.prompts[key]
        device = self.weights.device
        if device.type == "cuda":  # what was freed goes back to the device, not torch's cache
            import torch

            with torch.cuda.device(device):
                torch.cuda.empty_cache()

    def activate(self, engine: StreamV2V) -> None:
        """Put ``engine``'s feature-bank processors on the shared UNet (if another ran last)."""
        if self._active is not engine:
            install_bank(engine.unet, engine.bank)
            self._active = engine

    def encode(self, preset: Preset, owner: int) -> None:
        """Make sure the preset's LoRAs are loaded (held for ``owner``) and its prompts in the
        shared cache (engine thread). A LoRA that fails is logged; the preset then runs without
        it."""
        self.loras.sync([preset], free=False)
        scales = self.loras.scales(preset)
        self.lora_users.add(owner, scales)
        key = (preset.prompt, preset.negative_prompt, self.loras.text_encoder_key(scales))
        embeds = self.prompts.pop(key, None)
        if embeds is None:
            w, te = self.weights, dict(key[2])
            embeds = (w.encode_prompt(key[0], te), w.encode_prompt(key[1], te))
        self.prompts[key] = embeds  # (re)inserted last: the dict's order is the LRU order
        while len(self.prompts) > MAX_CACHED_PROMPTS:
            del self.prompts[next(iter(self.prompts))]

    def figures(self) -> dict[str, Any]:
        """What is loaded and its bytes (/health, /metrics): the model, the style LoRAs (and
        the base copies of the layers they touch), the ControlNets and depth models, and the
        accelerator's memory (CUDA only)."""
        adapters = self.weights.adapters
        loras = {}
        for name in list(adapters.names):
            with contextlib.suppress(KeyError):  # (freed meanwhile by the engine thread)
                loras[name] = {
                    "bytes": adapters.get(name).nbytes,
                    "sessions": len(self.lora_users.users.get(name, ())),
                }
        device = self.weights.device
        gpu = None
        if device.type == "cuda":
            import torch

            gpu = {
                "allocated_bytes": torch.cuda.memory_allocated(device),
                "reserved_bytes": torch.cuda.memory_reserved(device),
            }
        return {
            "model_bytes": self.model_bytes,
            "loras": loras,
            "lora_base_bytes": adapters.memory()["lora_base_bytes"],
            **self.controls.figures(),
            "gpu_memory": gpu,
        }

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _located(base: EngineConfig) -> EngineConfig:
    """The built-in ControlNet's name (``tiny-canny``) as this machine's folder of it."""
    if not base.control:
        return base
    control = tuple(c.model_copy(update={"model": control_location(c.model)}) for c in base.control)
    return base.model_copy(update={"control": control})


class EngineSession:
    """One daemon's engine on the server. Every method runs on the shared engine thread."""

    def __init__(self, shared: SharedModel, owner: int = 0) -> None:
        self.shared = shared
        self.owner = owner  # what the session's LoRAs and ControlNets are held for
        self.engine: StreamV2V | None = None
        self.switcher: StyleSwitcher | None = None
        self.base: EngineConfig | None = None
        self.preset: Preset | None = None
        self.frames = 0
        #: Why the last preset could not run (its frames fail with it until one can).
        self.failure: str | None = None
        #: What the last preset runs without (a LoRA the server could not load), or "".
        self.notice = ""
        self.frame_ms = Rolling(120)
        self._done_at: collections.deque[float] = collections.deque(maxlen=60)

    def apply(self, base: EngineConfig, preset: Preset) -> None:
        """Run ``preset`` (on the daemon's ``base`` settings): blended in as the daemon's own
        engine would (StyleSwitcher), or a fresh stream when the base settings changed. When it
        cannot run, :attr:`failure` says why and its frames fail with that reason."""
        self.notice = ""
        try:
            self._apply(base, preset)
        except Exception as err:
            self.failure = f"preset {preset.name!r}: {_one_line(err)}"
            raise
        self.failure = None

    def _apply(self, base: EngineConfig, preset: Preset) -> None:
        shared = self.shared
        if preset.passthrough:
            self.preset = preset
            return
        shared.encode(preset, self.owner)
        broken = shared.loras.errors.get(preset.name)
        self.notice = f"preset {preset.name!r} runs without it: {broken}" if broken else ""
        w = shared.weights.config  # the weights decide the VAE and the fused LoRAs
        base = _located(base).model_copy(update={"vae": w.vae, "loras": w.loras})
        if (
            self.engine is not None
            and self.base is not None
            and base.control_load_key() != self.base.control_load_key()
        ):
            # Other ControlNets: a new engine with them (the old ones released; its LoRAs kept).
            shared.drop_engine(self.owner, self.engine)
            self.engine, self.switcher, self.base = None, None, None
        if self.engine is None or base != self.base:
            if self.engine is None:
                self.engine = shared.new_engine(preset.engine_config(base), self.owner)
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

    def close(self) -> None:
        """The session ended: its engine dropped, what only it used freed."""
        engine, self.engine, self.switcher, self.base = self.engine, None, None, None
        self.shared.release(self.owner, engine)

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
        in ms). Raises when the engine fails (or the preset could not run)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
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
        done = time.perf_counter()
        cost_ms = (done - t0) * 1000
        self.frame_ms.add(cost_ms)
        self._done_at.append(done)
        return styled, engine.output_tag if styled is not None else pts, cost_ms

    def fps(self) -> float:
        """Frames per second over the last frames (0 when none came for 2 s)."""
        times = list(self._done_at)
        if len(times) < 2 or time.perf_counter() - times[-1] > 2.0:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def figures(self) -> dict[str, Any]:
        cfg = self.engine.config if self.engine is not None else None
        return {
            "preset": self.preset.name if self.preset is not None else None,
            "steps": cfg.steps if cfg is not None else None,
            "stream_batch": cfg.stream_batch if cfg is not None else None,
            "frames": self.frames,
            "fps": round(self.fps(), 2),
            "frame_ms_p50": self.frame_ms.pct(50),
            "frame_ms_p95": self.frame_ms.pct(95),
            # Which feature bank the session's engine runs: every session has its own.
            "bank_id": f"{id(self.engine.bank):x}" if self.engine is not None else None,
            "loras": dict(self.switcher.lora_scales) if self.switcher is not None else {},
            "control": [c.model for c in cfg.control] if cfg is not None else [],
            "failure": self.failure,
        }


def _one_line(err: BaseException) -> str:
    """An error in one line (its type when it says nothing)."""
    text = (str(err).strip().splitlines() or [""])[0]
    return text or type(err).__name__
