"""ObsControl against a real headless OBS Studio 29 (obs-websocket 5.1): scene changes and custom
events select presets, reconnects, password handling and its logging, stop() while unreachable."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import obsws_python
import pytest
from obs_helpers import ObsStudio, free_port, require_obs
from obsws_python.error import OBSSDKRequestError

from daemon.config import ObsConfig
from daemon.integrations.obs import ObsControl

SCENES = ("Scene 1", "Gaming", "Chatting", "Just Chatting")
SCENE_PRESETS = {"Scene 1": "watercolor", "Gaming": "cyberpunk"}  # the chatting scenes: none
PASSWORD = "correct-horse-7f3a"  # distinctive, so a leak into any log record is found
WRONG_PASSWORD = "wrong-battery-91c2"
PASSWORD_ENV = "STREAMV2V_TEST_OBS_PASSWORD"


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


class PresetLog:
    """An on_preset that records (name, reason, arrival time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def __call__(self, name: str, reason: str) -> None:
        self.calls.append((name, reason, time.monotonic()))

    def named(self) -> list[tuple[str, str]]:
        return [(name, reason) for name, reason, _ in self.calls]


def obs_config(port: int, **settings: object) -> ObsConfig:
    fast_retries = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "timeout_s": 2.0}
    return ObsConfig(enabled=True, port=port, **(fast_retries | settings))


def switch_scene(studio: ObsStudio, scene: str) -> float:
    """Cut to ``scene``; the time just before the request went out."""
    sent = time.monotonic()
    studio.client.send("SetCurrentProgramScene", {"sceneName": scene})
    return sent


def show_scene(studio: ObsStudio, scene: str) -> None:
    """Cut to ``scene`` and return once OBS has announced it. SetCurrentProgramScene answers
    before the cut (done at the next video frame): an ObsControl connecting in between would
    get the event, hiding whether it asks for the current scene on connect."""
    announced = threading.Event()

    def on_current_program_scene_changed(data) -> None:
        if data.scene_name == scene:
            announced.set()

    events = studio.connect(obsws_python.EventClient, timeout=5)
    try:
        events.callback.register(on_current_program_scene_changed)
        current = studio.client.send("GetCurrentProgramScene", raw=True)
        if current["currentProgramSceneName"] != scene:
            switch_scene(studio, scene)
            assert announced.wait(2.0), f"OBS did not announce scene {scene!r}"
    finally:
        events.disconnect()


def broadcast(studio: ObsStudio, data: dict) -> float:
    sent = time.monotonic()
    studio.client.send("BroadcastCustomEvent", {"eventData": data})
    return sent


def lines(records: list[logging.LogRecord], level: int, text: str = "") -> list[str]:
    found = [r.getMessage() for r in records if r.levelno == level]
    return [message for message in found if text in message]


@pytest.fixture(scope="module")
def obs(tmp_path_factory) -> Iterator[ObsStudio]:
    """One OBS without a password, for the tests that do not restart it."""
    require_obs()
    with ObsStudio(tmp_path_factory.mktemp("obs"), scenes=SCENES) as studio:
        yield studio


@pytest.fixture(scope="module")
def obs_with_password(tmp_path_factory) -> Iterator[ObsStudio]:
    require_obs()
    with ObsStudio(tmp_path_factory.mktemp("obs-pw"), scenes=SCENES, password=PASSWORD) as studio:
        yield studio


@pytest.fixture
def start_control() -> Iterator[Callable[..., tuple[ObsControl, PresetLog]]]:
    """Start ObsControls (stopped after the test); each comes with the PresetLog it reports to
    unless ``on_preset`` is given."""
    started: list[ObsControl] = []

    def start(config: ObsConfig, on_preset=None) -> tuple[ObsControl, PresetLog]:
        presets = PresetLog()
        control = ObsControl(
            config, on_preset=on_preset or presets, preset_for_scene=SCENE_PRESETS.get
        )
        control.start()
        started.append(control)
        return control, presets

    yield start
    for control in started:
        control.stop()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger at DEBUG and up, also when an earlier test ran the daemon's
    setup_logging (which stops "streamv2v" from propagating)."""
    collected: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = collected.append  # type: ignore[method-assign]
    root, ours = logging.getLogger(), logging.getLogger("streamv2v")
    saved = root.level, ours.level, ours.propagate
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ours.setLevel(logging.DEBUG)
    ours.propagate = True
    yield collected
    root.removeHandler(handler)
    root.setLevel(saved[0])
    ours.setLevel(saved[1])
    ours.propagate = saved[2]


@pytest.fixture
def attempts(monkeypatch) -> list[float]:
    """The times of ObsControl's connection attempts (it resolves the password at each)."""
    times: list[float] = []
    resolve = ObsConfig.resolve_password

    def counted(self: ObsConfig) -> str:
        times.append(time.monotonic())
        return resolve(self)

    monkeypatch.setattr(ObsConfig, "resolve_password", counted)
    return times


