"""``GET /metrics`` of ``streamv2v serve``: its figures in the Prometheus text format (0.0.4).

Every name starts with ``streamv2v_serve_``: the sessions and the free capacity (what a load
balancer's agent reads), whether it drains, each session's frame rate, engine time per frame and
failed frames, and what is loaded with its bytes (the model, style LoRAs, ControlNets, depth
models, and the accelerator's memory where it is CUDA).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from daemon.control.metrics import _Exposition

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def serve_metrics_text(figures: Mapping[str, Any]) -> str:
    """:meth:`~daemon.remote.server.RemoteServer.figures` as Prometheus text."""
    out = _Exposition()
    out.one("serve_sessions", "gauge", "Sessions (daemons) running.", figures["sessions"])
    out.one(
        "serve_max_sessions", "gauge", "Sessions allowed (--max-sessions).", figures["max_sessions"]
    )
    out.one(
        "serve_free_sessions",
        "gauge",
        "Sessions that can still start (free capacity).",
        figures["free_sessions"],
    )
    out.one(
        "serve_draining",
        "gauge",
        "1 while the server drains: no new sessions, it exits after its last (0 otherwise).",
        1 if figures.get("draining") else 0,
    )
    engines = figures["engines"]

    def per_session(key: str, scale: float = 1.0) -> list[tuple[dict[str, Any], Any]]:
        return [
            (
                {"session": e["session"], "preset": e["preset"] or ""},
                None if e[key] is None else e[key] * scale,
            )
            for e in engines
        ]

    out.family(
        "serve_session_fps", "gauge", "Frames styled per second, by session.", per_session("fps")
    )
    quantiles = [
        ({**labels, "quantile": q}, value)
        for q, key in (("0.5", "frame_ms_p50"), ("0.95", "frame_ms_p95"))
        for labels, value in per_session(key, 1e-3)
    ]
    out.family(
        "serve_session_frame_seconds",
        "gauge",
        "Engine time per frame of the last frames, by session and quantile.",
        quantiles,
    )
    out.family(
        "serve_session_frames",
        "counter",
        "Frames styled, by session.",
        per_session("frames"),
    )
    out.family(
        "serve_session_failed_frames",
        "counter",
        "Frames whose engine call failed, by session.",
        per_session("failed_frames"),
    )
    loaded = figures["loaded"]
    out.one(
        "serve_model_bytes",
        "gauge",
        "The model's weights (UNet, VAE, text encoder).",
        loaded["model_bytes"],
    )
    out.family(
        "serve_lora_bytes",
        "gauge",
        "Style LoRAs loaded (their factors), by LoRA.",
        [({"lora": name}, held["bytes"]) for name, held in sorted(loaded["loras"].items())],
    )
    out.one(
        "serve_lora_base_bytes",
        "gauge",
        "Base weight copies of the layers the loaded LoRAs touch.",
        loaded["lora_base_bytes"],
    )
    out.family(
        "serve_controlnet_bytes",
        "gauge",
        "ControlNets loaded, by model.",
        [({"model": m}, held["bytes"]) for m, held in sorted(loaded["controlnets"].items())],
    )
    out.family(
        "serve_controlnet_sessions",
        "gauge",
        "Sessions using each loaded ControlNet.",
        [({"model": m}, held["sessions"]) for m, held in sorted(loaded["controlnets"].items())],
    )
    depth: dict[str, int] = {}
    for key, held in loaded["preprocessors"].items():
        model = json.loads(key).get("depth_model")
        if model:
            depth[model] = depth.get(model, 0) + held["bytes"]
    out.family(
        "serve_depth_model_bytes",
        "gauge",
        "Depth models loaded for depth ControlNets, by model.",
        [({"model": m}, n) for m, n in sorted(depth.items())],
    )
    gpu = loaded.get("gpu_memory")
    if gpu is not None:
        out.family(
            "serve_gpu_memory_bytes",
            "gauge",
            "CUDA memory held by torch, allocated and reserved.",
            [({"kind": k}, gpu[f"{k}_bytes"]) for k in ("allocated", "reserved")],
        )
    return "\n".join(out.lines) + "\n"
