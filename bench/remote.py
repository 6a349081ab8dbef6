"""Glass-to-glass latency and styled fps of the daemon with its engine here against the same
engine behind ``streamv2v serve`` on loopback (WebRTC: VP8 both ways, the data channel), in one
run each, on the same model and settings.

    python bench/remote.py --seconds 10 --runs 3

Prints, per run, p50/p95 of capture -> publish (styled frames only) and the rate of new styled
frames at the output, local and remote, and at the end the median added latency (remote p50 -
local p50) over the runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from daemon.app import Daemon  # noqa: E402
from daemon.config import DaemonConfig  # noqa: E402
from daemon.runner import apply_demo  # noqa: E402


def daemon_config(size: int, remote: str | None, control_file: Path) -> DaemonConfig:
    cfg, _ = apply_demo(DaemonConfig())
    data = cfg.model_dump()
    data["engine"]["settings"].update({"width": size, "height": size, "steps": 1})
    data["engine"]["remote"] = remote
    data["camera"].update({"width": size, "height": size, "fps": 20.0})
    data["output"].update({"fps": 20.0})
    data["output"]["virtual_camera"].update({"enabled": False})
    data["output"]["preview"]["port"] = 0
    data["control"].update({"port": 0, "token_file": control_file})
    data["hotkeys"]["enabled"] = False
    data["latency"]["enabled"] = False  # the same fixed steps on both paths
    return DaemonConfig.model_validate(data)


def measure(config: DaemonConfig, seconds: float) -> tuple[float, float, float]:
    """(p50 ms, p95 ms, styled fps) of one daemon over ``seconds`` once styled frames flow."""
    daemon = Daemon(config)
    daemon.start()
    try:
        end = time.monotonic() + 90
        while daemon.output.kinds.get("styled", 0) < 20 and time.monotonic() < end:
            time.sleep(0.1)
        daemon.output.latency_ms.clear()
        styled0, t0 = daemon.output.kinds.get("styled", 0), time.monotonic()
        passed0 = daemon.output.kinds.get("passthrough", 0)
        time.sleep(seconds)
        lat = daemon.output.latency_ms
        fps = (daemon.output.kinds.get("styled", 0) - styled0) / (time.monotonic() - t0)
        if daemon.output.kinds.get("passthrough", 0) != passed0:
            print("  (passthrough frames during the window: figures mix in camera frames)")
        return lat.pct(50) or float("nan"), lat.pct(95) or float("nan"), fps
    finally:
        daemon.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    code = "import sys; from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--log-level", "WARNING"],
        env=env,
    )
    end = time.monotonic() + 90
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    port = free_port()
    server = start_server(port)
    added = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            control = Path(tmp) / "control.json"
            for run in range(1, args.runs + 1):
                local = measure(daemon_config(args.size, None, control), args.seconds)
                remote_url = f"http://127.0.0.1:{port}"
                remote = measure(daemon_config(args.size, remote_url, control), args.seconds)
                for name, (p50, p95, fps) in (("local", local), ("remote", remote)):
                    print(
                        f"run {run} {name:<6} p50 {p50:6.0f} ms  p95 {p95:6.0f} ms  {fps:5.1f} fps"
                    )
                added.append(remote[0] - local[0])
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"tiny-styles {args.size}x{args.size}, 1 step, loopback: remote adds "
        f"{statistics.median(added):.0f} ms to the glass-to-glass p50 (median of {len(added)} "
        f"runs: {', '.join(f'{a:.0f}' for a in added)})"
    )


if __name__ == "__main__":
    main()