def connected_on(obs: ObsStudio, start_control, scene: str = "Chatting", **kwargs):
    """An ObsControl connected to ``obs`` showing ``scene`` (unmapped by default: no preset)."""
    show_scene(obs, scene)
    control, presets = start_control(obs_config(obs.port), **kwargs)
    assert wait_for(lambda: control.state == "connected"), control.state
    assert wait_for(lambda: control.scene == scene), control.scene
    return control, presets


def test_scene_switch_selects_the_mapped_preset_within_500ms(obs, start_control):
    control, presets = connected_on(obs, start_control, "Chatting")
    switch_scene(obs, "Just Chatting")  # unmapped too: followed, but no preset
    assert wait_for(lambda: control.scene == "Just Chatting")
    sent = switch_scene(obs, "Gaming")
    assert wait_for(lambda: presets.calls, timeout=2.0)
    assert presets.named() == [("cyberpunk", "OBS scene 'Gaming'")]
    assert presets.calls[0][2] - sent < 0.5
    assert control.scene == "Gaming"


def test_custom_events_select_presets_and_others_are_ignored(obs, start_control, records):
    _, presets = connected_on(obs, start_control)
    broadcast(obs, {"otherTool": {"preset": "anime"}})  # someone else's: silence
    broadcast(obs, {"streamv2v": {"preset": 7}})  # ours but malformed: one warning
    sent = broadcast(obs, {"streamv2v": {"preset": "anime"}})
    broadcast(obs, {"streamv2v": {"preset": "next"}})
    assert wait_for(lambda: len(presets.calls) >= 2, timeout=2.0)
    assert presets.named() == [("anime", "OBS custom event"), ("next", "OBS custom event")]
    assert presets.calls[0][2] - sent < 0.5
    assert len(lines(records, logging.WARNING)) == 1
    assert lines(records, logging.WARNING, "custom event ignored")


def test_connecting_applies_the_current_program_scene(obs, start_control):
    show_scene(obs, "Gaming")
    control, presets = start_control(obs_config(obs.port))
    assert wait_for(lambda: presets.calls)
    assert presets.named() == [("cyberpunk", "OBS scene 'Gaming'")]
    assert control.scene == "Gaming"
    assert control.state == "connected"


def test_a_failing_on_preset_is_logged_and_events_keep_coming(obs, start_control, records):
    selected: list[str] = []

    def on_preset(name: str, reason: str) -> None:
        selected.append(name)
        if len(selected) == 1:
            raise RuntimeError("model not loaded")

    control, _ = connected_on(obs, start_control, on_preset=on_preset)
    switch_scene(obs, "Gaming")
    assert wait_for(lambda: selected == ["cyberpunk"])
    switch_scene(obs, "Scene 1")
    assert wait_for(lambda: selected == ["cyberpunk", "watercolor"])
    assert control.state == "connected"
    assert len(lines(records, logging.ERROR, "model not loaded")) == 1


def test_request_answers_when_connected_and_is_none_otherwise(obs, start_control):
    idle = ObsControl(obs_config(obs.port), on_preset=PresetLog(), preset_for_scene=dict().get)
    assert idle.request("GetVersion") is None
    control, _ = connected_on(obs, start_control)
    assert control.request("GetVersion")["obsWebSocketVersion"].startswith("5.")
    with pytest.raises(OBSSDKRequestError):
        control.request("SetCurrentProgramScene", {"sceneName": "No such scene"})
    assert control.request("GetCurrentProgramScene")["currentProgramSceneName"] == "Chatting"
    began = time.monotonic()
    control.stop()
    assert time.monotonic() - began < 1.0
    assert control.state == "stopped"
    assert control.request("GetVersion") is None


