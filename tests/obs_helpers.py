"""A real OBS Studio for tests: headless under Xvfb, obs-websocket on a free port, a private HOME.

Usage (a fixture in the test module)::

    @pytest.fixture
    def obs(tmp_path):
        require_obs()
        with ObsStudio(tmp_path / "obs") as studio:
            yield studio

    obs.client.send("GetSceneList", raw=True)

The recipe (config files, flags, timings) is the one in shared/TESTING.md for OBS 29 with the
built-in obs-websocket 5.1, which reads its settings from ``global.ini``. OBS runs in its own
process group so stopping it (SIGTERM, then SIGKILL) also ends xvfb-run and Xvfb, and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import pytest

SKIP_REASON = "obs-studio/xvfb-run not installed"

#: OBS's "LastVersion" for 29.0.2: a value at or above the running version keeps the
#: "what's new" dialog away.
_LAST_VERSION = 486539266
_SCREENSHOT_NOT_READY = 702  # "Failed to render screenshot": no frame yet, or the source is down


def obs_installed() -> bool:
    return shutil.which("obs") is not None and shutil.which("xvfb-run") is not None


def require_obs() -> None:
    """Skip the calling test when OBS Studio or xvfb-run is missing (CI installs both)."""
    if not obs_installed():
        pytest.skip(SKIP_REASON)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _global_ini(port: int, password: str | None) -> str:
    return f"""[General]
FirstRun=true
LastVersion={_LAST_VERSION}
EnableAutoUpdates=false
ConfirmOnExit=false

[Basic]
Profile=Test
ProfileDir=Test
SceneCollection=Test
SceneCollectionFile=Test

[OBSWebSocket]
FirstLoad=false
ServerEnabled=true
ServerPort={port}
AlertsEnabled=false
AuthRequired={"true" if password else "false"}
ServerPassword={password or ""}
"""


def _profile_ini(width: int, height: int, fps: int, recordings: Path) -> str:
    # The recording folder must exist: a missing one opens a modal dialog that hangs websocket.
    return f"""[General]
Name=Test

[Video]
BaseCX={width}
BaseCY={height}
OutputCX={width}
OutputCY={height}
FPSType=0
FPSCommon={fps}

[Output]
Mode=Simple

[SimpleOutput]
FilePath={recordings}
RecFormat=mkv
"""


def _scene_collection(scenes: Sequence[str], scripts: Sequence[tuple[Path, dict]]) -> dict:
    def scene(name: str) -> dict:
        return {
            "id": "scene",
            "versioned_id": "scene",
            "name": name,
            "settings": {"items": [], "id_counter": 0, "custom_size": False},
            "enabled": True,
            "flags": 0,
            "mixers": 0,
        }

    return {
        "name": "Test",
        "current_scene": scenes[0],
        "current_program_scene": scenes[0],
        "scene_order": [{"name": name} for name in scenes],
        "sources": [scene(name) for name in scenes],
        "groups": [],
        # Cut, not Fade: scene-change events then arrive within a frame.
        "current_transition": "Cut",
        "transition_duration": 300,
        "transitions": [],
        "quick_transitions": [],
        "saved_projectors": [],
        # Scripts listed here are loaded at start (Tools -> Scripts keeps its list here too).
        "modules": {
            "scripts-tool": [
                {"path": str(path), "settings": dict(settings)} for path, settings in scripts
            ]
        },
        "preview_locked": False,
        "scaling_enabled": False,
    }


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _live_members(group: int) -> list[int]:
    """Pids of the processes in ``group`` that still run (zombies excluded).

    Zombies matter here: in a container whose init does not reap orphans, OBS and Xvfb stay
    zombies forever, and ``killpg(group, 0)`` would keep saying the group is alive.
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the ")" that ends the command name: state, ppid, pgrp, ...
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(pgrp) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


