"""The running daemon driven by a real headless OBS Studio: program scenes and custom events
select presets, an OBS restart is survived, a wrong password leaves the frames flowing."""

from __future__ import annotations

import logging
import time

from obs_helpers import ObsStudio, require_obs
from test_daemon import demo_config, wait_for
from test_obs_control import broadcast, switch_scene

from daemon.app import Daemon

PASSWORD = "correct horse battery staple"


def daemon_for(tiny_model, port: int, password: str, **extra) -> Daemon:
    obs = {
        "enabled": True,
        "port": port,
        "password": password,
        "scenes": {"Gaming": "anime", "Just *": "passthrough"},
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    daemon = Daemon(demo_config(tiny_model, obs=obs, **extra))
    daemon.start()
    return daemon


def selected_within(daemon: Daemon, name: str, sent: float) -> float:
    """Seconds from ``sent`` until ``name`` is the active preset."""
    assert wait_for(lambda: daemon.presets.active == name, 2.0, step=0.005), daemon.status()
    return time.monotonic() - sent


def test_obs_scenes_and_custom_events_switch_presets_across_an_obs_restart(
    tiny_model, memory_vcam, tmp_path
):
    require_obs()
    with ObsStudio(tmp_path / "obs", scenes=("Intro", "Gaming", "Just Chatting")) as studio:
        daemon = daemon_for(tiny_model, studio.port, "")
        try:
            assert wait_for(lambda: daemon.obs.state == "connected", 10), daemon.status()
            assert wait_for(lambda: daemon.engine.state == "running", 60)
            assert selected_within(daemon, "anime", switch_scene(studio, "Gaming")) < 0.5
            assert (
                selected_within(daemon, "passthrough", switch_scene(studio, "Just Chatting")) < 0.5
            )
            sent = broadcast(studio, {"streamv2v": {"preset": "cyberpunk"}})
            assert selected_within(daemon, "cyberpunk", sent) < 0.5
            assert wait_for(lambda: daemon.engine.applied.name == "cyberpunk", 10)

            studio.stop()
            assert wait_for(lambda: daemon.obs.state == "lost", 5)
            published = daemon.output.published
            assert wait_for(lambda: daemon.output.published > published + 10, 5)  # frames go on
            studio.start()
            assert wait_for(lambda: daemon.obs.state == "connected", 15), daemon.status()
            # OBS comes back on its first scene, which selects no preset: the active one stays.
            assert wait_for(lambda: daemon.obs.scene == "Intro", 2)
            assert daemon.presets.active == "cyberpunk"
            assert selected_within(daemon, "anime", switch_scene(studio, "Gaming")) < 0.5
            assert daemon.status()["obs"] == "connected"
        finally:
            daemon.stop()


def test_a_wrong_obs_password_is_one_log_line_and_the_frames_keep_flowing(
    tiny_model, memory_vcam, tmp_path, caplog
):
    require_obs()
    with ObsStudio(tmp_path / "obs", password=PASSWORD) as studio, caplog.at_level(logging.DEBUG):
        daemon = daemon_for(tiny_model, studio.port, "wrong password")
        try:
            assert wait_for(lambda: daemon.obs.state == "auth_failed", 10)
            assert wait_for(lambda: daemon.engine.state == "running", 60)
            published = daemon.output.published
            time.sleep(2.0)  # several reconnect attempts (every 0.5 s)
            assert daemon.output.published > published + 20  # ~20 fps, unaffected
            assert daemon.obs.state == "auth_failed"
        finally:
            daemon.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    password_lines = [e for e in errors if "password" in e]
    assert len(password_lines) == 1, errors
    assert "obs.password" in password_lines[0]
    assert not any("wrong password" in r.getMessage() for r in caplog.records)


def test_av_sync_sets_the_obs_audio_offset_to_the_measured_latency(
    tiny_model, memory_vcam, tmp_path, caplog
):
    require_obs()
    with ObsStudio(tmp_path / "obs") as studio, caplog.at_level(logging.INFO):
        scene = studio.client.send("GetCurrentProgramScene", raw=True)["currentProgramSceneName"]
        studio.client.send(
            "CreateInput",
            {"sceneName": scene, "inputName": "Mic", "inputKind": "ffmpeg_source"},
        )

        def offset() -> int:
            answer = studio.client.send("GetInputAudioSyncOffset", {"inputName": "Mic"}, raw=True)
            return answer["inputAudioSyncOffset"]

        assert offset() == 0
        latency = {"enabled": False, "av_sync_input": "Mic"}
        daemon = daemon_for(tiny_model, studio.port, "", latency=latency)
        try:
            assert wait_for(lambda: offset() > 0, 15), daemon.status()
            measured = daemon.output.latency_ms.pct(50)
            pushed = offset()
        finally:
            daemon.stop()
    assert abs(pushed - measured) <= 40, (pushed, measured)  # re-pushed on a 20 ms drift
    lines = [r.getMessage() for r in caplog.records if "A/V sync" in r.getMessage()]
    assert any(f"audio offset {pushed} ms" in line for line in lines), (pushed, lines)


def test_av_sync_with_a_missing_obs_input_is_one_error_line(
    tiny_model, memory_vcam, tmp_path, caplog
):
    require_obs()
    with ObsStudio(tmp_path / "obs") as studio, caplog.at_level(logging.INFO):
        latency = {"enabled": False, "av_sync_input": "No Such Mic"}
        daemon = daemon_for(tiny_model, studio.port, "", latency=latency)
        try:
            assert wait_for(lambda: daemon.output.latency_ms.pct(50) is not None, 30)
            time.sleep(2.0)  # several housekeeping rounds
            assert daemon.obs.state == "connected"
        finally:
            daemon.stop()
    refused = [r for r in caplog.records if "A/V sync" in r.getMessage()]
    assert len(refused) == 1 and "No Such Mic" in refused[0].getMessage()
