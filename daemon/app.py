"""The daemon's wiring: the data plane's three threads joined by latest-wins slots, and the
control plane hooked up to them.

    camera thread  -> [camera slot] -> engine thread -> [output slot] -> output thread (paced)
                                                                          -> virtual camera
                                                                          -> MJPEG preview
                                                                          -> recording

The output thread publishes at a fixed rate whatever happens upstream: the styled frame when the
engine has one, else the passthrough camera frame (model loading, warming up, failed), else the
"camera unavailable" frame. Every voice of the control plane (control API, OBS, hotkeys, the
preset files) switches presets through one PresetManager; the engine thread applies the choice
between frames. The workers live in daemon/dataplane/, the voices in daemon/control/ and
daemon/integrations/.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.config import DaemonConfig, default_config_path
from daemon.control.latency import StepChoice
from daemon.control.metrics import RateMeter, prometheus_text
from daemon.control.server import ControlPlaneServer
from daemon.dataplane.camera import CameraSource
from daemon.dataplane.engine_worker import EngineWorker
from daemon.dataplane.frames import Frame
from daemon.dataplane.output_worker import OutputWorker
from daemon.dataplane.slots import LatestSlot
from daemon.masking.worker import MaskWorker
from daemon.models.engine_config import engine_config
from daemon.models.lora_sizes import listing_dtype_bytes
from daemon.models.preflight import listing_with_lora_bytes
from daemon.models.registry import model_location
from daemon.styles.presets import (
    PresetLibrary,
    PresetManager,
    UnknownPreset,
    bundled_presets_dir,
    config_preset,
)

log = logging.getLogger("streamv2v")


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
        worker = EngineWorker
        if config.engine.remote:  # the engine on another machine (`streamv2v serve`)
            from daemon.remote.client import RemoteEngineWorker as worker  # type: ignore[assignment]
        self.engine = worker(config, self.camera_slot, self.output_slot, self.presets)
        self.output = OutputWorker(config, self.output_slot, self.size)
        self.engine.output_delay = self.output.delay_ms
        # Presets with a mask: frames segmented beside the engine, composited at the output.
        self.masks = MaskWorker((s.width, s.height), self.size)
        self.engine.masks = self.output.masks = self.masks
        self.rates = {stage: RateMeter() for stage in ("input", "engine", "output")}
        self._av_sync: tuple[int, int] | None = None  # (OBS connection, offset) last pushed
        self.obs: Any = None
        self.hotkeys: Any = None
        self.control: Any = None
        self.server: ControlPlaneServer | None = None
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_presets, name="presets", daemon=True)
        self.notes: list[str] = []

    def start(self) -> None:
        # One HTTP server for the control plane: the API and the page on the control port, the
        # preview on its own port (OBS sources keep their URL), one asyncio thread for both.
        self.server = ControlPlaneServer(api=self if self.config.control.enabled else None)
        self.notes = self.output.open_sinks(self.server)
        for note in self.notes:
            log.warning("%s", note)
        self.output.start()
        self.masks.start()
        self.engine.start()
        self.camera.start()
        self._watcher.start()
        self._start_control_plane()

    def _start_control_plane(self) -> None:
        cfg = self.config
        if cfg.control.enabled:
            from daemon.control.api import ControlServer

            try:
                self.control = ControlServer(
                    self,
                    cfg.control.host,
                    cfg.control.port,
                    cfg.control.token_file,
                    server=self.server,
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
        self.server.start()
        if cfg.obs.enabled:
            from daemon.integrations.obs import ObsControl

            self.obs = ObsControl(
                cfg.obs,
                on_preset=self._select_quietly,
                preset_for_scene=self.library.preset_for_scene,
            )
            self.obs.start()
        if cfg.hotkeys.enabled:
            from daemon.integrations.hotkeys import HotkeyListener

            self.hotkeys = HotkeyListener(self._hotkey_bindings())
            self.hotkeys.start()

    def stop(self) -> None:
        """Stop within ~2 s: control plane, then camera (released), engine, outputs."""
        self._watch_stop.set()
        for part in (self.control, self.server, self.obs, self.hotkeys):
            if part is not None:
                try:
                    part.stop()
                except Exception as err:  # stopping must never block the shutdown
                    log.warning("stopping %s: %s", type(part).__name__, err)
        self.camera.stop(timeout=1.0)
        self.camera_slot.close()
        self.engine.stop(timeout=0.5)
        self.masks.stop(timeout=0.5)
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
        listing = {
            "active": self.presets.active,
            "presets": self.presets.listing(),
            "errors": self.library.errors,
        }
        cfg = self.config.engine
        size = listing_dtype_bytes(self.engine.engine, cfg.dtype)
        return listing_with_lora_bytes(listing, model_location(cfg.model), size)

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
            # Before the first styled frame: download (file, bytes, ETA), then compiling k of n.
            "getting_ready": worker.readiness.snapshot() if hasattr(worker, "readiness") else None,
            "switching": worker.switching,
            # What out-of-memory errors made the engine lower, and why (None: nothing).
            "degraded": worker.step_down.status() if hasattr(worker, "step_down") else None,
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
            "loras": {  # style LoRAs switched in place: their factors and the base copies
                "loaded": stats.get("loras_loaded", 0),
                "bytes": stats.get("lora_bytes", 0),
                "base_bytes": stats.get("lora_base_bytes", 0),
                "active": dict(engine.adapters.active) if hasattr(engine, "adapters") else {},
            },
            "mask": mask_figures(self.masks, worker.applied),
            "device": device_figures(engine),
            "remote": worker.remote_figures() if hasattr(worker, "remote_figures") else None,
            "preview_url": out.preview_url,
            "output_fps": self.config.output.fps,  # what an OBS Media Source must be told
            "control_url": self.control.url if self.control is not None else None,
        }

    def metrics_text(self) -> str:
        """GET /metrics: the status in the Prometheus text format."""
        return prometheus_text(self.status())


def mask_figures(masks: MaskWorker, applied: Any) -> dict[str, Any]:
    """The applied preset's mask and what masking costs (segmenter and composite, p50 ms)."""
    return {
        "mode": getattr(applied, "mask", "none"),
        "feather": getattr(applied, "mask_feather", None),
        "smoothing": getattr(applied, "mask_smoothing", None),
        "segment_ms_p50": masks.segment_ms.pct(50),
        "composite_ms_p50": masks.composite_ms.pct(50),
        "masked_frames": masks.masked_frames,
        "missed": masks.missed,
    }


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
        engine_config(config.engine.model, config.engine.settings, loras=config.engine.loras),
        config_preset(config.engine.prompt, config.engine.negative_prompt),
        bundled_dir=bundled_presets_dir(config.presets.bundled),
        scene_map=config.obs.scenes,
    )


def local_preset_listing(config: DaemonConfig) -> dict[str, Any]:
    """The preset files as the daemon would read them (when no daemon is running)."""
    library = preset_library(config)
    library.scan()
    startup = config.presets.startup if config.presets.startup in library.presets else "config"
    manager = PresetManager(library, startup)
    listing = {"active": startup, "presets": manager.listing(), "errors": library.errors}
    size = listing_dtype_bytes(None, config.engine.dtype)
    return listing_with_lora_bytes(listing, model_location(config.engine.model), size)


def default_presets_dir() -> Path:
    """``presets`` in the user config dir (e.g. ~/.config/streamv2v/presets)."""
    return default_config_path().parent / "presets"