class ObsStudio:
    """One headless OBS Studio process; ``start``/``stop`` may be repeated (a restart test).

    ``client`` is an ``obsws_python.ReqClient`` connected after ``start``. The port and password
    stay the same across restarts, like a user's OBS.
    """

    def __init__(
        self,
        home: Path,
        *,
        scenes: Sequence[str] = ("Scene 1", "Scene 2"),
        password: str | None = None,
        port: int | None = None,
        size: tuple[int, int] = (320, 240),
        fps: int = 30,
        startup_timeout: float = 30.0,
        scripts: Sequence[tuple[Path, dict]] = (),
    ) -> None:
        if len(scenes) < 1:
            raise ValueError("OBS needs at least one scene")
        self.home = Path(home)
        self.scenes = tuple(scenes)
        self.password = password
        self.port = port or free_port()
        self.size, self.fps = size, fps
        self.startup_timeout = startup_timeout
        self.scripts = tuple(scripts)  # (path, settings) of each OBS script to load at start
        self.log_path = self.home / "obs.log"
        self.client = None  # obsws_python.ReqClient while running
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        config = self.home / ".config" / "obs-studio"
        profile = config / "basic" / "profiles" / "Test"
        scenes = config / "basic" / "scenes"
        recordings = self.home / "recordings"
        for folder in (profile, scenes, recordings):
            folder.mkdir(parents=True, exist_ok=True)
        (config / "global.ini").write_text(_global_ini(self.port, self.password))
        (profile / "basic.ini").write_text(_profile_ini(*self.size, self.fps, recordings))
        (scenes / "Test.json").write_text(
            json.dumps(_scene_collection(self.scenes, self.scripts), indent=2)
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Launch OBS and return once a websocket client is connected (or raise with its log)."""
        if self.running:
            return
        env = {**os.environ, "HOME": str(self.home), "QT_QPA_PLATFORM": "xcb"}
        # XDG_CONFIG_HOME would move OBS's config away from the files written above, and a
        # developer's Wayland session would pull OBS off the Xvfb display.
        for name in ("XDG_CONFIG_HOME", "WAYLAND_DISPLAY"):
            env.pop(name, None)
        command = [
            "xvfb-run", "-a", "-s", "-screen 0 1280x720x24",
            "obs", "--disable-shutdown-check", "--minimize-to-tray", "--multi",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals OBS and Xvfb only
            )
        try:
            self.client = self._connect(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _connect(self, deadline: float):  # -> obsws_python.ReqClient
        import obsws_python

        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"OBS exited during start-up:\n{self.log_tail()}")
            try:
                with _quiet("obsws_python"):  # it logs a traceback for every refused attempt
                    return self.connect(obsws_python.ReqClient, timeout=5)
            except Exception as error:  # refused while OBS starts; the server comes up later
                last_error = error
                time.sleep(0.2)
        raise TimeoutError(
            f"OBS websocket on port {self.port} not ready after {self.startup_timeout:.0f} s "
            f"(last error: {last_error!r}):\n{self.log_tail()}"
        )

    def connect(self, client_class: type, **kwargs: object):
        """A new obsws-python client (ReqClient or EventClient) on this OBS."""
        return client_class(
            host="127.0.0.1", port=self.port, password=self.password or "", **kwargs
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to OBS's process group, SIGKILL to what is left of it after ``timeout``.

        OBS 29 does not catch SIGTERM (it just dies, there is no graceful quit from outside);
        waiting matters for Xvfb, which removes its lock file and socket on SIGTERM.
        """
        if self.client is not None:
            with contextlib.suppress(Exception):  # OBS may already be gone
                self.client.disconnect()
            self.client = None
        process, self._process = self._process, None
        if process is None:
            return
        group = process.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _live_members(group) and time.monotonic() < deadline:
            process.poll()  # reap the xvfb-run shell so it stops counting
            time.sleep(0.05)
        if _live_members(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        process.wait(timeout=timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no OBS log)"
        return "\n".join(text.splitlines()[-lines:])

    def screenshot(self, source: str, width: int = 64) -> np.ndarray | None:
        """The source as an RGB array (``width`` wide), or None while it has no frame to show."""
        from obsws_python.error import OBSSDKRequestError

        request = {"sourceName": source, "imageFormat": "png", "imageWidth": width}
        try:
            data = self.client.send("GetSourceScreenshot", request, raw=True)
        except OBSSDKRequestError as error:
            if error.code == _SCREENSHOT_NOT_READY:
                return None
            raise
        encoded = data["imageData"].split(",", 1)[1]  # "data:image/png;base64,...."
        png = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8)
        return cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def __enter__(self) -> ObsStudio:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def add_mjpeg_media_source(obs: ObsStudio, name: str, url: str, fps: float) -> None:
    """An OBS Media Source reading an MJPEG-over-HTTP stream, set up as the OBS script sets it
    up (``framerate`` matters: without it the MJPEG demuxer assumes 25 fps and falls behind)."""
    from daemon.integrations.streamv2v_obs_client import media_source_settings

    settings = media_source_settings(url, fps)
    obs.client.send(
        "CreateInput",
        {
            "sceneName": obs.scenes[0],
            "inputName": name,
            "inputKind": "ffmpeg_source",
            "inputSettings": settings,
            "sceneItemEnabled": True,
        },
    )
