"""The daemon end to end with real parts: an HTTP MJPEG camera served by the test that goes away
and comes back, the virtual camera (pyvirtualcam's Camera, in-memory backend), and a real
headless OBS Studio reading the daemon's preview through a Media Source.

The engine here has no model (a missing folder), so the daemon publishes the passthrough camera
frame: its colour is known, which makes every output checkable.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import MemoryCamera
from obs_helpers import ObsStudio, add_mjpeg_media_source, require_obs
from test_camera import BLUE, RED, MjpegCamera, close_to
from test_daemon import demo_config, wait_for

from daemon.app import Daemon

FPS = 20.0


def camera_daemon(tmp_path, port: int) -> Daemon:
    cfg = demo_config(tmp_path / "no-model")
    data = cfg.model_dump()
    data["camera"].update({"source": f"http://127.0.0.1:{port}/stream.mjpg", "fps": FPS})
    data["output"]["fps"] = FPS
    return Daemon(type(cfg).model_validate(data))


def last_image(cam: MemoryCamera) -> np.ndarray:
    return cam.frames[-1].reshape(cam.height, cam.width, 3)


def rate_over(cam: MemoryCamera, seconds: float) -> float:
    start = len(cam.times)
    time.sleep(seconds)
    times = cam.times[start:]
    return (len(times) - 1) / (times[-1] - times[0])


def test_camera_loss_shows_unavailable_at_rate_and_recovers_without_restart(tmp_path, memory_vcam):
    source = MjpegCamera(RED, fps=FPS)
    daemon = camera_daemon(tmp_path, source.port)
    daemon.start()
    try:
        cam = memory_vcam.instances[-1]
        assert wait_for(lambda: cam.frames and close_to(last_image(cam), RED), 15)

        source.close()  # the camera is gone
        assert wait_for(lambda: daemon.camera.state == "lost", 10)
        assert wait_for(
            lambda: last_image(cam).mean() < 90 and not close_to(last_image(cam), RED), 5
        )
        assert 17 <= rate_over(cam, 2.5) <= 21  # the output keeps its size and rate
        assert last_image(cam).shape == (64, 64, 3)

        source = MjpegCamera(BLUE, port=source.port, fps=FPS)  # back, same address
        t0 = time.monotonic()
        assert wait_for(lambda: close_to(last_image(cam), BLUE), 3.0), "not back within 3 s"
        print(f"camera back on the output after {time.monotonic() - t0:.2f} s")
        assert daemon.camera.state == "live"
    finally:
        source.close()
        daemon.stop()


@pytest.mark.slow
def test_obs_media_source_shows_the_daemons_frames(tmp_path):
    require_obs()
    source = MjpegCamera(RED, fps=FPS)
    daemon = camera_daemon(tmp_path, source.port)
    daemon.start()
    try:
        with ObsStudio(tmp_path / "obs", fps=30) as obs:
            url = daemon.output.preview_url + "stream.mjpg"
            add_mjpeg_media_source(obs, "streamv2v", url, FPS)

            def shows_red() -> bool:
                shot = obs.screenshot("streamv2v", width=64)
                return shot is not None and close_to(shot, RED)

            assert wait_for(shows_red, 15), obs.log_tail()
    finally:
        daemon.stop()
        source.close()
