"""The whole data plane on the tiny model: camera thread -> engine thread -> output thread.

The virtual camera is pyvirtualcam's real Camera with an in-memory backend registered under the
default Linux backend's name through pyvirtualcam.register_backend (this machine has no
v4l2loopback device); everything else is real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from daemon.app import Daemon
from daemon.cli import main
from daemon.config import DaemonConfig, load_config
from daemon.runner import apply_demo


def demo_config(tiny_model: Path, **extra) -> DaemonConfig:
    cfg, _ = apply_demo(DaemonConfig())
    engine = cfg.engine.model_copy(update={"model": str(tiny_model)})
    cfg = cfg.model_copy(update={"engine": engine})
    data = cfg.model_dump()
    # (no ControlNet: the demo's tiny-canny fits the style model, not this random tiny one)
    data["engine"]["settings"].update(
        {"width": 64, "height": 64, "vae": "model", "loras": (), "control": ()}
    )
    data["engine"]["loras"] = []
    data["output"]["preview"]["port"] = 0
    data["control"]["port"] = 0
    data["hotkeys"]["enabled"] = False
    data["latency"]["enabled"] = False  # fixed steps, unless a test turns the controller on
    data["presets"].update({"bundled": "default", "startup": "config"})
    data["camera"]["source"] = "testpattern"
    data["output"]["virtual_camera"].update({"width": None, "height": None})
    data["output"]["fps"] = 20.0
    data["camera"]["fps"] = 20.0
    for key, value in extra.items():  # section__key=value, or section={...} merged in
        if "__" in key:
            section, name = key.split("__")
            data[section][name] = value
        else:
            data[key].update(value)
    return DaemonConfig.model_validate(data)


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_styled_frames_reach_the_virtual_camera_at_its_size_and_rate(tiny_model, memory_vcam):
    daemon = Daemon(demo_config(tiny_model))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.engine.state == "running", 60), daemon.status()
        cam = memory_vcam.instances[-1]
        start = len(cam.times)
        time.sleep(2.0)
        times = cam.times[start:]
        status = daemon.status()
    finally:
        daemon.stop()
    assert (cam.width, cam.height) == (64, 64)
    assert cam.frames[-1].shape == (64 * 64 * 3,)  # RGB, 1-D as pyvirtualcam hands it over
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 17 <= rate <= 21, rate  # paced at 20 fps
    assert status["kinds"].get("styled", 0) > 0
    assert status["latency_ms"]["p95"] is not None and status["latency_ms"]["p95"] < 5000
    assert cam.closed


def test_the_output_rate_holds_when_publishing_is_late_and_a_stall_makes_no_burst(
    tiny_model, memory_vcam
):
    """Each publish takes 20 ms of a 50 ms slot (a slow sink, or a busy machine waking the
    output thread late): the next slot goes out on time, so the rate stays the configured one;
    one 300 ms stall is not made up by a burst of frames. The times are those at which the output
    thread hands each frame over (taken before the sink's own delay)."""
    from daemon.dataplane.output_worker import OutputWorker
    from daemon.dataplane.slots import LatestSlot

    config = demo_config(tiny_model)
    period = 1.0 / config.output.fps
    worker = OutputWorker(config, LatestSlot(), (64, 64))
    worker.open_sinks()
    send, handed = worker.vcam.send, []

    def slow_send(image):
        handed.append(time.monotonic())
        time.sleep(0.3 if len(handed) == 30 else 0.02)
        send(image)

    worker.vcam.send = slow_send
    worker.start()
    try:
        assert wait_for(lambda: len(handed) > 60, 10)
        start = len(handed)
        assert wait_for(lambda: len(handed) > start + 40, 10)
        times = handed[start:]
    finally:
        worker.stop()
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 19 <= rate <= 21, rate  # 20 fps (it was 18 and less: each late slot moved the next)
    gaps = np.diff(handed)
    assert gaps[29] > 0.3  # the stall happened (the 30th publish)...
    # ...and no burst of frames followed it: unlimited catch-up sent the six missed slots back
    # to back (gaps of one publish, 0.4 periods).
    after = gaps[30:36]
    assert after.min() >= 0.6 * period, after


def test_a_broken_model_falls_back_to_passthrough_and_keeps_publishing(tmp_path, memory_vcam):
    cfg = demo_config(tmp_path / "no-model")
    daemon = Daemon(cfg)
    daemon.start()
    try:
        assert wait_for(lambda: daemon.engine.state == "failed", 30)
        cam = memory_vcam.instances[-1]
        n = len(cam.frames)
        assert wait_for(lambda: daemon.status()["kinds"].get("passthrough", 0) > 5, 10)
        time.sleep(0.5)
    finally:
        daemon.stop()
    assert len(cam.frames) > n + 5  # still publishing at rate
    # The passthrough frame is the test pattern, not a blank or brown frame.
    assert cam.frames[-1].reshape(64, 64, 3).std() > 10


def test_without_a_v4l2_device_the_preview_carries_on(tiny_model):
    # pyvirtualcam's real backend: this machine has no /dev/video*, so the sink fails clearly.
    daemon = Daemon(demo_config(tiny_model))
    daemon.start()
    try:
        assert any("modprobe v4l2loopback" in n for n in daemon.notes), daemon.notes
        assert daemon.output.preview is not None
        import cv2

        cap = cv2.VideoCapture(daemon.output.preview.stream_url)
        ok, frame = cap.read()
        cap.release()
    finally:
        daemon.stop()
    assert ok and frame.shape == (64, 64, 3)


def test_bad_config_file_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "config.toml"
    bad.write_text("[camera]\nfps = 'fast'\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "camera.fps" in err and "fast" in err and "Traceback" not in err


def test_config_show_prints_the_effective_settings(tmp_path, capsys):
    good = tmp_path / "config.toml"
    good.write_text("[camera]\nfps = 15\n")
    assert main(["config", "show", "--config", str(good), "--set", "output.fps=24"]) == 0
    shown = capsys.readouterr().out
    reread = tmp_path / "shown.toml"
    reread.write_text(shown)
    cfg = load_config(reread)
    assert cfg.camera.fps == 15 and cfg.output.fps == 24


def test_sigterm_stops_the_daemon_within_two_seconds(tiny_model, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "run",
        "--demo",
        "--set",
        "output.preview.port=0",
        "--set",
        "control.port=0",
        "--set",
        f"log.file='{tmp_path / 'daemon.log'}'",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("engine: running" in ln for ln in lines), 90), lines
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(2)
    text = "".join(lines)
    assert code == 0 and elapsed < 2.0, (elapsed, text[-2000:])
    # The first lines say what the demo substituted and why.
    assert "demo: camera -> a generated moving" in text and "demo: model -> the built-in" in text
    assert "Traceback" not in text


def test_sighup_reloads_a_changed_config_and_keeps_the_old_one_when_broken(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[camera]\nsource = "testpattern"\n[engine]\nmodel = "tiny"\n')
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(config)]
    cmd += ["--set", "output.preview.port=0", "--set", f"log.file='{tmp_path / 'd.log'}'"]
    cmd += ["--set", "control.port=0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()

    def said(text: str) -> bool:
        return any(text in ln for ln in lines)

    try:
        assert wait_for(lambda: said("engine: running"), 90), lines
        config.write_text('[camera]\nfps = "fast"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: said("reload refused"), 10), lines
        assert proc.poll() is None  # still running on the old configuration
        config.write_text('[camera]\nsource = "testpattern"\nfps = 15\n[engine]\nmodel = "tiny"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: said("configuration changed"), 10), lines
        assert wait_for(lambda: said("engine: running"), 90), lines
        restarts = sum("engine: loading" in ln for ln in lines)
        config.write_text(config.read_text() + 'prompt = "a cat"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: said("new [engine] prompt"), 10), lines
        time.sleep(1.0)
        assert sum("engine: loading" in ln for ln in lines) == restarts  # no restart for a prompt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "camera.fps" in "".join(lines)
