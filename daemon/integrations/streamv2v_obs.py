"""streamv2v inside OBS Studio: presets on OBS hotkeys, the daemon's state in a panel, and the
styled output added to the current scene as a Media Source in one click.

Add it with Tools -> Scripts -> "+" (``streamv2v obs-script`` prints where this file is; keep
streamv2v_obs_client.py next to it). It talks to the running daemon's control API with the URL
and token the daemon writes to control.json (the file the ``streamv2v`` CLI reads).

Threads: OBS runs this script on its UI thread (the panel), a scripting thread (hotkeys) and the
video thread (timers); none of them waits on the network. One worker thread does every HTTP call
(0.5 s timeout) and keeps the last known daemon state; an OBS timer brings its results into OBS
(hotkeys for new presets, log lines). The worker never calls into OBS, not even to log or print:
OBS's script log only works on the threads OBS runs the script on.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

try:
    import obspython as obs
except ModuleNotFoundError:  # imported outside OBS: tests, `streamv2v obs-script`
    obs = None

try:
    from . import streamv2v_obs_client as core  # imported from the daemon package
except ImportError:  # loaded by OBS, which puts this file's folder on sys.path
    import streamv2v_obs_client as core

TICK_MS = 100  # how often OBS picks up the worker's results
SOURCE_NAME = "streamv2v output"
SOURCE_KIND = "ffmpeg_source"  # OBS's Media Source

# OBS takes only plain functions as callbacks (no bound methods, no functools.partial).
_script: Script | None = None


class Script:
    """What lives from script_load to script_unload."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.worker = core.Worker(
            core.ControlClient(core.find_control_file(self.setting("control_file")))
        )
        self.hotkeys: dict[str, tuple[int, Any]] = {}  # name -> (OBS's id, callback)
        self.notice = ""  # what the last panel action did

    def setting(self, key: str) -> str:
        return obs.obs_data_get_string(self.settings, key) or ""

    def start(self) -> None:
        try:
            remembered = [
                n for n in json.loads(self.setting("presets") or "[]") if isinstance(n, str)
            ]
        except (ValueError, TypeError):
            remembered = []
        self.register_hotkeys(remembered)
        self.worker.start()
        obs.timer_add(_tick, TICK_MS)

    def register_hotkeys(self, preset_names: list[str] | tuple[str, ...]) -> None:
        for spec in core.hotkey_plan(preset_names):
            if spec.name in self.hotkeys:
                continue  # a preset that disappeared keeps its hotkey: pressing it is refused
            callback = _hotkey_callback(spec.action, spec.target)
            hotkey_id = obs.obs_hotkey_register_frontend(spec.name, spec.description, callback)
            bindings = obs.obs_data_get_array(self.settings, spec.name)
            if bindings is not None:
                obs.obs_hotkey_load(hotkey_id, bindings)
                obs.obs_data_array_release(bindings)
            self.hotkeys[spec.name] = (hotkey_id, callback)

    def save(self, settings: Any) -> None:
        bound = set()
        for name, (hotkey_id, _) in self.hotkeys.items():
            bindings = obs.obs_hotkey_save(hotkey_id)
            if obs.obs_data_array_count(bindings):
                bound.add(name.removeprefix(core.PRESET_PREFIX))
            obs.obs_data_set_array(settings, name, bindings)
            obs.obs_data_array_release(bindings)
        ours = [
            n.removeprefix(core.PRESET_PREFIX)
            for n in self.hotkeys
            if n.startswith(core.PRESET_PREFIX)
        ]
        state = self.worker.state
        daemon = list(state.preset_names) if state.connected else None
        obs.obs_data_set_string(
            settings, "presets", json.dumps(core.presets_to_remember(ours, daemon, bound))
        )

    def tick(self) -> None:
        while True:
            try:
                level, text = self.worker.messages.get_nowait()
            except queue.Empty:
                break
            obs.script_log(obs.LOG_WARNING if level == "warning" else obs.LOG_INFO, text)
        names = self.worker.state.preset_names
        if any(core.PRESET_PREFIX + name not in self.hotkeys for name in names):
            self.register_hotkeys(names)

    def stop(self) -> None:
        obs.timer_remove(_tick)
        self.worker.stop()

    def add_preview_source(self) -> str:
        """Create, or fix, the Media Source of the daemon's preview in the scene being edited;
        returns what it did."""
        state = self.worker.state
        if not state.connected:
            return state.problem
        try:
            url, fps = core.preview_stream(state.status)
        except core.RequestRefused as err:
            return str(err)
        if obs.obs_frontend_preview_program_mode_active():  # studio mode: the scene being edited
            scene_source = obs.obs_frontend_get_current_preview_scene()
        else:
            scene_source = obs.obs_frontend_get_current_scene()
        if scene_source is None:
            return "no current scene to add the source to"
        data = obs.obs_data_create_from_json(json.dumps(core.media_source_settings(url, fps)))
        try:
            scene, scene_name = (
                obs.obs_scene_from_source(scene_source),
                obs.obs_source_get_name(scene_source),
            )
            source, verb = obs.obs_get_source_by_name(SOURCE_NAME), "updated"
            if source is None:
                source, verb = (
                    obs.obs_source_create(SOURCE_KIND, SOURCE_NAME, data, None),
                    "added",
                )
            elif obs.obs_source_get_unversioned_id(source) != SOURCE_KIND:
                obs.obs_source_release(source)
                return f"{SOURCE_NAME!r} exists and is not a Media Source: rename it"
            else:
                obs.obs_source_update(source, data)
            if obs.obs_scene_find_source_recursive(scene, SOURCE_NAME) is None:
                obs.obs_scene_add(scene, source)
            obs.obs_source_release(source)
        finally:
            obs.obs_data_release(data)
            obs.obs_source_release(scene_source)
        return f"{verb} {SOURCE_NAME!r} in {scene_name!r}: {url}, mjpeg, framerate={fps:g}"


