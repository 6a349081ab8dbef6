"""The demo daemon in a real process with the shipped sepia LoRA: switching between the LoRA preset
and a prompt preset through the control API (and global hotkeys, where Xvfb is installed)
publishes no passthrough frame and leaves no gap in the preview (its parts' arrival times), the
LoRA's style shows (the named statistic: sepia_error, the distance of each pixel from the sepia
tone of its brightness), and memory after 20 switches is within 2% of memory after the first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_daemon import wait_for

from daemon.control.api import call
from streamv2v.tiny.lora import sepia_error

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEPIA_LORA = ROOT / "streamv2v" / "models" / "tiny-styles-loras" / "sepia.safetensors"
#: LoRA <-> prompt switches of the memory check, each awaited (about a second each here).
SWITCHES = 20


class Preview(threading.Thread):
    """Reads the daemon's MJPEG preview: (arrival time, RGB frame) of every part."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.frames, self.stop = url, [], False

    def run(self) -> None:
        with urllib.request.urlopen(self.url, timeout=10) as stream:
            buf = b""
            while not self.stop:
                buf += stream.read1(65536)
                while True:
                    start, end = buf.find(b"\xff\xd8"), buf.find(b"\xff\xd9")
                    if start < 0 or end < start:
                        break
                    jpeg, buf = buf[start : end + 2], buf[end + 2 :]
                    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                    self.frames.append((time.monotonic(), img[..., ::-1]))

    def since(self, t: float) -> list[tuple[float, np.ndarray]]:
        return [(ts, f) for ts, f in list(self.frames) if ts >= t]

    def longest_still(self, start: float, end: float) -> float:
        """The longest time the preview showed one picture between ``start`` and ``end``
        (the output repeats its last frame while the engine has no new one: an engine stall
        is a still, not a gap)."""
        parts = [(ts, f) for ts, f in self.since(start) if ts < end]
        longest, since = 0.0, None
        for (ts, frame), previous in zip(parts, [None, *parts]):
            if previous is None or not np.array_equal(frame, previous[1]):
                since = ts
            longest = max(longest, ts - since)
        return longest


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_demo_switches_lora_and_prompt_styles_live_in_a_real_process(tmp_path):
    assert SEPIA_LORA.is_file()  # the demo LoRA ships in the repository (and the package)
    display = None
    if shutil.which("Xvfb") and shutil.which("xdotool"):
        from test_hotkeys import Xvfb, press

        display = Xvfb()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.pop("WAYLAND_DISPLAY", None)
    if display is not None:
        env["DISPLAY"] = display.display
    cmd = [sys.executable, "-m", "daemon", "run", "--demo", "--set", "output.preview.port=0"]
    cmd += ["--set", "control.port=0", "--set", f"log.file='{tmp_path / 'd.log'}'"]
    cmd += ["--set", f"hotkeys.enabled={'true' if display else 'false'}"]
    cmd += ["--set", "latency.enabled=false"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    control = tmp_path / "config" / "streamv2v" / "control.json"
    preview = None

    def status() -> dict:
        return call("GET", "/status", control_file=control)

    def switch(name: str) -> None:
        call("POST", "/preset", {"name": name}, control_file=control)

    def settled(name: str) -> bool:
        s = status()
        return s["preset"] == name and not s["switching"]

    def applied(name: str) -> bool:
        """The engine switched to ``name``: not only asked to (the LoRA is in for sepia only)."""
        s = status()
        return settled(name) and bool(s["loras"]["active"]) == (name == "sepia")

    try:
        assert wait_for(lambda: any("engine: running" in ln for ln in lines), 120), lines[-20:]
        assert wait_for(control.is_file, 10)
        first = status()
        interval = 1.0 / first["output_fps"]
        preview = Preview(first["preview_url"] + "stream.mjpg")
        preview.start()
        assert wait_for(lambda: len(preview.frames) > 10, 20)
        passthrough = status()["kinds"].get("passthrough", 0)
        b0 = time.monotonic()
        time.sleep(4.0)  # a baseline without switches: the preview's own jitter on this machine
        t0 = time.monotonic()

        stats = {}
        for name, via in (
            ("sepia", "api"),
            ("warm", "hotkey"),
            ("sepia", "hotkey"),
            ("warm", "api"),
        ):
            mark = time.monotonic()
            if via == "hotkey" and display is not None:
                press(display.display, "ctrl+alt+5" if name == "sepia" else "ctrl+alt+2")
            else:
                switch(name)
            assert wait_for(lambda n=name: settled(n), 30), status()
            # The blend (6 frames) is over: these frames show the style. Counted in styled
            # frames, not seconds (a loaded box styles 3-4 frames a second: a fixed 1 s caught
            # sepia mid-blend once, 15.9 against 5-6 settled).
            styled = status()["kinds"].get("styled", 0)
            assert wait_for(lambda s=styled: status()["kinds"].get("styled", 0) >= s + 10, 30)
            shown = [f for ts, f in preview.since(mark + 0.5)]
            stats.setdefault(name, []).append(np.mean([sepia_error(f) for f in shown[-8:]]))

        # Memory: SWITCHES switches, LoRA <-> prompt, each one awaited until the engine has
        # applied it (the LoRA in or out, the blend over) and counted in the log.
        t1 = time.monotonic()  # (the gaps below are those of the four switches above)
        logged = sum("preset: " in ln and " -> " in ln for ln in lines)
        rss_first = None
        for i in range(SWITCHES):
            name = "sepia" if i % 2 == 0 else "warm"
            switch(name)
            assert wait_for(lambda n=name: applied(n), 30, 0.1), status()
            if i == 0:
                rss_first = rss_bytes(proc.pid)
                lora_first = status()["loras"]
        assert sum("preset: " in ln and " -> " in ln for ln in lines) - logged == SWITCHES
        rss_last, lora_last = rss_bytes(proc.pid), status()["loras"]
        end = status()
        times = [ts for ts, _ in preview.since(t0) if ts < t1]
        baseline = [ts for ts, _ in preview.since(b0) if ts < t0]
        still, steady_still = preview.longest_still(t0, t1), preview.longest_still(b0, t0)
    finally:
        if preview is not None:
            preview.stop = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if display is not None:
            display.kill()
    text = "".join(lines)
    assert "Traceback" not in text, text[-3000:]
    # No passthrough frame while switching (the camera is a plain scene: it would show).
    assert end["kinds"].get("passthrough", 0) == passthrough
    # Memory after the switches is that after the first (the machine's load does not move it:
    # checked before the timings).
    print(f"RSS (MB) after the first switch {rss_first / 1e6:.0f}, after all {rss_last / 1e6:.0f}")
    assert abs(rss_last - rss_first) <= 0.02 * rss_first, (rss_first, rss_last)
    assert lora_first["bytes"] == lora_last["bytes"] > 0
    assert lora_first["base_bytes"] == lora_last["base_bytes"] > 0
    # No gap in the preview while switching (the four timed switches above, each blending the
    # LoRA in or out over 6 frames): the output keeps its rate (median within 1.5 output
    # intervals, p95 within two or within one beyond the baseline's p95) and no part is later
    # than half a second, or than one interval beyond the longest gap of the no-switch
    # baseline. (A shared 2-core CI machine adds hiccups of its own, 0.06-0.36 s seen here
    # WITHOUT switches; a quarter second failed once in a fresh clone's suite on a 0.29 s gap
    # after a calm 4 s baseline. A rewrite in place takes milliseconds; a reload took seconds,
    # a recompile minutes. The output repeats its last frame meanwhile: stalls are stills.)
    gaps, steady = np.diff(times), np.diff(baseline)
    assert np.median(gaps) <= 1.5 * interval, np.median(gaps)
    p95, steady95 = np.percentile(gaps, 95), np.percentile(steady, 95)
    assert p95 <= max(2 * interval, steady95 + interval), (p95, steady95)
    assert gaps.max() <= max(0.5, steady.max() + interval), (gaps.max(), steady.max())
    # Nor does the engine stall: no picture stays longer than half a second, or than twice the
    # baseline's longest still and half a second more (measured: 0.28 s switching against 0.18 s;
    # with a 0.7 s stall per rewrite 1.01 s against 0.13 s: mutant lora-rewrite-stalls).
    print(f"longest still: switching {still:.3f} s, baseline {steady_still:.3f} s")
    assert still <= max(0.5, 2 * steady_still + 0.5), (still, steady_still)
    # The LoRA's style shows: sepia's frames are near the sepia tone; warm's are far from it.
    assert max(stats["sepia"]) < 0.6 * min(stats["warm"]), stats
    json.dumps(stats)
