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
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.camera import CameraSource
from daemon.config import DaemonConfig
from daemon.frames import Frame, fit_to, unavailable_frame
from daemon.outputs import Recorder, VirtualCameraSink, VirtualCameraUnavailable
from daemon.preview import PreviewServer
from daemon.slots import LatestSlot

log = logging.getLogger("streamv2v")

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 2.0, 60.0


@dataclass
class Rolling:
    """The last ``size`` samples of a figure, for medians and percentiles of live metrics."""

    size: int = 300
    values: collections.deque = field(default_factory=collections.deque)

    def add(self, value: float) -> None:
        self.values.append(value)
        if len(self.values) > self.size:
            self.values.popleft()

    def pct(self, q: float) -> float | None:
        return float(np.percentile(np.fromiter(self.values, float), q)) if self.values else None


def engine_config(config: DaemonConfig):
    """The EngineConfig the daemon's engine section describes (LoRAs folded in; the tiny model
    uses its own small VAE and no LoRA)."""
    from daemon.cli import TINY_MODEL
    from streamv2v import LoraSpec

    section = config.engine
    update: dict[str, Any] = {"loras": tuple(LoraSpec.model_validate(x) for x in section.loras)}
    if section.model == TINY_MODEL:
        update = {"loras": (), "vae": "model"}
    return section.settings.model_copy(update=update)


def apply_demo(config: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """The embedded default: a generated camera and the tiny local model, so the whole data
    plane runs on a machine with no camera, no GPU and no network. Returns what was substituted."""
    settings = config.engine.settings.model_copy(update={"width": 256, "height": 256, "steps": 2})
    engine = config.engine.model_copy(update={"model": "tiny", "settings": settings})
    camera = config.camera.model_copy(update={"source": "testpattern"})
    notes = [
        "demo: camera -> a generated moving test pattern (no physical camera needed)",
        "demo: model -> the built-in tiny model with RANDOM weights (no download): its output is "
        "noise-like, it shows the pipeline, not a style",
        "demo: engine size 256x256, 2 steps (fast enough on a CPU)",
    ]
    return config.model_copy(update={"engine": engine, "camera": camera}), notes


class EngineWorker:
    """The engine thread: loads the model (passthrough meanwhile), restyles the newest camera
    frame, and falls back to passthrough with a retry backoff whenever the engine fails."""

    def __init__(self, config: DaemonConfig, inp: LatestSlot[Frame], out: LatestSlot[Frame]):
        self.config = config
        self._in, self._out = inp, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.state = "loading"  # loading, warming, running, failed, stopped
        self.engine: Any = None
        self.call_ms = Rolling()
        self.frames_styled = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.state = "stopped"

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            log.info("engine: %s%s", state, f" ({detail})" if detail else "")
            self.state = state

    def _load(self) -> Any:
        from daemon.cli import model_location
        from streamv2v import StreamV2V

        cfg = self.config.engine
        dtype = None
        if cfg.dtype is not None:
            import torch

            dtype = getattr(torch, cfg.dtype)
        engine = StreamV2V.from_pretrained(
            model_location(cfg.model),
            config=engine_config(self.config),
            device=cfg.device,
            dtype=dtype,
            allow_pickle=cfg.allow_pickle,
        )
        engine.set_prompt(cfg.prompt, negative_prompt=cfg.negative_prompt)
        return engine

    def _start_loading(self) -> None:
        """Load in a thread of its own, so this thread keeps passing camera frames through."""
        self._set_state("loading", self.config.engine.model)
        self._loaded: Any = None

        def load() -> None:
            try:
                self._loaded = self._load()
            except Exception as err:  # any failure: reported by the engine thread
                self._loaded = err

        self._loader = threading.Thread(target=load, name="engine-load", daemon=True)
        self._loader.start()

    def _run(self) -> None:
        backoff, retry_at = _BACKOFF_MIN_S, 0.0
        self._loader: threading.Thread | None = None
        while not self._stop.is_set():
            if self.engine is None:
                if self._loader is None and time.monotonic() >= retry_at:
                    self._start_loading()
                elif self._loader is not None and not self._loader.is_alive():
                    self._loader, loaded = None, self._loaded
                    if isinstance(loaded, Exception):
                        log.error(
                            "engine: could not load (%s); passthrough, retry in %.0f s",
                            loaded,
                            backoff,
                        )
                        self.state = "failed"
                        retry_at = time.monotonic() + backoff
                        backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    else:
                        self.engine, backoff = loaded, _BACKOFF_MIN_S
                        self._set_state("warming")
            frame = self._in.get(timeout=0.1)
            if frame is None:
                continue
            if frame.kind == "unavailable" or self.engine is None:
                self._out.put(frame)  # passthrough while loading or failed
                continue
            try:
                t0 = time.perf_counter()
                styled = self.engine(frame.image, tag=frame.captured_at)
                self.call_ms.add((time.perf_counter() - t0) * 1000)
            except Exception as err:
                log.error("engine: frame failed (%s); passthrough, retry in %.0f s", err, backoff)
                self.state = "failed"
                self.engine = None  # rebuilt after the backoff: a half-broken engine is not reused
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                self._out.put(frame)
                continue
            if styled is None:  # the stream buffer is still filling: never publish warm-up frames
                self._out.put(Frame(frame.image, frame.captured_at, frame.seq, "passthrough"))
                continue
            self._set_state("running")
            self.frames_styled += 1
            self._out.put(Frame(styled, self.engine.output_tag, frame.seq, "styled"))


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
                image = fit_to(frame.image, w, h)
                self.new_frames += 1
                self.kinds[frame.kind] += 1
                opens = due - period / 2
                if time.monotonic() < opens:
                    self._stop.wait(opens - time.monotonic())
                if frame.kind != "unavailable":
                    self.latency_ms.add((time.monotonic() - frame.captured_at) * 1000)
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
    """The whole data plane, started and stopped as one."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        s = config.engine.settings
        vc = config.output.virtual_camera
        self.size = (vc.width or s.width, vc.height or s.height)
        self.camera_slot: LatestSlot[Frame] = LatestSlot()
        self.output_slot: LatestSlot[Frame] = LatestSlot()
        self.camera = CameraSource(config.camera, self.camera_slot, unavailable_size=self.size)
        self.engine = EngineWorker(config, self.camera_slot, self.output_slot)
        self.output = OutputWorker(config, self.output_slot, self.size)
        self.notes: list[str] = []

    def start(self) -> None:
        self.notes = self.output.open_sinks()
        for note in self.notes:
            log.warning("%s", note)
        self.output.start()
        self.engine.start()
        self.camera.start()

    def stop(self) -> None:
        """Stop within ~2 s: camera first (released), then engine, then outputs."""
        self.camera.stop(timeout=1.0)
        self.camera_slot.close()
        self.engine.stop(timeout=0.5)
        self.output_slot.close()
        self.output.stop(timeout=0.5)

    def status(self) -> dict[str, Any]:
        """Live figures (the metrics issue extends these)."""
        out = self.output
        return {
            "camera": self.camera.state,
            "engine": self.engine.state,
            "published": out.published,
            "new_frames": out.new_frames,
            "kinds": dict(out.kinds),
            "latency_ms_p50": out.latency_ms.pct(50),
            "latency_ms_p95": out.latency_ms.pct(95),
            "engine_ms_p50": self.engine.call_ms.pct(50),
            "dropped_input_frames": self.camera_slot.dropped,
            "preview_url": out.preview_url,
        }