def _hotkey_callback(action: str, target: str) -> Any:
    def pressed(is_pressed: bool) -> None:
        if not is_pressed or _script is None:
            return
        if action == "add_source":
            obs.script_log(obs.LOG_INFO, _script.add_preview_source())
        else:
            _script.worker.submit(action, target)

    return pressed


def _tick() -> None:
    if _script is not None:
        _script.tick()


def _refreshed_after(done: threading.Event) -> bool:
    done.wait(core.HTTP_TIMEOUT_S)  # bounded: a daemon on this machine answers in milliseconds
    return True  # True: OBS rebuilds the panel, with the new state


def _on_apply(props: Any, prop: Any) -> bool:
    if _script is None:
        return False
    name = _script.setting("preset")
    _script.notice = "" if name else "pick a preset first"
    return _refreshed_after(_script.worker.submit("preset", name)) if name else True


def _on_refresh(props: Any, prop: Any) -> bool:
    return _script is not None and _refreshed_after(_script.worker.submit("refresh"))


def _on_add_source(props: Any, prop: Any) -> bool:
    if _script is None:
        return False
    _script.notice = _script.add_preview_source()
    obs.script_log(obs.LOG_INFO, _script.notice)
    return True


# --------------------------------------------------------------------------- OBS's entry points
def script_description() -> str:
    return (
        "<b>streamv2v</b>: real-time diffusion styles for your camera. Bind presets in "
        "Settings -> Hotkeys (streamv2v: ...), switch them here, and add the styled output to "
        "the current scene. Needs the daemon running (<code>streamv2v run</code>)."
    )


def script_defaults(settings: Any) -> None:
    obs.obs_data_set_default_string(settings, "control_file", "")


def script_load(settings: Any) -> None:
    global _script
    _script = Script(settings)
    _script.start()


def script_update(settings: Any) -> None:
    if _script is not None:
        _script.worker.client.control_file = core.find_control_file(_script.setting("control_file"))
        _script.worker.submit("refresh")


def script_save(settings: Any) -> None:
    if _script is not None:
        _script.save(settings)


def script_unload() -> None:
    global _script
    if _script is not None:
        _script.stop()
        _script = None


def script_properties() -> Any:
    props = obs.obs_properties_create()
    if _script is None:
        return props
    state, settings = _script.worker.state, _script.settings
    notice = f"\n\n{_script.notice}" if _script.notice else ""
    obs.obs_data_set_string(settings, "status", core.summary_text(state) + notice)
    info = obs.obs_properties_add_text(props, "status", "Daemon", obs.OBS_TEXT_INFO)
    kind = obs.OBS_TEXT_INFO_NORMAL if state.connected else obs.OBS_TEXT_INFO_WARNING
    obs.obs_property_text_set_info_type(info, kind)
    choices = obs.obs_properties_add_list(
        props, "preset", "Preset", obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING
    )
    for preset in state.presets:
        about = f" - {preset['description']}" if preset.get("description") else ""
        obs.obs_property_list_add_string(choices, preset["name"] + about, preset["name"])
    if state.active:
        obs.obs_data_set_string(settings, "preset", state.active)
    obs.obs_properties_add_button(props, "apply", "Apply preset", _on_apply)
    obs.obs_properties_add_button(props, "refresh", "Refresh", _on_refresh)
    obs.obs_properties_add_button(
        props, "add_source", "Add / fix the output source", _on_add_source
    )
    label = "Control file (empty: the daemon's own)"
    obs.obs_properties_add_path(
        props, "control_file", label, obs.OBS_PATH_FILE, "control.json (*.json)", None
    )
    return props
