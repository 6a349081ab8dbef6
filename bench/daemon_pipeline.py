"""The daemon's data plane against the engine alone, in one run.

    python bench/daemon_pipeline.py --seconds 60            # fps and latency
    python bench/daemon_pipeline.py --seconds 600 --rss     # plus RSS over a 10-minute run

1. Engine only: ``engine(frame)`` in a loop on test-pattern frames -> engine fps, call p95.
2. The daemon (camera thread with the generated test pattern, engine thread, output thread paced
   at the output fps, MJPEG preview with one real OpenCV client reading it): the rate at which new
   styled frames reach the output, glass-to-glass latency (capture -> publish) p50/p95, and RSS.

Prints output-fps / engine-fps and latency p95 against engine p95 + one output frame interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.app import Daemon
from daemon.config import DaemonConfig
from daemon.dataplane.frames import test_pattern
from daemon.runner import apply_demo
from streamv2v import EngineConfig, StreamV2V
from streamv2v.testing import save_tiny_model


def engine_only(model: Path, size: int, steps: int, seconds: float) -> tuple[float, float, float]:
    """Engine fps, call p95 (ms) and input-to-output latency p95 (ms): in stream-batch mode an
    input's output comes back steps-1 calls later, which is the engine's own latency."""
    cfg = EngineConfig(vae="model", width=size, height=size, steps=steps, loras=())
    engine = StreamV2V.from_pretrained(model, config=cfg)
    engine.set_prompt("an oil painting")
    calls, latency, t_end, i = [], [], time.monotonic() + seconds, 0
    while time.monotonic() < t_end:
        frame = test_pattern(640, 480, i / 30)
        t0 = time.perf_counter()
        out = engine(frame, tag=t0)
        now = time.perf_counter()
        calls.append(now - t0)
        if out is not None:
            latency.append(now - engine.output_tag)
        i += 1
    calls, latency = calls[3:], latency[3:]
    p95 = float(np.percentile(calls, 95)) * 1000
    return len(calls) / sum(calls), p95, float(np.percentile(latency, 95)) * 1000


def preview_reader(url: str, stop: threading.Event) -> None:
    import cv2

    cap = cv2.VideoCapture(url)
    while not stop.is_set() and cap.read()[0]:
        pass
    cap.release()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--engine-seconds", type=float, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output-fps", type=float, default=30)
    p.add_argument("--rss", action="store_true", help="sample RSS every 10 s")
    args = p.parse_args()

    model = save_tiny_model(Path(tempfile.mkdtemp(prefix="streamv2v-bench-")) / "tiny")
    eng_fps, eng_call_p95, eng_p95 = engine_only(model, args.size, args.steps, args.engine_seconds)

    cfg, _ = apply_demo(DaemonConfig())
    data = cfg.model_dump()
    data["engine"]["model"] = str(model)
    data["engine"]["loras"] = []
    # (no ControlNet: the demo's tiny-canny fits the tiny style model, not this random one)
    data["engine"]["settings"].update(
        {"width": args.size, "height": args.size, "steps": args.steps, "vae": "model", "loras": (),
         "control": ()}
    )  # fmt: skip
    data["output"]["fps"] = args.output_fps
    data["output"]["preview"]["port"] = 0
    data["output"]["virtual_camera"]["enabled"] = False  # no v4l2loopback device here
    data["camera"]["fps"] = 30
    data["latency"]["enabled"] = False  # fixed steps: this measures the pipeline, not the budget
    data["control"]["enabled"] = False
    data["hotkeys"]["enabled"] = False
    daemon = Daemon(DaemonConfig.model_validate(data))
    daemon.start()
    stop = threading.Event()
    while daemon.engine.state != "running":
        time.sleep(0.1)
    reader = threading.Thread(
        target=preview_reader, args=(daemon.output.preview_url + "stream.mjpg", stop), daemon=True
    )
    reader.start()
    time.sleep(3)  # settle
    proc = psutil.Process()
    styled0, t0 = daemon.output.kinds["styled"], time.monotonic()
    rss = []
    latencies: list[float] = []
    end = t0 + args.seconds
    while time.monotonic() < end:
        time.sleep(min(10.0, end - time.monotonic()))
        latencies.extend(daemon.output.latency_ms.snapshot())
        daemon.output.latency_ms.clear()  # (a sample appended in between is lost: harmless)
        if args.rss:
            rss.append((time.monotonic() - t0, proc.memory_info().rss))
    styled = daemon.output.kinds["styled"] - styled0
    elapsed = time.monotonic() - t0
    status = daemon.status()
    stop.set()
    daemon.stop()

    out_fps = styled / elapsed
    lat = np.asarray(latencies)
    interval_ms = 1000 / args.output_fps
    print(
        f"tiny model {args.size}x{args.size} steps={args.steps} output {args.output_fps:g} fps, "
        f"{elapsed:.0f} s, preview client attached"
    )
    print(
        f"engine only       {eng_fps:7.2f} fps   call p95 {eng_call_p95:7.1f} ms   "
        f"input-to-output p95 {eng_p95:7.1f} ms"
    )
    print(f"daemon output     {out_fps:7.2f} new styled frames/s   ratio {out_fps / eng_fps:.3f}")
    print(
        f"glass-to-glass    p50 {np.percentile(lat, 50):7.1f} ms   "
        f"p95 {np.percentile(lat, 95):7.1f} ms   "
        f"(engine-only p95 + one output interval = {eng_p95 + interval_ms:.1f} ms)"
    )
    print(f"dropped input frames {status['dropped_input_frames']}, published {status['published']}")
    if rss:
        ref = next((r for t, r in rss if t >= 60), rss[0][1])
        print(
            f"RSS  at ~60 s {ref / 2**20:.1f} MB   at end {rss[-1][1] / 2**20:.1f} MB   "
            f"change {100 * (rss[-1][1] - ref) / ref:+.2f}%"
        )


if __name__ == "__main__":
    main()
