"""The daemon's data plane: capture -> engine -> output, three threads joined by latest-wins slots.

    camera thread  -> [camera slot] -> engine thread -> [output slot] -> output thread (paced)
                                                                          -> virtual camera
                                                                          -> MJPEG preview
                                                                          -> recording

The output thread publishes at a fixed rate whatever happens upstream: the styled frame when the
engine has one, else the passthrough camera frame (model loading, warming up, failed), else the
"camera unavailable" frame. Every frame carries its capture time, so glass-to-glass latency is
measured at the moment of publishing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.camera import CameraSource
from daemon.config import DaemonConfig, default_config_path
from daemon.frames import Frame, fit_to, unavailable_frame
from daemon.latency import LatencyBudget, StepChoice
from daemon.metrics import RateMeter, Rolling, prometheus_text
from daemon.outputs import Recorder, VirtualCameraSink, VirtualCameraUnavailable
from daemon.presets import (
    Preset,
    PresetLibrary,
    PresetManager,
    UnknownPreset,
    bundled_presets_dir,
    config_preset,
)
from daemon.preview import PreviewServer
from daemon.slots import LatestSlot
from streamv2v.config import SCHEDULE_STEPS

if TYPE_CHECKING:
    from daemon.switching import StyleSwitcher

log = logging.getLogger("streamv2v")

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 2.0, 60.0


def engine_config(config: DaemonConfig):
    """The EngineConfig the daemon's engine section describes (LoRAs folded in; the tiny model
    uses its own small VAE and no LoRA)."""
    from daemon.cli import BUILTIN_MODELS
    from streamv2v import LoraSpec

    section = config.engine
    update: dict[str, Any] = {"loras": tuple(LoraSpec.model_validate(x) for x in section.loras)}
    if section.model in BUILTIN_MODELS:
        update = {"loras": (), "vae": "model"}
    return section.settings.model_copy(update=update)


def apply_demo(config: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """The embedded default: a generated camera and a built-in model, so the whole daemon runs
    on a machine with no camera, no GPU and no network. With the trained tiny style model (the
    package ships it) the camera is a moving scene of its world and the demo presets switch
    between its four styles. Returns what was substituted, for the log."""
    from daemon.cli import TINY_MODEL, TINY_STYLES, tiny_styles_available

    data = config.model_dump()
    if tiny_styles_available():
        model, size, source, steps = TINY_STYLES, 128, "scene", 1
        notes = [
            "demo: camera -> a generated moving scene of simple shapes (no camera needed)",
            "demo: model -> the built-in tiny style model, trained on such scenes (no "
            "download): presets plain, warm, cool, outline (hotkeys <ctrl>+<alt>+1..4, or "
            "`streamv2v preset NAME`); it knows nothing else",
        ]
        data["presets"].update({"bundled": "demo", "startup": "warm"})
    else:
        model, size, source, steps = TINY_MODEL, 256, "testpattern", 2
        notes = [
            "demo: camera -> a generated moving test pattern (no physical camera needed)",
            "demo: model -> the built-in tiny model with RANDOM weights (no download): its "
            "output is noise-like, it shows the pipeline, not a style",
        ]
    notes.append(f"demo: engine size {size}x{size}, {steps} step(s) (fast enough on a CPU)")
    data["engine"].update({"model": model, "loras": []})
    data["engine"]["settings"].update({"width": size, "height": size, "steps": steps})
    data["camera"].update({"source": source, "width": 256, "height": 256})
    data["output"]["virtual_camera"].update({"width": 256, "height": 256})
    return DaemonConfig.model_validate(data), notes


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
        self.base = engine_config(config)
        self._in, self._out = inp, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.state = "loading"  # loading, warming, running, failed, stopped
        self.engine: Any = None
        self.switcher: StyleSwitcher | None = None
        self.applied: Preset | None = None  # the preset the engine runs (None: not loaded)
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
        from daemon.cli import model_location
        from daemon.switching import StyleSwitcher
        from streamv2v import StreamV2V

        cfg = self.config.engine
        dtype = None
        if cfg.dtype is not None:
            import torch

            dtype = getattr(torch, cfg.dtype)
        version = self.presets.library.version
        engine = StreamV2V.from_pretrained(
            model_location(cfg.model),
            config=preset.engine_config(self.base),
            device=cfg.device,
            dtype=dtype,
            allow_pickle=cfg.allow_pickle,
        )
        switcher = StyleSwitcher(engine, self.base)
        switcher.encode(self.presets.library.presets.values())
        if not preset.passthrough:
            switcher.start(preset)
        return engine, switcher, version

    def _start_loading(self, preset: Preset) -> None:
        """Load in a thread of its own, so this thread keeps serving frames meanwhile."""
        if self.engine is None:
            self._set_state("loading", self.config.engine.model)
        else:
            log.info("preset %s: loading the model with its LoRAs", preset.name)
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
        if isinstance(loaded, Exception):
            if self.engine is None:
                log.error(
                    "engine: could not load (%s); passthrough, retry in %.0f s", loaded, backoff
                )
                self.state = "failed"
                return False
            # A preset's LoRAs failed: run it on the weights loaded now (until its file changes).
            wanted = self.presets.current()
            log.error(
                "preset %s: LoRAs failed (%s); running it on the current weights",
                wanted.name,
                loaded,
            )
            self._apply(wanted)
            return True
        preset, self.engine, self.switcher, self._library_version = loaded
        self.applied = preset
        self._set_state("warming")
        return True

    def _follow_presets(self) -> None:
        """Between frames: encode changed presets, and start a switch when the active preset
        differs from the applied one."""
        assert self.switcher is not None
        library = self.presets.library
        if library.version != self._library_version:
            self._library_version = library.version
            self.switcher.encode(library.presets.values())
        wanted = self.presets.current()
        if wanted == self.applied or self._loader is not None:
            return
        loras = wanted.engine_config(self.base).loras
        if not wanted.passthrough and loras != self.engine.config.loras:
            self._start_loading(wanted)  # the current style runs on until the new model is ready
            return
        self._apply(wanted)

    def _follow_budget(self) -> None:
        """Between frames: let the latency controller pick the steps (not while a preset
        switch is in flight: the blend and its flush must finish on one configuration)."""
        budget, engine = self.budget, self.engine
        if budget is None or self.switching or self.applied is None:
            return
        cfg = engine.config
        lo, hi = self.applied.step_range(self.base)
        hi = min(hi, int(SCHEDULE_STEPS * cfg.strength))  # what the strength leaves room for
        lo = min(lo, hi)
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
        engine.set_config(type(cfg).model_validate({**cfg.model_dump(), **update}))

    def _apply(self, preset: Preset) -> None:
        assert self.switcher is not None
        previous = self.applied
        if preset.passthrough:
            pass
        elif previous is None or previous.passthrough:
            self.switcher.start(preset)  # nothing styled to blend from: restart the stream
        else:
            self.switcher.switch(preset)
        # Published last: whoever sees the new preset applied also sees its switch in flight.
        self.applied = preset

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
                self._follow_presets()
            passthrough = self.applied is None or self.applied.passthrough
            if frame.kind == "unavailable" or self.engine is None or passthrough:
                self._send(frame)  # passthrough while loading, failed, or by choice
                continue
            try:
                self._follow_budget()
                choice = StepChoice(self.engine.config.steps, self.engine.config.stream_batch)
                t0 = time.perf_counter()
                self.switcher.before_frame()
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

    def _send(self, frame: Frame) -> None:
        """Send a camera (or "camera unavailable") frame on as it is."""
        self._showing_styled = False
        if frame.kind == "camera":
            frame = Frame(frame.image, frame.captured_at, frame.seq, "passthrough")
        self._out.put(frame)


class OutputWorker:
    """The output thread: every 1/fps publishes the newest frame to every sink, repeating the
    last one when nothing new arrived, so the virtual camera never stalls or freezes."""

    def __init__(self, config: DaemonConfig, src: LatestSlot[Frame], size: tuple[int, int]):
        self.config = config
        self.size = size
        self._src = src
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output", daemon=True)
        self.vcam: VirtualCameraSink | None = None
        self.preview: PreviewServer | None = None
        self.recorder: Recorder | None = None
        self.preview_url: str | None = None
        self.latency_ms = Rolling()
        self.delay_ms = Rolling()  # from a frame's arrival to its publishing (output pacing)
        self.budget_ms = config.latency.budget_ms
        self.deadline_misses = 0
        self.published = 0
        self.new_frames = 0
        self.kinds: collections.Counter = collections.Counter()

    def open_sinks(self) -> list[str]:
        """Open the configured outputs; returns what was substituted and why (for the log)."""
        notes = []
        out, (w, h) = self.config.output, self.size
        if out.virtual_camera.enabled:
            vc = out.virtual_camera
            try:
                self.vcam = VirtualCameraSink(
                    w, h, out.fps, device=vc.device, pixel_format=vc.pixel_format
                )
                log.info("virtual camera: %s (%dx%d @ %g fps)", self.vcam.device, w, h, out.fps)
            except VirtualCameraUnavailable as err:
                notes.append(f"no virtual camera: {err}")
        if out.preview.enabled:
            p = out.preview
            self.preview = PreviewServer(p.host, p.port, p.quality)
            self.preview.start()
            self.preview_url = self.preview.url
            log.info(
                "preview: %s (OBS: Media Source, ffmpeg option framerate=%g)",
                self.preview.url,
                out.fps,
            )
        if out.record.path is not None:
            self.recorder = Recorder()
            self.recorder.open(out.record.path, w, h, out.fps)
            log.info("recording to %s", out.record.path)
        return notes

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        closers = [self.vcam and self.vcam.close, self.preview and self.preview.stop]
        closers.append(self.recorder and self.recorder.close)
        for close in filter(None, closers):
            try:
                close()
            except Exception as err:  # closing must never block the shutdown
                log.warning("closing %s: %s", close.__self__.__class__.__name__, err)

    def _run(self) -> None:
        """Exactly one publish per output interval ("slot"), so the rate is the configured fps.
        A new frame goes out as soon as its slot's window is open (the second half of the
        interval) instead of waiting for a fixed tick, which would add up to a whole interval of
        latency; a slot with nothing new repeats the last frame at its deadline."""
        period = 1.0 / self.config.output.fps
        w, h = self.size
        image = unavailable_frame(w, h, "starting...")
        due = time.monotonic()
        while not self._stop.is_set():
            frame = self._src.get(timeout=max(0.0, due - time.monotonic()))
            if frame is not None:
                arrived = time.monotonic()
                image = fit_to(frame.image, w, h)
                self.new_frames += 1
                self.kinds[frame.kind] += 1
                opens = due - period / 2
                if time.monotonic() < opens:
                    self._stop.wait(opens - time.monotonic())
                now = time.monotonic()
                self.delay_ms.add((now - arrived) * 1000)
                if frame.kind != "unavailable":
                    latency = (now - frame.captured_at) * 1000
                    self.latency_ms.add(latency)
                    if self.budget_ms is not None and latency > self.budget_ms:
                        self.deadline_misses += 1
            elif self._src.closed:
                break
            self._publish(image)
            # The next slot; after a stall, start again from now rather than burst to catch up.
            due = max(due + period, time.monotonic() + period / 2)

    def _publish(self, image: np.ndarray) -> None:
        # A sink that fails (a virtual camera device removed, a full disk) is dropped with one
        # log line; the other outputs keep publishing.
        for name, method in (("vcam", "send"), ("preview", "publish"), ("recorder", "write")):
            sink = getattr(self, name)
            if sink is None:
                continue
            try:
                getattr(sink, method)(image)
            except Exception as err:
                log.error("output %s failed (%s): dropped, the other outputs go on", name, err)
                setattr(self, name, None)
                with contextlib.suppress(Exception):
                    (sink.stop if name == "preview" else sink.close)()
        self.published += 1


class Daemon:
    """The whole daemon, started and stopped as one: the data plane (camera, engine, output
    threads) and the control plane (preset files, OBS, hotkeys, the control API), all of whose
    switches go through one :class:`PresetManager`."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        s = config.engine.settings
        vc = config.output.virtual_camera
        self.size = (vc.width or s.width, vc.height or s.height)
        self.library = preset_library(config)
        self.library.scan()
        # UnknownPreset when presets.startup names no preset (the CLI checks this first).
        self.presets = PresetManager(self.library, config.presets.startup)
        self.camera_slot: LatestSlot[Frame] = LatestSlot()
        self.output_slot: LatestSlot[Frame] = LatestSlot()
        self.camera = CameraSource(config.camera, self.camera_slot, unavailable_size=self.size)
        self.engine = EngineWorker(config, self.camera_slot, self.output_slot, self.presets)
        self.output = OutputWorker(config, self.output_slot, self.size)
        self.engine.output_delay = self.output.delay_ms
        self.rates = {stage: RateMeter() for stage in ("input", "engine", "output")}
        self._av_sync: tuple[int, int] | None = None  # (OBS connection, offset) last pushed
        self.obs: Any = None
        self.hotkeys: Any = None
        self.control: Any = None
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_presets, name="presets", daemon=True)
        self.notes: list[str] = []

    def start(self) -> None:
        self.notes = self.output.open_sinks()
        for note in self.notes:
            log.warning("%s", note)
        self.output.start()
        self.engine.start()
        self.camera.start()
        self._watcher.start()
        self._start_control_plane()

    def _start_control_plane(self) -> None:
        cfg = self.config
        if cfg.control.enabled:
            from daemon.control import ControlServer

            try:
                self.control = ControlServer(
                    self, cfg.control.host, cfg.control.port, cfg.control.token_file
                )
                self.control.start()
            except OSError as err:
                log.error(
                    "control API: cannot listen on %s:%s (%s); `streamv2v preset` will not reach "
                    "this daemon (set control.port)",
                    cfg.control.host,
                    cfg.control.port,
                    err,
                )
                self.control = None
        if cfg.obs.enabled:
            from daemon.obs import ObsControl

            self.obs = ObsControl(
                cfg.obs,
                on_preset=self._select_quietly,
                preset_for_scene=self.library.preset_for_scene,
            )
            self.obs.start()
        if cfg.hotkeys.enabled:
            from daemon.hotkeys import HotkeyListener

            self.hotkeys = HotkeyListener(self._hotkey_bindings())
            self.hotkeys.start()

    def stop(self) -> None:
        """Stop within ~2 s: control plane, then camera (released), engine, outputs."""
        self._watch_stop.set()
        for part in (self.control, self.obs, self.hotkeys):
            if part is not None:
                try:
                    part.stop()
                except Exception as err:  # stopping must never block the shutdown
                    log.warning("stopping %s: %s", type(part).__name__, err)
        self.camera.stop(timeout=1.0)
        self.camera_slot.close()
        self.engine.stop(timeout=0.5)
        self.output_slot.close()
        self.output.stop(timeout=0.5)

    # ------------------------------------------------------------------ presets
    def _watch_presets(self) -> None:
        """The housekeeping thread: preset files, rates, A/V sync (never per frame)."""
        interval = min(self.config.presets.reload_interval_s, 0.5)
        while not self._watch_stop.wait(interval):
            self.reload_presets()
            now = time.monotonic()
            self.rates["input"].sample(self.camera_slot.puts, now)
            self.rates["engine"].sample(self.engine.calls, now)
            self.rates["output"].sample(self.output.published, now)
            self._sync_audio()

    def _sync_audio(self) -> None:
        """Keep an OBS audio input's sync offset at the measured glass-to-glass latency (p50),
        pushed again when it drifts by more than 20 ms or OBS (re)connects."""
        name = self.config.latency.av_sync_input
        if not name or self.obs is None or self.obs.state != "connected":
            return
        measured = self.output.latency_ms.pct(50)
        if measured is None:
            return
        offset = round(measured)
        last = self._av_sync
        if last is not None and last[0] == self.obs.generation and abs(last[1] - offset) <= 20:
            return
        try:
            answer = self.obs.request(
                "SetInputAudioSyncOffset", {"inputName": name, "inputAudioSyncOffset": offset}
            )
        except Exception as err:  # e.g. no such input: said once per connection
            if last is None or last[0] != self.obs.generation:
                log.error("A/V sync: OBS refused the offset for %r (%s)", name, err)
                self._av_sync = (self.obs.generation, -(10**9))
            return
        if answer is not None:
            log.info("A/V sync: %r audio offset %d ms (measured latency)", name, offset)
            self._av_sync = (self.obs.generation, offset)

    def reload_presets(self) -> dict[str, Any]:
        """Re-read the preset files now (they are also polled every reload_interval_s)."""
        if self.library.scan() and self.hotkeys is not None:
            self.hotkeys.update(self._hotkey_bindings())
        return {"presets": list(self.library.presets), "errors": self.library.errors}

    def select_preset(self, target: str, reason: str) -> str:
        """Switch to ``target`` (a name, "next" or "prev"); UnknownPreset names the choices."""
        return self.presets.select(target, reason)

    def _select_quietly(self, target: str, reason: str) -> None:
        """For event sources (OBS, hotkeys): an unknown name is one log line, not an error."""
        try:
            self.presets.select(target, reason)
        except UnknownPreset as err:
            log.warning("%s asked for a preset: %s", reason, err)

    def _hotkey_bindings(self) -> dict[str, Callable[[], None]]:
        combos: dict[str, str] = {}
        cfg = self.config.hotkeys
        wanted = [(cfg.next, "next"), (cfg.prev, "prev")]
        wanted += [(cfg.presets.get(n, p.hotkey), n) for n, p in self.library.presets.items()]
        for combo, target in wanted:
            if not combo:
                continue
            if combo in combos:
                log.warning("hotkey %s: bound to %s, not to %s", combo, combos[combo], target)
                continue
            combos[combo] = target
        return {
            combo: functools.partial(self._select_quietly, target, f"hotkey {combo}")
            for combo, target in combos.items()
        }

    def preset_listing(self) -> dict[str, Any]:
        return {
            "active": self.presets.active,
            "presets": self.presets.listing(),
            "errors": self.library.errors,
        }

    # ------------------------------------------------------------------ figures
    def status(self) -> dict[str, Any]:
        """Live figures (GET /status, `streamv2v status`, GET /metrics)."""
        out, worker = self.output, self.engine
        engine = worker.engine
        cfg = engine.config if engine is not None else None
        stats = engine.stats() if engine is not None else {}
        budget = worker.budget
        latency = self.config.latency
        return {
            "state": {
                "camera": self.camera.state,
                "engine": worker.state,
                "obs": self.obs.state if self.obs is not None else "disabled",
                "hotkeys": self.hotkeys.state if self.hotkeys is not None else "disabled",
            },
            "camera": self.camera.state,
            "engine": worker.state,
            "obs": self.obs.state if self.obs is not None else "disabled",
            "preset": self.presets.active,
            "switching": worker.switching,
            "steps": cfg.steps if cfg is not None else None,
            "stream_batch": cfg.stream_batch if cfg is not None else None,
            "size": list(self.size),
            "controller": {
                "active": budget is not None,
                "calibrating": budget is not None and budget.calibrating,
                "reason": budget.last_reason if budget is not None else "",
                "predicted_p95_ms": (
                    budget.predict_p95(StepChoice(cfg.steps, cfg.stream_batch))
                    if budget is not None and cfg is not None
                    else None
                ),
            },
            "latency_budget_ms": latency.budget_ms,
            "target_fps": latency.target_fps,
            "fps": {stage: meter.rate for stage, meter in self.rates.items()},
            "latency_ms": {f"p{q}": out.latency_ms.pct(q) for q in (50, 95, 99)},
            "engine_ms_p50": worker.call_ms.pct(50),
            "deadline_misses": out.deadline_misses,
            "dropped_input_frames": self.camera_slot.dropped,
            "published": out.published,
            "new_frames": out.new_frames,
            "kinds": dict(out.kinds),
            "bank": {
                "enabled": bool(stats.get("bank_enabled")),
                "bytes": stats.get("bank_bytes", 0),
                "tokens": sum(stats.get("bank_tokens_per_layer", {}).values()),
            },
            "device": device_figures(engine),
            "preview_url": out.preview_url,
            "control_url": self.control.url if self.control is not None else None,
        }

    def metrics_text(self) -> str:
        """GET /metrics: the status in the Prometheus text format."""
        return prometheus_text(self.status())


def device_figures(engine: Any) -> dict[str, Any]:
    """The engine's device and dtype, and the accelerator memory torch holds (CUDA only)."""
    if engine is None:
        return {"name": None, "dtype": None, "memory_bytes": None}
    device = engine.device
    memory = None
    if device.type == "cuda":
        import torch

        memory = torch.cuda.memory_allocated(device)
    return {
        "name": str(device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "memory_bytes": memory,
    }


def preset_library(config: DaemonConfig) -> PresetLibrary:
    """The bundled presets, the user's folder and the [engine] prompt, with the OBS scene map."""
    user_dir = config.presets.dir or default_presets_dir()
    return PresetLibrary(
        user_dir,
        engine_config(config),
        config_preset(config.engine.prompt, config.engine.negative_prompt),
        bundled_dir=bundled_presets_dir(config.presets.bundled),
        scene_map=config.obs.scenes,
    )


def default_presets_dir() -> Path:
    """``presets`` in the user config dir (e.g. ~/.config/streamv2v/presets)."""
    return default_config_path().parent / "presets"
