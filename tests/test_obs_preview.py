"""End to end with a real OBS Studio: a Media Source shows the preview server's MJPEG stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from obs_helpers import ObsStudio, add_mjpeg_media_source, require_obs

from daemon.control.preview import PreviewServer

pytestmark = pytest.mark.slow

SOURCE = "streamv2v preview"
FPS = 30


@pytest.fixture
def obs(tmp_path) -> Iterator[ObsStudio]:
    require_obs()
    with ObsStudio(tmp_path / "obs", fps=FPS) as studio:
        yield studio


class SolidPublisher:
    """Publishes a solid-colour frame at FPS from a thread, like the daemon's output thread."""

    def __init__(self, server: PreviewServer, colour: tuple[int, int, int]) -> None:
        self.server, self.colour = server, colour
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        frame = np.empty((240, 320, 3), np.uint8)
        next_t = time.monotonic()
        while not self._stop.is_set():
            frame[:] = self.colour
            self.server.publish(frame)
            next_t += 1 / FPS
            time.sleep(max(0.0, next_t - time.monotonic()))

    def __enter__(self) -> SolidPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def wait_for_colour(obs: ObsStudio, colour: tuple[int, int, int], timeout: float) -> float:
    """Seconds until OBS's screenshot of the source shows ``colour`` (within JPEG tolerance)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        shot = obs.screenshot(SOURCE, width=64)
        if shot is not None:
            last = shot.reshape(-1, 3).mean(axis=0)
            if np.abs(last - colour).max() <= 4:
                return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(
        f"OBS never showed {colour} within {timeout} s (last mean colour {last}):\n{obs.log_tail()}"
    )


def test_obs_media_source_shows_the_preview_stream(obs: ObsStudio) -> None:
    with PreviewServer(port=0) as server, SolidPublisher(server, (200, 40, 90)) as publisher:
        add_mjpeg_media_source(obs, SOURCE, server.stream_url, FPS)
        wait_for_colour(obs, (200, 40, 90), timeout=15)
        assert server.clients >= 1

        publisher.colour = (30, 180, 60)
        follow_s = wait_for_colour(obs, (30, 180, 60), timeout=5)
        print(f"OBS followed a colour change in {follow_s:.2f} s")
