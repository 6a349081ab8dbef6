"""The OBS script in a real headless OBS Studio with a running daemon (tiny model): its hotkeys
switch presets through obs-websocket's TriggerHotkeyByName, a saved binding is restored, the
add-source hotkey creates a Media Source that shows the daemon's frames, and with the daemon
stopped (or not started yet) the hotkeys are harmless and OBS's log has no Python error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from obs_helpers import ObsStudio, require_obs
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.control.api import default_control_file
from daemon.integrations.obs_script import install, obs_config_dir

SCRIPT = Path(__file__).resolve().parents[1] / "daemon" / "integrations" / "streamv2v_obs.py"
PANEL_PROBE = Path(__file__).resolve().with_name("obs_panel_probe.py")
FIXED = ["streamv2v.next", "streamv2v.prev", "streamv2v.passthrough", "streamv2v.add_source"]
SOURCE = "streamv2v output"


def hotkeys(studio: ObsStudio) -> list[str]:
    return studio.client.send("GetHotkeyList", raw=True)["hotkeys"]


def press(studio: ObsStudio, name: str) -> float:
    sent = time.monotonic()
    studio.client.send("TriggerHotkeyByName", {"hotkeyName": name})
    return sent


def switched_within(daemon: Daemon, name: str, sent: float) -> float:
    assert wait_for(lambda: daemon.presets.active == name, 2.0, step=0.005), daemon.status()
    return time.monotonic() - sent


def script_log_problems(studio: ObsStudio) -> list[str]:
    """Lines of OBS's log (its stdout) that show a Python error from any script."""
    text = studio.log_path.read_text(errors="replace")
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or ("[Python" in line and "Error" in line)
    ]


@pytest.fixture
def daemon(tiny_model, memory_vcam):
    started = Daemon(demo_config(tiny_model))
    started.start()
    # The panel shows the output rate, which the daemon knows about a second after it starts.
    assert wait_for(lambda: started.status()["fps"]["output"] is not None, 10)
    yield started
    started.stop()


def test_hotkeys_switch_presets_add_the_source_and_stay_harmless_once_the_daemon_stops(
    daemon, tmp_path
):
    require_obs()
    names = [row["name"] for row in daemon.preset_listing()["presets"]]
    after_anime = names[(names.index("anime") + 1) % len(names)]
    # A binding saved by an earlier session: F13 on "next preset".
    saved = {
        "control_file": str(default_control_file()),
        "streamv2v.next": [{"key": "OBS_KEY_F13"}],
    }
    scripts = [(SCRIPT, saved), (PANEL_PROBE, {})]
    with ObsStudio(tmp_path / "obs", scripts=scripts) as studio:
        wanted = FIXED + [f"streamv2v.preset.{name}" for name in names]
        assert wait_for(lambda: set(wanted) <= set(hotkeys(studio)), 10), hotkeys(studio)

        # The panel, built with OBS's own property functions: every item, the daemon's state.
        press(studio, "streamv2v_test.panel")
        assert wait_for(lambda: "panel: " in studio.log_path.read_text(), 5), studio.log_tail()
        [panel] = [line for line in studio.log_path.read_text().splitlines() if "panel: " in line]
        items = "status,preset,apply,refresh,add_source,control_file"
        assert f"panel: {items}; {len(names)} presets; connected to the daemon at " in panel
        assert "preset: config" in panel and " fps, glass-to-glass p95 " in panel

        assert switched_within(daemon, "anime", press(studio, "streamv2v.preset.anime")) < 0.5
        assert switched_within(daemon, after_anime, press(studio, "streamv2v.next")) < 0.5
        assert switched_within(daemon, "anime", press(studio, "streamv2v.prev")) < 0.5
        assert switched_within(daemon, "passthrough", press(studio, "streamv2v.passthrough")) < 0.5
        # Pressed again, passthrough goes back to the style it interrupted.
        assert switched_within(daemon, "anime", press(studio, "streamv2v.passthrough")) < 0.5

        sent = time.monotonic()
        studio.client.send("TriggerHotkeyByKeySequence", {"keyId": "OBS_KEY_F13"})
        assert switched_within(daemon, after_anime, sent) < 0.5  # the saved binding is live

        press(studio, "streamv2v.add_source")
        assert wait_for(lambda: SOURCE in inputs(studio), 5), studio.log_tail()
        settings = studio.client.send("GetInputSettings", {"inputName": SOURCE}, raw=True)
        assert settings["inputKind"] == "ffmpeg_source"
        assert settings["inputSettings"]["input"] == daemon.output.preview.stream_url
        assert settings["inputSettings"]["is_local_file"] is False
        assert settings["inputSettings"]["input_format"] == "mjpeg"
        assert settings["inputSettings"]["ffmpeg_options"] == "framerate=20"  # the output fps
        items = studio.client.send("GetSceneItemList", {"sceneName": "Scene 1"}, raw=True)
        assert [item["sourceName"] for item in items["sceneItems"]] == [SOURCE]
        assert wait_for(lambda: studio.screenshot(SOURCE) is not None, 10)  # frames arrive

        # A second press fixes the source in place: still one source, one scene item.
        press(studio, "streamv2v.add_source")
        time.sleep(0.3)
        items = studio.client.send("GetSceneItemList", {"sceneName": "Scene 1"}, raw=True)
        assert [item["sourceName"] for item in items["sceneItems"]] == [SOURCE]

        daemon.stop()
        for name in [*FIXED[:3], "streamv2v.preset.anime"]:
            press(studio, name)
        time.sleep(1.5)  # the worker's answers reach OBS's log within a poll
        assert studio.running
        assert studio.client.send("GetVersion", raw=True)["obsVersion"]
        log = studio.log_path.read_text(errors="replace")
        assert "daemon not running: start it with `streamv2v run`" in log
        assert script_log_problems(studio) == []


def inputs(studio: ObsStudio) -> list[str]:
    return [i["inputName"] for i in studio.client.send("GetInputList", raw=True)["inputs"]]


def test_an_installed_copy_loaded_before_the_daemon_starts_waits_then_follows_its_presets(
    tiny_model, memory_vcam, tmp_path
):
    require_obs()
    home = tmp_path / "obs"
    installed = install(obs_config_dir({}, home=home) / "scripts" / "streamv2v")
    settings = {"control_file": str(default_control_file())}
    with ObsStudio(home, scripts=[(installed, settings)]) as studio:
        assert wait_for(lambda: set(FIXED) <= set(hotkeys(studio)), 10), hotkeys(studio)
        press(studio, "streamv2v.next")
        press(studio, "streamv2v.add_source")
        assert not any(name.startswith("streamv2v.preset.") for name in hotkeys(studio))
        assert SOURCE not in inputs(studio)

        daemon = Daemon(demo_config(tiny_model))
        daemon.start()
        try:
            assert wait_for(lambda: "streamv2v.preset.cyberpunk" in hotkeys(studio), 5)
            sent = press(studio, "streamv2v.preset.cyberpunk")
            assert switched_within(daemon, "cyberpunk", sent) < 0.5
        finally:
            daemon.stop()
        assert studio.running
        assert script_log_problems(studio) == []
