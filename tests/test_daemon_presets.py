"""Preset switches in the running daemon (tiny model, memory virtual camera): mid-stream
switches, hot reload of preset files, and a global hotkey pressed on a real X server."""

from __future__ import annotations

import shutil
import time

import pytest
from test_daemon import demo_config, wait_for

from daemon.app import Daemon


class EncoderCalls:
    """Counts the text encoder's forward calls (a forward hook: the module's real calls)."""

    def __init__(self, daemon: Daemon) -> None:
        self.calls = 0
        daemon.engine.engine.text_encoder.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1


def started(tiny_model, **extra) -> Daemon:
    daemon = Daemon(demo_config(tiny_model, **extra))
    daemon.start()
    assert wait_for(lambda: daemon.engine.state == "running", 60), daemon.status()
    return daemon


def test_switch_mid_stream_publishes_no_gap_and_no_stale_frame(tiny_model, memory_vcam):
    daemon = started(tiny_model)
    cam = memory_vcam.instances[-1]
    try:
        encoder = EncoderCalls(daemon)
        assert wait_for(lambda: daemon.output.kinds["styled"] >= 3, 30)
        first_styled = len(cam.frames)
        passthrough_before = daemon.output.kinds["passthrough"]
        # anime has another strength than the demo's engine settings: the blend, then a stream
        # restart whose warm-up frames must not be published.
        assert daemon.select_preset("anime", "test") == "anime"
        assert daemon.status()["preset"] == "anime"
        assert wait_for(lambda: daemon.engine.switching, 5)
        assert wait_for(lambda: not daemon.engine.switching, 30), daemon.status()
        applied = daemon.engine.applied
        styled_at_end = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] >= styled_at_end + 3, 30)
        frames = cam.frames[first_styled:]
        status = daemon.status()
    finally:
        daemon.stop()
    assert applied is not None and applied.name == "anime"
    assert daemon.engine.engine.config.strength == applied.strength
    assert encoder.calls == 0  # every prompt was encoded before the switch
    assert status["kinds"]["passthrough"] == passthrough_before  # no camera frame in between
    assert frames and all(f.shape == (64 * 64 * 3,) for f in frames)  # RGB, as sent
    # The random-weight tiny model's styles are dark (mean ~8) but never black (all zero).
    brightest = [int(f.max()) for f in frames]
    assert min(brightest) > 2, "a black frame was published"


def test_edited_preset_files_take_effect_and_a_broken_one_keeps_the_last_good(
    tiny_model, memory_vcam, private_user_dirs
):
    folder = private_user_dirs / "streamv2v" / "presets"
    folder.mkdir(parents=True)
    daemon = started(tiny_model)
    try:
        path = folder / "mine.toml"
        path.write_text('prompt = "a robot"\ntransition_frames = 2\n')
        t0 = time.monotonic()
        assert wait_for(lambda: "mine" in daemon.library.presets, 5)
        assert time.monotonic() - t0 < 2.0
        daemon.select_preset("mine", "test")
        assert wait_for(lambda: getattr(daemon.engine.applied, "prompt", "") == "a robot", 10)

        path.write_text('prompt = "a robot, edited"\ntransition_frames = "two"\n')
        assert wait_for(lambda: str(path) in daemon.preset_listing()["errors"], 5)
        error = daemon.preset_listing()["errors"][str(path)]
        assert "line 2: transition_frames" in error
        time.sleep(1.0)
        assert daemon.engine.applied.prompt == "a robot"  # the last good version runs on

        t0 = time.monotonic()
        path.write_text('prompt = "a robot, edited"\ntransition_frames = 2\n')
        assert wait_for(lambda: daemon.engine.applied.prompt == "a robot, edited", 10)
        assert time.monotonic() - t0 < 2.0
        assert not daemon.preset_listing()["errors"]
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 2, 30)
    finally:
        daemon.stop()


def test_passthrough_preset_shows_the_camera_and_switching_back_restyles(tiny_model, memory_vcam):
    daemon = started(tiny_model)
    try:
        daemon.select_preset("passthrough", "test")
        before = daemon.output.kinds["passthrough"]
        assert wait_for(lambda: daemon.output.kinds["passthrough"] > before + 3, 10)
        daemon.select_preset("claymation", "test")
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 3, 30)
        assert daemon.engine.applied.name == "claymation"
    finally:
        daemon.stop()


@pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("xdotool")), reason="needs Xvfb and xdotool"
)
def test_a_global_hotkey_switches_the_running_daemon(tiny_model, memory_vcam, monkeypatch):
    from test_hotkeys import Xvfb, press

    server = Xvfb()
    try:
        monkeypatch.setenv("DISPLAY", server.display)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        daemon = started(tiny_model, hotkeys__enabled=True)
        try:
            assert wait_for(lambda: daemon.hotkeys.state == "listening", 5), daemon.status()
            press(server.display, "ctrl+alt+2")  # anime's hotkey in its bundled file
            assert wait_for(lambda: daemon.presets.active == "anime", 1.0)
            press(server.display, "ctrl+alt+n")  # the configured "next"
            assert wait_for(lambda: daemon.presets.active == "claymation", 1.0)
            assert wait_for(lambda: daemon.engine.applied.name == "claymation", 10)
        finally:
            daemon.stop()
    finally:
        server.kill()


def test_a_preset_with_its_own_lora_switches_in_place_and_a_bad_one_is_marked_broken(
    tiny_model, memory_vcam, private_user_dirs, tmp_path, caplog
):
    from test_engine import save_tiny_lora

    from daemon.styles.presets import BrokenPreset

    lora = save_tiny_lora(tiny_model, tmp_path / "lora")
    folder = private_user_dirs / "streamv2v" / "presets"
    folder.mkdir(parents=True)
    (folder / "lora.toml").write_text(f'prompt = "a robot"\nloras = [{{ id = "{lora}" }}]\n')
    (folder / "broken-lora.toml").write_text(
        f'prompt = "a cat"\nloras = [{{ id = "{tmp_path / "missing"}" }}]\n'
    )
    daemon = started(tiny_model)
    try:
        engine = daemon.engine.engine
        assert str(lora) in engine.adapters  # loaded with the library, before any switch
        passthrough = daemon.output.kinds["passthrough"]
        daemon.select_preset("lora", "test")
        assert wait_for(lambda: getattr(daemon.engine.applied, "name", "") == "lora", 10)
        assert wait_for(lambda: engine.adapters.active == {str(lora): 1.0}, 10)
        assert daemon.engine.engine is engine  # no second engine, no reload
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 3, 30)

        with pytest.raises(BrokenPreset, match=r"broken-lora.*missing"):
            daemon.select_preset("broken-lora", "test")
        listing = {row["name"]: row for row in daemon.preset_listing()["presets"]}
        assert "failed to load" in listing["broken-lora"]["error"]
        assert listing["lora"]["error"] is None
        assert any("broken-lora" in e for e in daemon.library.errors.values())
        daemon.select_preset("anime", "test")  # the others keep working
        assert wait_for(lambda: getattr(daemon.engine.applied, "name", "") == "anime", 10)
        assert wait_for(lambda: engine.adapters.active == {}, 10)
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 3, 30)
        assert daemon.engine.state == "running"
        assert daemon.output.kinds["passthrough"] == passthrough  # styled all along
    finally:
        daemon.stop()
    assert any("preset broken-lora is broken" in r.getMessage() for r in caplog.records)
    assert not any("frame failed" in r.getMessage() for r in caplog.records)
