"""The OBS script without OBS: its pure parts (finding control.json as the CLI does, the control
client against the real control server, hotkey names, the passthrough toggle, the Media Source
settings, the worker thread) and its OBS glue driven through a stub ``obspython`` module (the
one fake: OBS's embedded module exists only inside OBS; tests/test_obs_script_live.py runs the
script in a real OBS)."""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from test_control import PresetsOnly
from test_daemon import wait_for

from daemon.cli import main
from daemon.config import load_config
from daemon.control.api import ControlServer, default_control_file
from daemon.integrations import obs_script
from daemon.integrations import streamv2v_obs_client as core
from daemon.integrations.streamv2v_obs_client import (
    NOT_RUNNING,
    ControlClient,
    DaemonState,
    DaemonUnavailable,
    RequestRefused,
    Worker,
)


@pytest.fixture
def server(private_user_dirs):
    srv = ControlServer(PresetsOnly(), "127.0.0.1", 0, None)
    srv.start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- finding control.json
def test_the_default_control_file_is_where_the_daemon_writes_it(monkeypatch, tmp_path):
    # The conftest points XDG_CONFIG_HOME at a private folder; the daemon uses platformdirs.
    assert core.default_control_file() == default_control_file()
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored by both
    monkeypatch.setenv("HOME", str(tmp_path))
    assert core.default_control_file() == default_control_file()
    assert core.default_control_file() == tmp_path / ".config" / "streamv2v" / "control.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert core.default_control_file() == default_control_file()


def test_the_default_control_file_on_macos_and_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    mac = core.default_control_file({}, "darwin")
    assert mac == tmp_path / "Library" / "Application Support" / "streamv2v" / "control.json"
    windows = core.default_control_file({"LOCALAPPDATA": r"C:\Users\me\AppData\Local"}, "win32")
    assert windows == Path(r"C:\Users\me\AppData\Local") / "streamv2v" / "control.json"


