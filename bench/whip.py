"""WHIP/WHEP on loopback against a real `streamv2v serve` (the tiny style model): the round trip
of a colour change (publisher -> server -> back on the same connection), and the server's CPU
for 0, 1, 2, 4 WHEP viewers of one session (the relay encodes each frame once).

    python bench/whip.py --runs 3 --seconds 10

Round trip: the publisher's frames turn from dark to light (and back); the time until the frame
that comes back has moved by a clear step, median over ``--runs`` changes, with the passthrough
preset: transport, both codecs and the server's loop (a style adds the engine's frame time; the
tiny model's styles do not follow the camera's brightness closely enough to time them this way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from whip_helpers import Loop, Publisher, Viewer  # noqa: E402

TOKEN = "bench-token"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "token").write_text(TOKEN)
    code = "import sys; from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, "serve", "--port", str(args.port)]
    cmd += ["--token-file", str(tmp / "token"), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{args.port}"

    def call(method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        request = urllib.request.Request(base + path, data, headers, method=method)
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read() or b"{}")

    loop = Loop()
    try:
        for _ in range(600):
            try:
                call("GET", "/presets")
                break
            except OSError:
                time.sleep(0.2)
        pub = Publisher(loop, base, TOKEN, (30, 30, 30))
        assert pub.start("?preset=passthrough") == 201
        for preset in ("passthrough",):
            call("PUT", f"{pub.location}/preset", {"name": preset})
            trips = []
            for i in range(args.runs * 2):
                light = i % 2 == 0
                time.sleep(2.0)  # settle
                before = _level(pub)
                t0 = time.monotonic()
                pub.set_colour((220, 220, 220) if light else (30, 30, 30))
                found = None
                while found is None and time.monotonic() - t0 < 10:
                    time.sleep(0.005)
                    for t, level in list(pub.back.levels):
                        if t > t0 and abs(level - before) > 25:
                            found = t
                            break
                if found is not None:
                    trips.append((found - t0) * 1000)
            print(
                f"round trip, preset {preset}: median {statistics.median(trips):.0f} ms "
                f"of {len(trips)} ({', '.join(f'{t:.0f}' for t in trips)})"
            )
        call("PUT", f"{pub.location}/preset", {"name": "passthrough"})
        server = psutil.Process(proc.pid)
        viewers: list[Viewer] = []
        for count in (0, 1, 2, 4):
            while len(viewers) < count:
                viewer = Viewer(loop, base, TOKEN)
                assert viewer.start(f"/whep/{pub.id}") == 201
                viewers.append(viewer)
            time.sleep(3.0)
            cpu0, t0 = server.cpu_times(), time.monotonic()
            frames0 = [v.received.frames for v in viewers]
            time.sleep(args.seconds)
            cpu1, t1 = server.cpu_times(), time.monotonic()
            used = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
            fps = [(v.received.frames - f) / (t1 - t0) for v, f in zip(viewers, frames0)]
            figures = call("GET", pub.location)
            print(
                f"{count} viewer(s): server CPU {100 * used:.1f} % of a core; viewers' fps "
                f"{[round(f, 1) for f in fps]}; encoded {figures['encoded']}, "
                f"encode {figures['encode_ms']} ms/frame"
            )
        for viewer in viewers:
            viewer.close()
        pub.close()
    finally:
        loop.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            print("serve did not stop on SIGTERM within 10 s; killed")
            proc.kill()


def _level(pub: Publisher) -> float:
    levels = [level for _, level in list(pub.back.levels)[-5:]]
    return statistics.median(levels) if levels else 0.0


if __name__ == "__main__":
    main()
