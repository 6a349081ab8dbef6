"""Live figures of the daemon: rolling windows, rates, and their Prometheus text form.

Producers (the camera, engine and output threads) only append numbers or bump counters; readers
(the control API, the latency controller, the log at exit) compute percentiles and rates from
them when asked. Nothing here runs per frame beyond an append under a lock.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


class Rolling:
    """The last ``size`` samples of a figure, for percentiles of live metrics (thread-safe)."""

    def __init__(self, size: int = 300) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self.values.append(value)

    def snapshot(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self.values, float, len(self.values))

    def pct(self, q: float) -> float | None:
        values = self.snapshot()
        return float(np.percentile(values, q)) if values.size else None

    def clear(self) -> None:
        with self._lock:
            self.values.clear()


class RateMeter:
    """Events per second over the last ``window_s`` seconds, from a counter sampled now and then
    (so the producer only bumps an integer)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def sample(self, count: int, now: float) -> None:
        with self._lock:
            self._samples.append((now, count))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()

    @property
    def rate(self) -> float | None:
        with self._lock:
            if len(self._samples) < 2:
                return None
            (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None


# --------------------------------------------------------------------------- Prometheus text
def _number(value: float | int | bool | None) -> str:
    if value is None:
        return "NaN"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, Any], float | int | bool | None]],
    ) -> None:
        metric = f"streamv2v_{name}{'_total' if kind == 'counter' else ''}"
        self.lines.append(f"# HELP {metric} {help_text}")
        self.lines.append(f"# TYPE {metric} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{metric}{'{' + text + '}' if text else ''} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | int | bool | None) -> None:
        self.family(name, kind, help_text, [({}, value)])


def prometheus_text(status: Mapping[str, Any]) -> str:
    """The daemon's :meth:`~daemon.app.Daemon.status` in the Prometheus text format (0.0.4)."""
    out = _Exposition()
    fps = status["fps"]
    out.family(
        "fps",
        "gauge",
        "Frames per second over the last seconds, by stage.",
        [({"stage": stage}, fps[stage]) for stage in ("input", "engine", "output")],
    )
    latency = status["latency_ms"]
    seconds = [
        ({"quantile": q}, None if latency[k] is None else latency[k] / 1000)
        for q, k in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
    ]
    out.family(
        "glass_to_glass_latency_seconds",
        "gauge",
        "Capture-to-publish latency of the last published frames, by quantile.",
        seconds,
    )
    out.one(
        "latency_budget_seconds",
        "gauge",
        "The configured glass-to-glass budget (NaN: none).",
        None if status["latency_budget_ms"] is None else status["latency_budget_ms"] / 1000,
    )
    out.one(
        "deadline_misses",
        "counter",
        "Published frames whose glass-to-glass latency exceeded the budget.",
        status["deadline_misses"],
    )
    out.one(
        "dropped_input_frames",
        "counter",
        "Camera frames replaced before the engine took them.",
        status["dropped_input_frames"],
    )
    out.family(
        "frames_published",
        "counter",
        "New frames published to the outputs, by kind.",
        [({"kind": kind}, n) for kind, n in sorted(status["kinds"].items())],
    )
    out.one("steps", "gauge", "Denoising steps in use.", status["steps"])
    out.one("stream_batch", "gauge", "1 when the steps are stream-batched.", status["stream_batch"])
    out.family("preset", "gauge", "The active preset (1).", [({"name": status["preset"]}, 1)])
    out.one("feature_bank_bytes", "gauge", "Memory of the feature bank.", status["bank"]["bytes"])
    loras = status.get("loras") or {}
    out.one("lora_bytes", "gauge", "Memory of the loaded style LoRAs' factors.", loras.get("bytes"))
    out.one(
        "lora_base_bytes",
        "gauge",
        "Memory of the base weight copies of the layers style LoRAs touch.",
        loras.get("base_bytes"),
    )
    out.one(
        "feature_bank_tokens",
        "gauge",
        "Banked tokens over all self-attention layers (per stream slot).",
        status["bank"]["tokens"],
    )
    out.family(
        "state",
        "gauge",
        "1 for the current state of each part.",
        [({"part": part, "state": state}, 1) for part, state in sorted(status["state"].items())],
    )
    device = status["device"]
    out.family(
        "device_memory_bytes",
        "gauge",
        "Accelerator memory allocated by torch (NaN on the CPU).",
        [({"device": device["name"] or "none"}, device["memory_bytes"])],
    )
    return "\n".join(out.lines) + "\n"
