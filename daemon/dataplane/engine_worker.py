"""The engine thread of the data plane: the newest camera frame in, a styled frame out.

It loads the model in a thread of its own (the camera passes through meanwhile), follows the
active preset and the latency controller's step choice between frames, and falls back to
passthrough with a retry backoff whenever the engine fails.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from daemon.config import DaemonConfig
from daemon.control.latency import LatencyBudget, StepChoice
from daemon.control.metrics import Rolling
from daemon.dataplane.degrade import StepDown, is_out_of_memory
from daemon.dataplane.frames import Frame
from daemon.dataplane.slots import LatestSlot
from daemon.models.engine_config import engine_config
from daemon.models.progress import Readiness
from daemon.models.registry import model_location
from daemon.styles.presets import Preset, PresetManager
from streamv2v.config import SCHEDULE_STEPS, LoraSpec

if TYPE_CHECKING:
    from daemon.masking.worker import MaskWorker
    from daemon.styles.switching import StyleSwitcher

log = logging.getLogger("streamv2v")

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 2.0, 60.0


class EngineWorker:
    """The engine thread: loads the model (passthrough meanwhile), restyles the newest camera
    frame with the active preset, and falls back to passthrough with a retry backoff whenever
    the engine fails.

    Presets are followed as a desired state: between frames the worker compares the manager's
    active preset (as its file says now) with the one applied and starts a transition when they
    differ, so a switch from any thread, an edited preset file or a finished model load all
    take the same path.
    """

    def __init__(
        self,
        config: DaemonConfig,
        inp: LatestSlot[Frame],
        out: LatestSlot[Frame],
        presets: PresetManager,
    ):
        self.config = config
        self.presets = presets
        section = config.engine
        self.base = engine_config(section.model, section.settings, loras=section.loras)
        self._in, self._out = inp, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.state = "loading"  # loading, warming, running, failed, stopped
        self.engine: Any = None
        self.switcher: StyleSwitcher | None = None
        self.applied: Preset | None = None  # the preset the engine runs (None: not loaded)
        self._previous: Preset | None = None  # the one before (kept when a switch fails)
        self._library_version = -1
        self._loader: threading.Thread | None = None
        self._loaded: Any = None
        self._showing_styled = False  # the last frame sent out was a styled one
        self.call_ms = Rolling()
        self.frames_styled = 0
        self.calls = 0  # engine calls (for the engine rate)
        latency = config.latency
        self.budget = LatencyBudget(latency, config.camera.fps) if latency.active else None
        self.output_delay: Rolling | None = None  # the output worker's pacing delay
        #: What out-of-memory errors made the engine lower ("degraded" on /status).
        self.step_down = StepDown()
        #: Download, loading and compile progress before the first styled frame (/status).
        self.readiness = Readiness()
        self.masks: MaskWorker | None = None  # segments each frame the engine takes (if set)
        self._restarted = True  # the stream restarted: a mask starts at once, with no blend
        self._reader: tuple[int, threading.Thread] | None = None  # LoRA files of a library

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.state = "stopped"

    @property
    def switching(self) -> bool:
        return self.switcher is not None and self.switcher.switching

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            log.info("engine: %s%s", state, f" ({detail})" if detail else "")
            self.state = state

    def _load(self, preset: Preset) -> tuple[Any, StyleSwitcher, int]:
        """A new engine running ``preset``, with every preset's prompt encoded (in the loader
        thread, so the engine thread never waits for the text encoder)."""
        from daemon.models.fetch import ensure_cached
        from daemon.models.needs import needs_of_daemon

        cfg = self.config.engine
        # First the files (before torch is imported: an offline machine hears at once).
        others = needs_of_daemon(self.config, self.presets.library.presets.values())
        ensure_cached(needs_of_daemon(self.config, [preset]), self.readiness, optional=others)
        if self.engine is None:  # (a LoRA switch: the current style runs on meanwhile)
            self.readiness.loading(cfg.model)

        from daemon.styles.switching import StyleSwitcher
        from streamv2v import StreamV2V

        dtype = None
        if cfg.dtype is not None:
            import torch

            dtype = getattr(torch, cfg.dtype)
        from daemon.models.preflight import check_memory

        version = self.presets.library.version
        # The [engine] LoRAs are fused at load; the presets' LoRAs are switched in place.
        config = self.step_down.apply(preset.engine_config(self.base)).model_copy(
            update={"loras": self.base.loras}
        )
        # Compiled (CUDA graphs), every step choice warmed keeps its own activations.
        captured = len(self._step_choices(preset, config)) if config.compile != "off" else 1
        # The presets' LoRAs count too (priced from their headers: none is read yet).
        loras = switched_specs(self.presets.library.presets.values(), self.base.loras)
        headroom = check_memory(
            model_location(cfg.model), config, cfg.device, cfg.dtype, captured, loras,
            lora_base=config.lora_base,
        )  # fmt: skip
        from daemon.models.load_lock import LOAD_LOCK

        with LOAD_LOCK:  # (one load at a time in a process: see load_lock)
            engine = StreamV2V.from_pretrained(
                model_location(cfg.model),
                config=config,
                device=cfg.device,
                dtype=dtype,
                allow_pickle=cfg.allow_pickle,
            )
        adapters = getattr(engine, "adapters", None)  # (a remote engine keeps its own)
        if adapters is not None and headroom is not None:  # "auto": host when the device is short
            adapters.set_lora_base(config.lora_base, headroom)
        if getattr(engine, "compiled", False):  # (a remote engine compiles on its side)
            # Compile every configuration the latency controller may pick now, in the loader
            # thread (the camera passes through meanwhile), so a step change never stalls.
            choices = self._step_choices(preset, engine.config)
            started = time.monotonic()
            for done, choice in enumerate(choices):
                self.readiness.compiling(done, len(choices), started)
                engine.warmup([choice], progress=False)
        switcher = StyleSwitcher(engine, self.base)
        switcher.limit = self.step_down.apply  # every preset's configuration within the limits
        self._encode(switcher)
        if not preset.passthrough:
            switcher.start(preset)
        return engine, switcher, version

    def _encode(self, switcher: StyleSwitcher) -> None:
        """The presets' LoRAs loaded and prompts encoded; the broken ones marked."""
        library = self.presets.library
        switcher.encode(library.presets.values(), allow_pickle=self.config.engine.allow_pickle)
        library.mark_broken(switcher.loras.errors)

    def _start_loading(self, preset: Preset) -> None:
        """Load in a thread of its own, so this thread keeps serving frames meanwhile."""
        self._set_state("loading", self.config.engine.model)
        self._loaded = None

        def load() -> None:
            try:
                self._loaded = (preset, *self._load(preset))
            except Exception as err:  # any failure: reported by the engine thread
                self._loaded = err

        self._loader = threading.Thread(target=load, name="engine-load", daemon=True)
        self._loader.start()

    def _finish_loading(self, backoff: float) -> bool:
        """Take the loader's result; False when it failed."""
        self._loader, loaded = None, self._loaded
        self.readiness.clear()
        if isinstance(loaded, Exception):
            log.error("engine: could not load (%s); passthrough, retry in %.0f s", loaded, backoff)
            self.state = "failed"
            return False
        preset, self.engine, self.switcher, self._library_version = loaded
        self.applied, self._restarted = preset, True
        if self.masks is not None:
            self.masks.use_device(self.engine.device)
        self._set_state("warming")
        return True

    def _follow_presets(self) -> None:
        """Between frames: encode changed presets, and start a switch when the active preset
        differs from the applied one."""
        assert self.switcher is not None
        library = self.presets.library
        if library.version != self._library_version:
            if not self._read_ahead(library.version):
                return  # (a switch to a preset of the new library waits for its LoRA files)
            self._library_version = library.version
            self._encode(self.switcher)  # (prompts encoded here, never at a switch)
        wanted = self.presets.current()
        if wanted == self.applied or library.broken(wanted.name) is not None:
            return  # (a broken preset: the current style runs on)
        self._apply(wanted)

    def _read_ahead(self, version: int) -> bool:
        """True once the LoRA files of library ``version`` were read, in a thread of its own
        (this thread keeps styling frames meanwhile; it then only adds what was read)."""
        reader = self._reader
        if reader is not None and reader[0] == version:
            return not reader[1].is_alive()
        assert self.switcher is not None
        presets = list(self.presets.library.presets.values())
        thread = threading.Thread(
            target=self.switcher.loras.read_ahead, args=(presets,), name="lora-read", daemon=True
        )
        thread.start()
        self._reader = (version, thread)
        return False

    def _follow_budget(self) -> None:
        """Between frames: let the latency controller pick the steps (not while a preset
        switch is in flight: the blend and its flush must finish on one configuration)."""
        budget, engine = self.budget, self.engine
        if budget is None or self.switching or self.applied is None:
            return
        cfg = engine.config
        lo, hi = self._step_bounds(self.applied, cfg)
        if self.output_delay is not None and self.calls % 10 == 0:
            delays = self.output_delay.snapshot()
            if delays.size:
                budget.output_delay = (float(delays.mean()), float(delays.var()))
        current = StepChoice(cfg.steps, cfg.stream_batch)
        cost_class = f"{cfg.width}x{cfg.height} guidance={cfg.guidance} bank={cfg.bank.enabled}"
        choice = budget.decide(current, lo, hi, cost_class)
        if choice == current:
            return
        predicted = budget.predict_p95(choice)
        level = logging.DEBUG if budget.last_reason == "calibrating" else logging.INFO
        log.log(
            level,
            "steps: %s -> %s (%s; predicted p95 %s ms, budget %s ms)",
            current,
            choice,
            budget.last_reason,
            "?" if predicted is None else f"{predicted:.0f}",
            budget.config.budget_ms,
        )
        update = {"steps": choice.steps, "stream_batch": choice.stream_batch, "t_index_list": None}
        engine.set_config(
            self.step_down.apply(type(cfg).model_validate({**cfg.model_dump(), **update}))
        )

    def _step_bounds(self, preset: Preset, cfg: Any) -> tuple[int, int]:
        """The step range the latency controller may use for ``preset``."""
        lo, hi = preset.step_range(self.base)
        hi = min(hi, int(SCHEDULE_STEPS * cfg.strength))  # what the strength leaves room for
        hi = min(hi, self.step_down.limits.steps or hi)  # what the memory leaves room for
        return min(lo, hi), hi

    def _step_choices(self, preset: Preset, cfg: Any) -> list[tuple[int, bool]]:
        """Every (steps, stream batch) the engine may run for ``preset``: the controller's
        candidates, or the preset's own configuration when no controller runs."""
        if self.budget is None:
            return [(cfg.steps, cfg.stream_batch)]
        lo, hi = self._step_bounds(preset, cfg)
        return [(c.steps, c.stream_batch) for c in self.budget.candidates(lo, hi)]

    def _apply(self, preset: Preset) -> None:
        assert self.switcher is not None
        previous = self.applied
        if preset.passthrough:
            pass
        elif previous is None or previous.passthrough:
            self.switcher.start(preset)  # nothing styled to blend from: restart the stream
            self._restarted = True
        else:
            self.switcher.switch(preset)
        # Published last: whoever sees the new preset applied also sees its switch in flight.
        self._previous, self.applied = previous, preset
        self._after_failed_switch()

    def _after_failed_switch(self) -> None:
        """A switch whose LoRA rewrite failed kept the previous style: say so (the preset
        marked broken) and run on as the previous preset."""
        assert self.switcher is not None
        if self.switcher.failed is None:
            return
        self.switcher.failed = None
        self.presets.library.mark_broken(self.switcher.loras.errors)
        self.applied = self._previous

    def _run(self) -> None:
        backoff, retry_at = _BACKOFF_MIN_S, 0.0
        last_call: float | None = None  # when the previous engine call started
        while not self._stop.is_set():
            if self._loader is None and self.engine is None and time.monotonic() >= retry_at:
                self._start_loading(self.presets.current())
            elif self._loader is not None and not self._loader.is_alive():
                if self._finish_loading(backoff):
                    backoff = _BACKOFF_MIN_S
                else:
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
            frame = self._in.get(timeout=0.1)
            if frame is None:
                continue
            if self.engine is not None:
                try:
                    self._follow_presets()
                except Exception as err:  # a preset's configuration may not fit in memory
                    if not self._lower_after(err):
                        raise
            passthrough = self.applied is None or self.applied.passthrough
            if frame.kind == "unavailable" or self.engine is None or passthrough:
                self._send(frame)  # passthrough while loading, failed, or by choice
                continue
            try:
                self._follow_budget()
                choice = StepChoice(self.engine.config.steps, self.engine.config.stream_batch)
                t0 = time.perf_counter()
                self.switcher.before_frame()
                self._after_failed_switch()
                if self.masks is not None:  # the mask thread segments it meanwhile
                    self.masks.offer(frame, self.applied, restart=self._restarted)
                    self._restarted = False
                styled = self.engine(frame.image, tag=frame.captured_at)
                call_ms = (time.perf_counter() - t0) * 1000
                self.call_ms.add(call_ms)
                self.calls += 1
                if self.budget is not None:
                    tag = self.engine.output_tag if styled is not None else None
                    latency = None if tag is None else (time.monotonic() - tag) * 1000
                    interval = None if last_call is None else (t0 - last_call) * 1000
                    self.budget.observe(choice, call_ms, latency, interval)
                last_call = t0
            except Exception as err:
                if self._lower_after(err):
                    if not self._showing_styled:
                        self._send(frame)
                    continue
                log.error("engine: frame failed (%s); passthrough, retry in %.0f s", err, backoff)
                self.state = "failed"
                # Rebuilt after the backoff: a half-broken engine is not reused.
                self.engine, self.switcher, self.applied = None, None, None
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                self._send(frame)
                continue
            if styled is None:
                # The stream buffer is filling (start, or a preset that restarts the stream):
                # warm-up frames are never published. After a styled frame the output repeats
                # it; otherwise the camera frame goes out.
                if not self._showing_styled:
                    self._send(frame)
                continue
            self._set_state("running")
            self.frames_styled += 1
            self._showing_styled = True
            self._out.put(Frame(styled, self.engine.output_tag, frame.seq, "styled"))

    def _lower_after(self, err: Exception) -> bool:
        """An out-of-memory error: go on one step lighter (bank frames, then steps, then size)
        rather than rebuild the same engine into the same error. False when it is not one, or
        nothing is left to lower."""
        engine = self.engine
        while engine is not None and is_out_of_memory(err):
            lowered = self.step_down.after(engine.config, err)
            if lowered is None:
                return False
            log.warning("engine: degraded: %s", self.step_down.reason)
            try:
                engine.release_memory()  # what other configurations kept, then the cache
                engine.set_config(lowered)
                return True
            except Exception as again:  # allocating the lighter one failed too: lower again
                err = again
        return False

    def _send(self, frame: Frame) -> None:
        """Send a camera (or "camera unavailable") frame on as it is."""
        self._showing_styled = False
        if frame.kind == "camera":
            frame = Frame(frame.image, frame.captured_at, frame.seq, "passthrough")
        self._out.put(frame)


def switched_specs(presets: Any, fused: tuple[LoraSpec, ...]) -> dict[str, LoraSpec]:
    """The LoRAs the presets switch in place (what the engine's adapter library will load, by
    its names), for the memory preflight."""
    from daemon.styles.loras import lora_name, switched_loras

    out: dict[str, LoraSpec] = {}
    for preset in presets:
        switched = switched_loras(preset, fused)
        for spec in preset.loras or ():
            if lora_name(spec) in switched:
                out.setdefault(lora_name(spec), spec)
    return out