def test_the_config_token_file_is_honoured_as_the_cli_does(private_user_dirs, tmp_path):
    config = private_user_dirs / "streamv2v" / "config.toml"
    config.parent.mkdir(parents=True)
    assert core.find_control_file() == default_control_file()  # no config file

    config.write_text('[control]\ntoken_file = "~/elsewhere/control.json"\n')
    assert core.find_control_file() == load_config(None).control.token_file
    assert core.find_control_file() == Path.home() / "elsewhere" / "control.json"

    assert core.find_control_file(f"  {tmp_path}/mine.json ") == tmp_path / "mine.json"
    config.write_text("[control\n")  # broken: the daemon will say why; the default stands
    assert core.find_control_file() == default_control_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, f"{NOT_RUNNING} (no "),
        ("{not json", "unreadable control file"),
        ('{"url": "http://127.0.0.1:1"}', "unreadable control file"),
        ('{"url": "http://example.com:80", "token": "t"}', "is not on this machine"),
        ('{"url": "http://127.evil.com:80", "token": "t"}', "is not on this machine"),
        ('{"url": "https://127.0.0.1:80", "token": "t"}', "is not on this machine"),
        ('{"url": "http://127.0.0.1:80", "token": ""}', "no token"),
    ],
)
def test_a_missing_or_bad_control_file_is_explained(tmp_path, content, message):
    path = tmp_path / "control.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DaemonUnavailable, match="^.*" + message.replace("(", r"\(")) as err:
        core.read_control_file(path)
    assert str(path) in str(err.value)


def test_loopback_urls_of_every_spelling_are_accepted(tmp_path):
    path = tmp_path / "control.json"
    for url in ("http://127.0.0.1:8766", "http://[::1]:8766/", "http://localhost:8766"):
        path.write_text(json.dumps({"url": url, "token": "t"}))
        assert core.read_control_file(path) == (url.rstrip("/"), "t")


# --------------------------------------------------------------------------- the control client
def test_the_client_calls_the_real_control_api(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # never used: the token stays here
    client = ControlClient(server.control_file)
    assert client.call("GET", "/status") == {"preset": "config"}
    assert client.call("POST", "/preset", {"name": "anime"}) == {"active": "anime"}
    assert server.api.manager.active == "anime"
    with pytest.raises(RequestRefused, match="no preset named 'nope'; there are: config, anime"):
        client.call("POST", "/preset", {"name": "nope"})


def test_the_client_explains_a_wrong_token_and_a_stopped_daemon(server, tmp_path):
    stale = tmp_path / "control.json"
    stale.write_text(json.dumps({"url": server.url, "token": "an old daemon's"}))
    with pytest.raises(DaemonUnavailable, match="refused the token"):
        ControlClient(stale).call("POST", "/preset", {"name": "anime"})
    stale.write_text(json.dumps({"url": "http://127.0.0.1:9", "token": "t"}))  # nobody there
    with pytest.raises(DaemonUnavailable, match=f"^{NOT_RUNNING}"):
        ControlClient(stale).call("GET", "/status")


def test_a_daemon_that_does_not_answer_costs_half_a_second(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        path = tmp_path / "control.json"
        path.write_text(
            json.dumps({"url": f"http://127.0.0.1:{silent.getsockname()[1]}", "token": "t"})
        )
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=NOT_RUNNING):
            ControlClient(path).call("GET", "/status")
        assert time.monotonic() - started < core.HTTP_TIMEOUT_S + 0.3


# --------------------------------------------------------------------------- pure decisions
def test_hotkeys_read_well_and_each_preset_has_one():
    plan = core.hotkey_plan(["anime", "passthrough", "anime", "oil-painting"])
    assert [(h.name, h.description) for h in plan] == [
        ("streamv2v.next", "streamv2v: next preset"),
        ("streamv2v.prev", "streamv2v: previous preset"),
        ("streamv2v.passthrough", "streamv2v: passthrough on/off"),
        ("streamv2v.add_source", "streamv2v: add/fix the output source"),
        ("streamv2v.preset.anime", "streamv2v: preset anime"),
        ("streamv2v.preset.passthrough", "streamv2v: preset passthrough"),
        ("streamv2v.preset.oil-painting", "streamv2v: preset oil-painting"),
    ]
    # The preset named passthrough is selected as a preset, the toggle is its own action.
    assert (plan[5].action, plan[5].target) == ("preset", "passthrough")
    assert (plan[2].action, plan[0].target, plan[1].target) == ("passthrough", "next", "prev")


def test_presets_remembered_for_the_next_start():
    assert core.presets_to_remember(["a", "gone", "kept"], ["a", "b"], {"kept"}) == ["a", "kept"]
    assert core.presets_to_remember(["a", "gone"], None, set()) == ["a", "gone"]  # daemon down


def test_passthrough_toggles_back_to_the_style_it_interrupted():
    presets = ({"name": "config"}, {"name": "anime"}, {"name": "passthrough", "passthrough": True})
    assert core.passthrough_target(presets, "anime", None) == "passthrough"
    assert core.passthrough_target(presets, "passthrough", "anime") == "anime"
    assert core.passthrough_target(presets, "passthrough", "gone") == "config"
    with pytest.raises(RequestRefused, match="no passthrough preset"):
        core.passthrough_target(presets[:2], "anime", None)
    with pytest.raises(RequestRefused, match="no styled preset"):
        core.passthrough_target(presets[2:], "passthrough", None)


def test_the_media_source_reads_the_preview_at_the_output_rate():
    status = {"preview_url": "http://127.0.0.1:8765/", "output_fps": 24.0, "fps": {"output": 23.7}}
    url, fps = core.preview_stream(status)
    assert (url, fps) == ("http://127.0.0.1:8765/stream.mjpg", 24.0)
    assert (
        core.preview_stream({"preview_url": "http://127.0.0.1:8765/", "fps": {"output": 29.6}})[1]
        == 30
    )
    settings = core.media_source_settings(url, fps)
    assert settings["input"] == url and settings["is_local_file"] is False
    assert (settings["input_format"], settings["ffmpeg_options"]) == ("mjpeg", "framerate=24")
    assert settings["buffering_mb"] == 0 and settings["close_when_inactive"] is False
    with pytest.raises(RequestRefused, match=r"output\.preview\.enabled = true"):
        core.preview_stream({"preview_url": None})


def test_the_panel_summary():
    status = {
        "preset": "anime",
        "switching": True,
        "fps": {"output": 19.96},
        "latency_ms": {"p95": 84.4},
        "engine": "running",
        "camera": "live",
        "control_url": "http://127.0.0.1:8766",
    }
    text = core.summary_text(DaemonState(True, "", status))
    assert "preset: anime  (switching)" in text and "20.0 fps" in text and "p95 84 ms" in text
    assert "engine: running, camera: live" in text
    no_figures = core.summary_text(
        DaemonState(True, "", {"preset": "a", "latency_ms": {"p95": None}})
    )
    assert "output: -, glass-to-glass p95 -" in no_figures
    assert core.summary_text(DaemonState(False, f"{NOT_RUNNING} (no x)")) == f"{NOT_RUNNING} (no x)"


# --------------------------------------------------------------------------- the worker
def test_the_worker_switches_presets_and_keeps_the_state(server):
    worker = Worker(ControlClient(server.control_file), poll_s=0.05)
    worker.start()
    try:
        assert worker.submit("preset", "anime").wait(2)
        assert server.api.manager.active == "anime" and worker.state.active == "anime"
        assert "passthrough" in worker.state.preset_names
        assert worker.submit("passthrough").wait(2)
        assert server.api.manager.active == "passthrough"
        assert worker.submit("passthrough").wait(2)
        assert server.api.manager.active == "anime"  # back to the interrupted style
        assert worker.submit("preset", "nope").wait(2)
    finally:
        worker.stop()
    assert not worker._thread.is_alive()
    lines = drain(worker)
    assert ("info", "connected to the daemon") in lines
    assert ("info", "preset: anime") in lines and ("info", "preset: passthrough") in lines
    assert any(
        level == "warning" and text.startswith("nope: no preset named 'nope'")
        for level, text in lines
    )


def test_the_worker_says_once_that_the_daemon_is_gone(server):
    worker = Worker(ControlClient(server.control_file), poll_s=0.02)
    worker.start()
    try:
        assert wait_for(lambda: worker.state.connected, 2)
        server.stop()  # it removes its control file
        assert wait_for(lambda: "(no " in worker.state.problem, 2)
        lines = drain(worker)
        time.sleep(0.2)  # ~10 more polls
        quiet = drain(worker)
        assert worker.submit("preset", "next").wait(2)
    finally:
        worker.stop()
    assert lines[0] == ("info", "connected to the daemon")
    assert all(level == "info" and text.startswith(NOT_RUNNING) for level, text in lines[1:])
    assert quiet == []  # said when it changed, not at every poll
    assert drain(worker) == [("info", f"next: {worker.state.problem}")]  # a press: one line
    assert worker.state.problem.startswith(NOT_RUNNING)


def drain(worker: Worker) -> list[tuple[str, str]]:
    lines = []
    while not worker.messages.empty():
        lines.append(worker.messages.get())
    return lines


# --------------------------------------------------------------------------- the OBS glue
class FakeObs(types.ModuleType):
    """The part of OBS's ``obspython`` the script uses, recording what the script does."""

    LOG_WARNING, LOG_INFO = 200, 300
    OBS_TEXT_INFO, OBS_TEXT_INFO_NORMAL, OBS_TEXT_INFO_WARNING = 3, 0, 1
    OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING, OBS_PATH_FILE = 2, 3, 0

    def __init__(self) -> None:
        super().__init__("obspython")
        self.log: list[tuple[int, str]] = []
        self.timers: list[Any] = []
        self.hotkeys: dict[str, tuple[int, str, Any]] = {}  # name -> (id, description, callback)
        self.bindings: dict[int, list[dict]] = {}
        self.sources: dict[str, dict] = {}  # name -> {"kind", "settings"}
        self.scene_items: list[str] = []
        self.props: list[tuple] = []

    # logging, timers, hotkeys
    def script_log(self, level: int, text: str) -> None:
        self.log.append((level, text))

    def timer_add(self, callback: Any, ms: int) -> None:
        self.timers.append(callback)

    def timer_remove(self, callback: Any) -> None:
        self.timers.remove(callback)

    def obs_hotkey_register_frontend(self, name: str, description: str, callback: Any) -> int:
        assert isinstance(callback, types.FunctionType)  # OBS refuses anything else
        self.hotkeys[name] = (len(self.hotkeys) + 1, description, callback)
        self.bindings[len(self.hotkeys)] = []
        return len(self.hotkeys)

    def obs_hotkey_load(self, hotkey_id: int, array: list[dict]) -> None:
        self.bindings[hotkey_id] = list(array)

    def obs_hotkey_save(self, hotkey_id: int) -> list[dict]:
        return list(self.bindings[hotkey_id])

    # obs_data as dicts, obs_data_array as lists
    def obs_data_get_string(self, data: dict, key: str) -> str:
        return data.get(key, "")

    def obs_data_set_string(self, data: dict, key: str, value: str) -> None:
        data[key] = value

    def obs_data_set_default_string(self, data: dict, key: str, value: str) -> None:
        data.setdefault(key, value)

    def obs_data_get_array(self, data: dict, key: str) -> list | None:
        return data.get(key)

    def obs_data_set_array(self, data: dict, key: str, array: list) -> None:
        data[key] = list(array)

    def obs_data_array_count(self, array: list) -> int:
        return len(array)

    def obs_data_create_from_json(self, text: str) -> dict:
        return json.loads(text)

    def obs_data_array_release(self, array: Any) -> None: ...
    def obs_data_release(self, data: Any) -> None: ...
    def obs_source_release(self, source: Any) -> None: ...

    # one scene, sources by name
    def obs_frontend_preview_program_mode_active(self) -> bool:
        return False

    def obs_frontend_get_current_scene(self) -> str:
        return "Scene 1"

    def obs_scene_from_source(self, source: str) -> str:
        return source

    def obs_source_get_name(self, source: str) -> str:
        return source

    def obs_get_source_by_name(self, name: str) -> str | None:
        return name if name in self.sources else None

    def obs_source_get_unversioned_id(self, name: str) -> str:
        return self.sources[name]["kind"]

    def obs_source_create(self, kind: str, name: str, settings: dict, hotkeys: Any) -> str:
        self.sources[name] = {"kind": kind, "settings": dict(settings)}
        return name

    def obs_source_update(self, name: str, settings: dict) -> None:
        self.sources[name]["settings"].update(settings)

    def obs_scene_find_source_recursive(self, scene: str, name: str) -> str | None:
        return name if name in self.scene_items else None

    def obs_scene_add(self, scene: str, name: str) -> None:
        self.scene_items.append(name)

    # the properties panel, as a list of what was added
    def obs_properties_create(self) -> list:
        return self.props

    def obs_properties_add_text(self, props: list, name: str, text: str, kind: int) -> tuple:
        props.append(("text", name, text, kind))
        return props[-1]

    def obs_property_text_set_info_type(self, prop: tuple, kind: int) -> None:
        self.props.append(("info_type", prop[1], kind))

    def obs_properties_add_list(self, props: list, name: str, text: str, *kinds: int) -> list:
        props.append(("list", name, []))
        return props[-1][2]

    def obs_property_list_add_string(self, choices: list, label: str, value: str) -> None:
        choices.append((label, value))

    def obs_properties_add_button(self, props: list, name: str, text: str, callback: Any) -> None:
        assert isinstance(callback, types.FunctionType)
        props.append(("button", name, callback))

    def obs_properties_add_path(self, props: list, name: str, *args: Any) -> None:
        props.append(("path", name))


@pytest.fixture
def in_obs(monkeypatch):
    """The script module as OBS loads it (fresh module state), with the stub obspython."""
    fake = FakeObs()
    monkeypatch.setitem(sys.modules, "obspython", fake)
    monkeypatch.delitem(sys.modules, "daemon.integrations.streamv2v_obs", raising=False)
    script = importlib.import_module("daemon.integrations.streamv2v_obs")
    yield script, fake
    script.script_unload()


def loaded(script: Any, fake: FakeObs, settings: dict) -> dict:
    script.script_defaults(settings)
    script.script_load(settings)
    return settings


def tick_until(fake: FakeObs, predicate, timeout: float = 3.0) -> bool:
    def ticked() -> bool:
        for timer in fake.timers:
            timer()
        return predicate()

    return wait_for(ticked, timeout)


def test_hotkeys_follow_the_daemon_and_their_bindings_survive_a_restart(in_obs, server):
    script, fake = in_obs
    saved = {  # from an earlier session, whose daemon had a preset "retired"
        "control_file": str(server.control_file),
        "presets": json.dumps(["retired"]),
        "streamv2v.preset.retired": [{"key": "OBS_KEY_F9"}],
        "streamv2v.next": [{"key": "OBS_KEY_F13"}],
    }
    loaded(script, fake, saved)
    # At load, before the timer brings the daemon's list: the fixed hotkeys and the remembered
    # preset, with their saved bindings.
    assert list(fake.hotkeys)[:5] == [
        *(h.name for h in core.FIXED_HOTKEYS),
        "streamv2v.preset.retired",
    ]
    assert fake.bindings[fake.hotkeys["streamv2v.next"][0]] == [{"key": "OBS_KEY_F13"}]
    assert fake.bindings[fake.hotkeys["streamv2v.preset.retired"][0]] == [{"key": "OBS_KEY_F9"}]

    assert tick_until(fake, lambda: "streamv2v.preset.claymation" in fake.hotkeys)
    names = list(server.api.library.presets)
    assert [n for n in fake.hotkeys if n.startswith("streamv2v.preset.")] == [
        "streamv2v.preset.retired",
        *(f"streamv2v.preset.{n}" for n in names),
    ]
    assert fake.hotkeys["streamv2v.preset.claymation"][1] == "streamv2v: preset claymation"

    fake.hotkeys["streamv2v.preset.claymation"][2](True)
    assert wait_for(lambda: server.api.manager.active == "claymation", 2)
    fake.hotkeys["streamv2v.preset.anime"][2](False)  # a key release selects nothing
    fake.hotkeys["streamv2v.preset.retired"][2](True)  # its preset is gone: refused, harmless
    assert tick_until(fake, lambda: any("retired: no preset named" in t for _, t in fake.log))
    assert server.api.manager.active == "claymation"

    fake.bindings[fake.hotkeys["streamv2v.preset.anime"][0]] = [{"key": "OBS_KEY_F1"}]
    out: dict = {}
    script.script_save(out)
    assert out["streamv2v.preset.anime"] == [{"key": "OBS_KEY_F1"}]
    assert out["streamv2v.next"] == [{"key": "OBS_KEY_F13"}]
    assert json.loads(out["presets"]) == ["retired", *names]  # bound, so kept though gone


def test_the_add_source_button_creates_then_fixes_the_media_source(in_obs, server, monkeypatch):
    script, fake = in_obs
    status = {"preset": "config", "preview_url": "http://127.0.0.1:8765/", "output_fps": 20.0}
    monkeypatch.setattr(server.api, "status", lambda: status)
    loaded(script, fake, {"control_file": str(server.control_file)})
    assert tick_until(fake, lambda: script._script.worker.state.connected)
    button = {p[1]: p[2] for p in script.script_properties() if p[0] == "button"}

    assert button["add_source"](None, None) is True  # True: OBS redraws the panel
    source = fake.sources["streamv2v output"]
    assert source["kind"] == "ffmpeg_source"
    assert source["settings"] == core.media_source_settings("http://127.0.0.1:8765/stream.mjpg", 20)
    assert fake.scene_items == ["streamv2v output"]

    status["preview_url"] = "http://127.0.0.1:9999/"  # the daemon moved: the button fixes it
    assert script._script.worker.submit("refresh").wait(2)
    button["add_source"](None, None)
    assert source["settings"]["input"] == "http://127.0.0.1:9999/stream.mjpg"
    assert fake.scene_items == ["streamv2v output"]
    assert "updated 'streamv2v output' in 'Scene 1'" in script._script.notice

    fake.sources["streamv2v output"]["kind"] = "image_source"  # the user's own source: untouched
    button["add_source"](None, None)
    assert "is not a Media Source: rename it" in script._script.notice


def test_the_panel_shows_the_state_and_applies_a_preset(in_obs, server):
    script, fake = in_obs
    settings = loaded(script, fake, {"control_file": str(server.control_file)})
    assert tick_until(fake, lambda: script._script.worker.state.connected)
    props = script.script_properties()
    assert "preset: config" in settings["status"]
    assert ("info_type", "status", fake.OBS_TEXT_INFO_NORMAL) in props
    choices = next(p[2] for p in props if p[0] == "list")
    assert ("anime - " + server.api.library.presets["anime"].description, "anime") in choices
    settings["preset"] = "pixel-art"  # what the user picked in the list
    apply = next(p[2] for p in props if p[:2] == ("button", "apply"))
    assert apply(None, None) is True
    assert server.api.manager.active == "pixel-art"  # done before the panel redraws
    script.script_properties()
    assert "preset: pixel-art" in settings["status"]


def test_with_no_daemon_the_panel_says_how_to_start_it(in_obs, tmp_path):
    script, fake = in_obs
    settings = loaded(script, fake, {"control_file": str(tmp_path / "control.json")})
    assert tick_until(fake, lambda: script._script.worker.state.problem.startswith(NOT_RUNNING))
    props = script.script_properties()
    assert settings["status"].startswith(NOT_RUNNING)
    assert ("info_type", "status", fake.OBS_TEXT_INFO_WARNING) in props
    fake.hotkeys["streamv2v.add_source"][2](True)
    fake.hotkeys["streamv2v.passthrough"][2](True)
    assert fake.sources == {}
    assert tick_until(fake, lambda: any(t.startswith("passthrough: ") for _, t in fake.log))
    assert all(level == fake.LOG_INFO for level, _ in fake.log), fake.log


def test_unload_stops_the_worker_and_the_timer(in_obs, tmp_path):
    script, fake = in_obs
    loaded(script, fake, {"control_file": str(tmp_path / "control.json")})
    worker = script._script.worker
    script.script_unload()
    assert fake.timers == [] and script._script is None
    assert not worker._thread.is_alive()


# --------------------------------------------------------------------------- installing it
def test_an_installed_copy_is_complete_and_loads_on_its_own(tmp_path):
    path = obs_script.install(tmp_path / "scripts")
    assert path == tmp_path / "scripts" / "streamv2v_obs.py"
    for name in obs_script.SCRIPT_FILES:
        assert (path.parent / name).read_bytes() == obs_script.script_path().with_name(
            name
        ).read_bytes()
    # As OBS loads it: a top-level module from its folder, no daemon package, no obspython.
    probe = f"import sys; sys.path.insert(0, {str(path.parent)!r}); import streamv2v_obs as s; "
    probe += "print(s.core.__file__, s.obs)"
    command = [sys.executable, "-I", "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(path.parent / "streamv2v_obs_client.py"), "None"]
    assert f"pick {path}" in obs_script.how_to_add(path)


def test_obs_config_folder_on_each_platform(tmp_path):
    home = tmp_path
    linux = obs_script.obs_config_dir({}, "linux", home)
    assert linux == home / ".config" / "obs-studio"
    assert obs_script.obs_config_dir({"XDG_CONFIG_HOME": "/x"}, "linux", home) == Path(
        "/x/obs-studio"
    )
    (home / obs_script.FLATPAK_OBS).mkdir(parents=True)  # only the Flatpak OBS has run
    assert obs_script.obs_config_dir({}, "linux", home) == home / obs_script.FLATPAK_OBS
    linux.mkdir(parents=True)  # both: the native one
    assert obs_script.obs_config_dir({}, "linux", home) == linux
    windows = obs_script.obs_config_dir({"APPDATA": r"C:\Users\me\AppData\Roaming"}, "win32", home)
    assert windows == Path(r"C:\Users\me\AppData\Roaming") / "obs-studio"
    mac = obs_script.obs_config_dir({}, "darwin", home)
    assert mac == home / "Library" / "Application Support" / "obs-studio"


def test_inside_a_flatpak_obs_the_daemon_is_found_outside_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    sandbox = {"FLATPAK_ID": "com.obsproject.Studio", "XDG_CONFIG_HOME": "/home/me/.var/app/x"}
    expected = tmp_path / ".config" / "streamv2v" / "control.json"
    assert core.default_control_file(sandbox, "linux") == expected


def test_the_obs_script_command_prints_the_path_and_installs(private_user_dirs, capsys):
    assert main(["obs-script"]) == 0
    assert capsys.readouterr().out == f"{obs_script.script_path()}\n"
    assert obs_script.script_path().is_file()

    assert main(["obs-script", "--install"]) == 0
    first, *steps = capsys.readouterr().out.splitlines()
    installed = private_user_dirs / "obs-studio" / "scripts" / "streamv2v" / "streamv2v_obs.py"
    assert first == str(installed) and installed.is_file()
    assert (installed.parent / "streamv2v_obs_client.py").is_file()
    assert "Tools -> Scripts" in steps[1] and str(installed) in steps[1]
    assert len([line for line in steps if line.lstrip()[:2] in ("1.", "2.", "3.")]) == 3


def test_an_install_that_can_not_write_says_where_the_script_is(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))  # the folder can not be made under it
    assert main(["obs-script", "--install"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("streamv2v: error: cannot copy the OBS script into ")
    assert str(obs_script.script_path()) in error
