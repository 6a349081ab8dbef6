"""The latency controller against three budgets: chosen steps and measured glass-to-glass p95.

    python bench/latency_budget.py                                # 1000, 300 and 150 ms
    python bench/latency_budget.py --stream-batch always --budgets 1000 300 200
    python bench/latency_budget.py --budgets 500 200 --seconds 60 --size 512

For each budget the whole daemon runs in this process on the tiny model (generated camera at
30 fps, output at 30 fps, no virtual camera), first through its calibration, then for
``--seconds``; it prints the steps the controller settled on (and how the measured frames
spread over step counts), the measured glass-to-glass p50/p95 (capture -> publish, every new
frame published), the share of frames over budget, and whether the minimum step count is
predicted to fit at all (the goal is p95 <= budget whenever it does).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.app import Daemon
from daemon.config import DaemonConfig
from daemon.control.latency import StepChoice
from daemon.runner import apply_demo
from streamv2v.testing import save_tiny_model


def daemon_config(
    model: Path, size: int, budget_ms: float, max_steps: int, stream_batch: str
) -> DaemonConfig:
    cfg, _ = apply_demo(DaemonConfig())
    data = cfg.model_dump()
    data["engine"].update({"model": str(model), "loras": []})
    # (no ControlNet: the demo's tiny-canny fits the tiny style model, not this random one)
    data["engine"]["settings"].update(
        {"width": size, "height": size, "vae": "model", "loras": (), "control": ()}
    )
    data["camera"]["fps"] = 30
    data["output"]["fps"] = 30
    data["output"]["preview"]["enabled"] = False
    data["output"]["virtual_camera"]["enabled"] = False
    data["control"]["enabled"] = False
    data["hotkeys"]["enabled"] = False
    latency = {"budget_ms": budget_ms, "min_steps": 1, "max_steps": max_steps}
    data["latency"].update(latency, stream_batch=stream_batch)
    return DaemonConfig.model_validate(data)


def run(model: Path, args: argparse.Namespace, budget_ms: float) -> str:
    config = daemon_config(model, args.size, budget_ms, args.max_steps, args.stream_batch)
    daemon = Daemon(config)
    daemon.start()
    try:
        deadline = time.monotonic() + args.calibration_timeout
        while daemon.engine.budget.calibrating or daemon.engine.state != "running":
            if time.monotonic() > deadline:
                return f"{budget_ms:7g} ms   calibration did not finish"
            time.sleep(0.2)
        time.sleep(2.0)  # the first decision after calibration
        daemon.output.latency_ms.clear()
        latencies: list[float] = []
        steps_seen: collections.Counter = collections.Counter()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            latencies.extend(daemon.output.latency_ms.snapshot())
            daemon.output.latency_ms.clear()
            engine = daemon.engine.engine
            steps_seen[str(StepChoice(engine.config.steps, engine.config.stream_batch))] += 1
        budget = daemon.engine.budget
        final = StepChoice(
            daemon.engine.engine.config.steps, daemon.engine.engine.config.stream_batch
        )
        if args.verbose:
            for c in budget.candidates(1, args.max_steps):
                print(f"   predicted p95 {c!s:<24} {budget.predict_p95(c) or 0:7.1f} ms")
        lowest = budget.candidates(1, 1)[0]
        min_fits = budget.fits(lowest)
        fps = daemon.status()["fps"]
    finally:
        daemon.stop()
    lat = np.asarray(latencies)
    p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
    over = float((lat > budget_ms).mean() * 100)
    spread = ", ".join(f"{k} {v * 100 // sum(steps_seen.values())}%" for k, v in steps_seen.items())
    verdict = "p95 <= budget" if p95 <= budget_ms else "p95 OVER budget"
    return (
        f"{budget_ms:7g} ms   {final!s:<24} p50 {p50:6.1f}  p95 {p95:6.1f} ms  "
        f"over {over:4.1f}%  engine {fps['engine'] or 0:4.1f} fps  min fits: {min_fits!s:<5}  "
        f"{verdict}   [{spread}]"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[1000, 300, 150])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--calibration-timeout", type=float, default=120)
    p.add_argument("--stream-batch", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--verbose", action="store_true", help="print the final predictions too")
    args = p.parse_args()
    model = save_tiny_model(Path(tempfile.mkdtemp(prefix="streamv2v-bench-")) / "tiny")
    print(
        f"tiny model {args.size}x{args.size}, camera 30 fps, stream batch {args.stream_batch}, "
        f"{args.seconds:g} s per budget"
    )
    print("budget       chosen steps             glass-to-glass            ")
    for budget in args.budgets:
        print(run(model, args, budget), flush=True)


if __name__ == "__main__":
    main()
