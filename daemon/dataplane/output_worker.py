"""The output thread of the data plane: paced at the output fps, it publishes the newest frame
to every sink (virtual camera, MJPEG preview, recording), repeating the last one when nothing new
arrived, and measures glass-to-glass latency at the moment of publishing."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time

import numpy as np

from daemon.config import DaemonConfig
from daemon.control.metrics import Rolling
from daemon.control.preview import PreviewServer
from daemon.control.server import ControlPlaneServer
from daemon.dataplane.frames import Frame, fit_to, unavailable_frame
from daemon.dataplane.ndi import NdiSink
from daemon.dataplane.outputs import Recorder, VirtualCameraSink, VirtualCameraUnavailable
from daemon.dataplane.slots import LatestSlot
from daemon.masking.worker import MaskWorker

log = logging.getLogger("streamv2v")

#: Output slots a late output thread makes up at once (at 30 fps: up to 100 ms of hiccups).
_CATCH_UP = 3


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
        self.ndi: NdiSink | None = None
        self.preview_url: str | None = None
        self.latency_ms = Rolling()
        self.delay_ms = Rolling()  # from a frame's arrival to its publishing (output pacing)
        self.budget_ms = config.latency.budget_ms
        self.deadline_misses = 0
        self.published = 0
        self.new_frames = 0
        self.kinds: collections.Counter = collections.Counter()
        self.masks: MaskWorker | None = None  # composites styled frames with their mask (if set)

    def open_sinks(self, server: ControlPlaneServer | None = None) -> list[str]:
        """Open the configured outputs; returns what was substituted and why (for the log).
        The preview listens on ``server`` (the daemon's one), or on a server of its own."""
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
            self.preview = PreviewServer(p.host, p.port, p.quality, server=server)
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
        if out.ndi.enabled:
            try:
                self.ndi = NdiSink(out.ndi.name, w, h, out.fps)
                log.info("NDI output: %s (%dx%d @ %g fps)", out.ndi.name, w, h, out.fps)
            except Exception as err:  # no cyndilib, or the runtime refused: the rest goes on
                notes.append(f"no NDI output: {err}")
        return notes

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        closers = [self.vcam and self.vcam.close, self.preview and self.preview.stop]
        closers += [self.recorder and self.recorder.close, self.ndi and self.ndi.close]
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
                if frame.kind == "styled" and self.masks is not None:
                    image = self.masks.composite(frame, image, timeout=period / 2)
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
            # The next slot. Slots published late (a busy machine wakes this thread late, a
            # sink is slow) are made up by the next ones going out at once, so the rate holds;
            # after a stall of more than _CATCH_UP slots, start again from now (no burst).
            due += period
            if due < time.monotonic() - _CATCH_UP * period:
                due = time.monotonic() + period / 2

    def _publish(self, image: np.ndarray) -> None:
        # A sink that fails (a virtual camera device removed, a full disk) is dropped with one
        # log line; the other outputs keep publishing.
        sinks = (("vcam", "send"), ("preview", "publish"), ("recorder", "write"), ("ndi", "send"))
        for name, method in sinks:
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
