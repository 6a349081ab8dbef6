"""The daemon's TOML configuration: loading, the error messages a user sees, overrides, dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import (
    ConfigError,
    DaemonConfig,
    deep_merge,
    default_config_path,
    dump_config,
    load_config,
    parse_override,
)
from daemon.config_text import to_toml


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


def test_defaults_without_a_file(tmp_path, monkeypatch):
    # No file at the default location: the built-in defaults.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nowhere"))
    cfg = load_config(None)
    assert cfg == DaemonConfig()
    assert cfg.camera.source == 0 and cfg.camera.fourcc == "MJPG"
    assert cfg.output.preview.host == "127.0.0.1" and cfg.output.preview.port == 8765
    assert cfg.engine.loras[0].id == "latent-consistency/lcm-lora-sdv1-5"
    assert default_config_path().name == "config.toml"


def test_default_location_is_read_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    default = default_config_path()
    default.parent.mkdir(parents=True)
    default.write_text("[camera]\nfps = 12\n")
    assert load_config(None).camera.fps == 12


def test_a_valid_file_with_nested_engine_settings(tmp_path):
    path = write(
        tmp_path,
        """
        demo = false
        [camera]
        source = "http://127.0.0.1:8080/video"
        fps = 15
        mirror = true
        fourcc = ""
        [engine]
        model = "tiny"
        prompt = "an oil painting"
        loras = []
        [engine.settings]
        steps = 2
        width = 256
        height = 256
        bank = { interval = 2 }
        [output.preview]
        port = 0
        [log]
        level = "debug"
        """,
    )
    cfg = load_config(path)
    assert cfg.camera.source == "http://127.0.0.1:8080/video" and cfg.camera.mirror
    assert cfg.camera.fourcc is None
    assert cfg.engine.settings.steps == 2 and cfg.engine.settings.bank.interval == 2
    assert (cfg.engine.settings.width, cfg.engine.settings.height) == (256, 256)
    assert cfg.engine.loras == []
    assert cfg.output.preview.port == 0 and cfg.log.level == "DEBUG"


def test_bad_value_names_file_key_value_and_what_is_allowed(tmp_path):
    path = write(tmp_path, '[camera]\nfps = "fast"\n', "mine.toml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "mine.toml" in message and "camera.fps" in message and '"fast"' in message
    assert "valid number" in message


def test_out_of_range_value_says_the_bound(tmp_path):
    path = write(tmp_path, "[camera]\nfps = 1000\n")
    message = error_of(path)
    assert "camera.fps = 1000" in message and "less than or equal to 240" in message


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "[camera]\nfsp = 30\n")
    message = error_of(path)
    assert "unknown key camera.fsp" in message and "did you mean camera.fps?" in message
    assert "allowed in [camera]:" in message


def test_bad_nested_engine_value_is_named_with_its_full_key(tmp_path):
    path = write(tmp_path, "[engine.settings]\nsteps = 0\n")
    message = error_of(path)
    assert "engine.settings.steps = 0" in message and "greater than or equal to 1" in message


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "[camera]\nfps = 30\nmirror = yes\n")
    message = error_of(path)
    assert "config.toml" in message and "not valid TOML" in message and "line 3" in message


def test_missing_explicit_file_is_an_error(tmp_path):
    message = error_of(tmp_path / "nope.toml")
    assert "nope.toml" in message and "not found" in message


def test_preview_must_stay_on_loopback(tmp_path):
    path = write(tmp_path, '[output.preview]\nhost = "0.0.0.0"\n')
    message = error_of(path)
    assert "output.preview.host" in message and "0.0.0.0" in message
    assert "loopback" in message and "no authentication" in message
    for host in ("localhost", "127.0.0.2", "::1"):
        assert load_config(None, {"output": {"preview": {"host": host}}}).output.preview.host


def test_camera_source_forms(tmp_path):
    def source(value):
        return load_config(None, {"camera": {"source": value}}).camera

    assert source("2").source == 2 and source(1).source_kind() == "device"
    assert source("/dev/video3").source_kind() == "device"
    assert source("rtsp://cam.local/live").source_kind() == "url"
    assert source("clip.mp4").source_kind() == "file"
    assert source("testpattern").source_kind() == "testpattern"
    message = error_of(None, {"camera": {"source": -1}})
    assert "camera.source = -1" in message and "0 or more" in message


def test_overrides_parse_and_merge_over_the_file(tmp_path):
    assert parse_override("camera.fps=15") == {"camera": {"fps": 15}}
    assert parse_override("camera.mirror=true") == {"camera": {"mirror": True}}
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("engine.prompt=a cat, watercolor") == {
        "engine": {"prompt": "a cat, watercolor"}
    }
    assert parse_override("camera.source=http://h:1/v") == {"camera": {"source": "http://h:1/v"}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("camera.fps")

    path = write(tmp_path, "[camera]\nfps = 10\nwidth = 320\n")
    overrides: dict = {}
    for text in ("camera.fps=15", "engine.settings.steps=2", "engine.prompt=42"):
        overrides = deep_merge(overrides, parse_override(text))
    cfg = load_config(path, overrides)
    assert cfg.camera.fps == 15 and cfg.camera.width == 320  # merged, not replaced
    assert cfg.engine.settings.steps == 2 and cfg.engine.prompt == "42"

    message = error_of(path, parse_override("camera.fps=0"))
    assert "command-line override: camera.fps = 0" in message


def test_dump_round_trips(tmp_path):
    cfg = load_config(
        None,
        {
            "camera": {"source": 'C:\\clips\\a "b".mp4', "fourcc": ""},
            "engine": {"prompt": "line one\nline two", "settings": {"t_index_list": [20, 30]}},
            "output": {"record": {"path": str(tmp_path / "out.mp4")}},
        },
    )
    text = dump_config(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert load_config(write(tmp_path, dump_config(DaemonConfig()))) == DaemonConfig()


def test_secrets_are_masked():
    data = {
        "control": {"token": "abc", "port": 1},
        "obs": {"password": "hunter2", "host": "localhost", "nested": [{"client_secret": "x"}]},
    }
    masked = to_toml(data)
    assert "abc" not in masked and "hunter2" not in masked and '"x"' not in masked
    assert 'token = "***"' in masked and 'password = "***"' in masked
    assert 'host = "localhost"' in masked
    assert "hunter2" in to_toml(data, mask_secrets=False)
