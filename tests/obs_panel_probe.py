"""An OBS script for tests/test_obs_script_live.py: on its hotkey it builds the streamv2v
script's properties panel through OBS's real API (both scripts share OBS's one Python) and logs
what the panel holds, so the test reads it in OBS's log."""

import sys

import obspython as obs

PROPERTIES = ("status", "preset", "apply", "refresh", "add_source", "control_file")


def _build_panel(pressed: bool) -> None:
    if not pressed:
        return
    script = sys.modules["streamv2v_obs"]
    props = script.script_properties()
    found = [name for name in PROPERTIES if obs.obs_properties_get(props, name) is not None]
    choices = obs.obs_property_list_item_count(obs.obs_properties_get(props, "preset"))
    status = obs.obs_data_get_string(script._script.settings, "status").replace("\n", " | ")
    obs.obs_properties_destroy(props)
    obs.script_log(obs.LOG_INFO, f"panel: {','.join(found)}; {choices} presets; {status}")


def script_load(settings: object) -> None:
    obs.obs_hotkey_register_frontend("streamv2v_test.panel", "build the panel", _build_panel)