def test_reconnects_after_obs_restarts(tmp_path, start_control, records):
    require_obs()
    with ObsStudio(tmp_path / "obs", scenes=SCENES) as studio:
        control, presets = start_control(obs_config(studio.port))
        assert wait_for(lambda: control.state == "connected")
        studio.stop()
        assert wait_for(lambda: control.state == "lost", timeout=3.0)
        assert control.request("GetVersion") is None
        studio.start()
        assert wait_for(lambda: control.state == "connected", timeout=10.0), control.state
        # Both connects applied the program scene OBS started with.
        assert wait_for(lambda: len(presets.calls) == 2)
        assert presets.named() == [("watercolor", "OBS scene 'Scene 1'")] * 2
        sent = switch_scene(studio, "Gaming")
        assert wait_for(lambda: len(presets.calls) == 3, timeout=2.0)
        assert presets.named()[2] == ("cyberpunk", "OBS scene 'Gaming'")
        assert presets.calls[2][2] - sent < 0.5
        assert len(lines(records, logging.WARNING, "Lost the connection")) == 1
        assert lines(records, logging.INFO, "not reachable") == []
        assert len(lines(records, logging.INFO, "Connected to OBS")) == 2


def test_wrong_password_is_said_once_and_a_fixed_password_file_connects(
    obs_with_password, tmp_path, start_control, records, attempts
):
    password_file = tmp_path / "obs-password"
    password_file.write_text(WRONG_PASSWORD + "\n")
    config = obs_config(obs_with_password.port, password_file=password_file)
    control, _ = start_control(config)
    assert wait_for(lambda: control.state == "auth_failed")
    assert wait_for(lambda: len(attempts) >= 6, timeout=3.0)  # several quiet retries
    errors = lines(records, logging.ERROR)
    assert len(errors) == 1, errors
    assert "rejected the websocket password" in errors[0]
    assert "obs.password_file" in errors[0] and "WebSocket Server Settings" in errors[0]
    assert control.state == "auth_failed"

    password_file.write_text(PASSWORD + "\n")
    assert wait_for(lambda: control.state == "connected"), control.state
    assert len(lines(records, logging.INFO, "Connected to OBS")) == 1
    assert len(lines(records, logging.ERROR)) == 1
    for record in records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert PASSWORD not in text and WRONG_PASSWORD not in text, record.name


def test_password_from_an_environment_variable(
    obs_with_password, start_control, records, monkeypatch
):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    show_scene(obs_with_password, "Chatting")  # unmapped: no preset on connect
    control, presets = start_control(obs_config(obs_with_password.port, password_env=PASSWORD_ENV))
    assert wait_for(lambda: control.state == "auth_failed")
    errors = lines(records, logging.ERROR)
    assert len(errors) == 1 and PASSWORD_ENV in errors[0], errors
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert wait_for(lambda: control.state == "connected"), control.state
    assert control.scene == "Chatting"
    sent = switch_scene(obs_with_password, "Gaming")
    assert wait_for(lambda: presets.calls, timeout=2.0)
    assert presets.named() == [("cyberpunk", "OBS scene 'Gaming'")]
    assert presets.calls[0][2] - sent < 0.5


def test_obs_started_later_is_found_after_one_log_line(tmp_path, start_control, records, attempts):
    require_obs()
    studio = ObsStudio(tmp_path / "obs", scenes=SCENES)  # configured, not running yet
    try:
        control, presets = start_control(obs_config(studio.port))
        assert wait_for(lambda: len(attempts) >= 5, timeout=3.0)
        assert control.state == "connecting"
        studio.start()
        assert wait_for(lambda: control.state == "connected", timeout=5.0), control.state
        assert wait_for(lambda: presets.named() == [("watercolor", "OBS scene 'Scene 1'")])
    finally:
        studio.stop()
    assert len(lines(records, logging.INFO, "not reachable")) == 1
    assert lines(records, logging.ERROR) == []


def test_stop_returns_promptly_while_obs_is_unreachable(start_control):
    control, _ = start_control(obs_config(free_port()))
    assert wait_for(lambda: control.state == "connecting")
    began = time.monotonic()
    control.stop()
    assert time.monotonic() - began < 2.0
    assert control.state == "stopped"


def test_stop_returns_within_its_timeout_during_a_hanging_connect(start_control, attempts):
    with socket.socket() as silent:  # accepts TCP, never answers the websocket handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = obs_config(silent.getsockname()[1], timeout_s=10.0)
        control, _ = start_control(config)
        assert wait_for(lambda: attempts)
        time.sleep(0.1)  # into the handshake wait
        began = time.monotonic()
        control.stop(timeout=0.5)
        assert time.monotonic() - began < 1.0
        assert control.state == "stopped"
