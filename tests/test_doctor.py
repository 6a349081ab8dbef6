"""`streamv2v doctor` on this machine: no GPU, no v4l2loopback device, hub models not cached,
the tiny model OK; plus OBS, presets and ports against real parts."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from obs_helpers import ObsStudio, require_obs

from daemon.cli import main
from daemon.config import DaemonConfig
from daemon.doctor import FAIL, OK, WARN, check_obs, check_virtual_camera


def lines_of(text: str) -> dict[str, str]:
    """name -> the check's line and its fix line (names are the second column)."""
    found: dict[str, str] = {}
    rows = text.splitlines()
    for i, row in enumerate(rows):
        parts = row.split(None, 1)
        if parts and parts[0] in (OK, WARN, FAIL):
            name = row[6:21].strip()
            fix = rows[i + 1].strip() if i + 1 < len(rows) and "fix:" in rows[i + 1] else ""
            found.setdefault(name, f"{row}\n{fix}".strip())
    return found


def test_this_machine_reports_missing_gpu_vcam_and_model_with_fixes(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")  # the hub model is not cached
    code = main(["doctor"])
    report = lines_of(capsys.readouterr().out)
    assert code == 1  # something FAILed
    if not torch.cuda.is_available():
        assert report["gpu"].startswith(WARN) and "CPU only" in report["gpu"]
        assert "fix:" in report["gpu"] and "cu128" in report["gpu"]
    vcam = report["virtual camera"]
    assert vcam.startswith(FAIL) and "no v4l2loopback device" in vcam
    assert "fix: sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in vcam
    model = report["model"]
    assert model.startswith(FAIL) and "not in the local cache" in model
    assert "fix: streamv2v models pull" in model and "hf download" not in model
    assert report["python"].startswith(OK) and report["presets"].startswith(OK)


def test_the_tiny_model_and_a_local_folder_are_ok(tiny_model, capsys):
    settings = [
        "--set",
        "camera.source=testpattern",
        "--set",
        "output.virtual_camera.enabled=false",
    ]
    assert main(["doctor", "--set", "engine.model=tiny", *settings]) == 0
    report = lines_of(capsys.readouterr().out)
    assert report["model"].startswith(f"{OK}    model           tiny")
    assert report["camera"].startswith(OK)
    local = ["--set", f"engine.model={tiny_model}", "--set", "engine.settings.vae=model"]
    assert main(["doctor", *local, "--set", "engine.loras=[]", *settings]) == 0
    report = lines_of(capsys.readouterr().out)
    assert report["model"].startswith(OK) and f"{tiny_model} (local)" in report["model"]
    assert report["vae"].startswith(OK)


def test_json_output_and_exit_code_follow_the_checks(capsys):
    settings = ["--set", "engine.model=tiny", "--set", "camera.source=testpattern"]
    main(["doctor", "--json", *settings, "--set", "output.virtual_camera.enabled=false"])
    checks = json.loads(capsys.readouterr().out)
    assert {c["status"] for c in checks} <= {OK, WARN}
    assert {"name", "status", "detail", "fix"} <= set(checks[0])


def test_v4l2loopback_is_read_from_sysfs(tmp_path):
    def report(caps: str | None, devices: tuple[str, ...] = ("video7",), wanted=None):
        sysfs = tmp_path / f"sys-{caps}-{wanted is not None}"
        module = sysfs / "module" / "v4l2loopback" / "parameters"
        module.mkdir(parents=True, exist_ok=True)
        if caps is not None:
            (module / "exclusive_caps").write_text(caps + "\n")
        for device in devices:
            (sysfs / "devices" / "virtual" / "video4linux" / device).mkdir(
                parents=True, exist_ok=True
            )
        cfg = DaemonConfig.model_validate({"output": {"virtual_camera": {"device": wanted}}})
        return next(iter(check_virtual_camera(cfg, sysfs)))

    assert report("Y").status == OK and "/dev/video7 (exclusive_caps=Y)" in report("Y").detail
    weak = report("N")
    assert weak.status == WARN and "exclusive_caps=1" in weak.fix
    missing = report("Y", wanted="/dev/video2")
    assert missing.status == FAIL and "/dev/video7" in missing.detail


def test_obs_check_against_a_real_obs(tmp_path):
    require_obs()
    with ObsStudio(tmp_path / "obs", password="sesame") as studio:

        def check(password: str):
            cfg = DaemonConfig.model_validate(
                {"obs": {"enabled": True, "port": studio.port, "password": password}}
            )
            return next(iter(check_obs(cfg)))

        good = check("sesame")
        assert good.status == OK and "OBS 29" in good.detail and "obs-websocket 5" in good.detail
        bad = check("wrong")
        assert bad.status == FAIL and "rejected the password" in bad.detail
        assert "obs.password" in bad.fix and "wrong" not in bad.detail + bad.fix
        port = studio.port
    cfg = DaemonConfig.model_validate({"obs": {"enabled": True, "port": port}})
    gone = next(iter(check_obs(cfg)))
    assert gone.status == FAIL and "not reachable" in gone.detail and "WebSocket" in gone.fix


def test_a_broken_preset_and_a_taken_control_port_fail(private_user_dirs, capsys):
    folder = private_user_dirs / "streamv2v" / "presets"
    folder.mkdir(parents=True)
    (folder / "mine.toml").write_text('prompt = "x"\nstrength = 9\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ["--set", "engine.model=tiny", "--set", f"control.port={port}"]
        assert main(["doctor", *settings]) == 1
    report = lines_of(capsys.readouterr().out)
    assert report["preset"].startswith(FAIL) and "mine.toml: line 2: strength" in report["preset"]
    assert (
        report["control port"].startswith(FAIL)
        and "in use by another program" in (report["control port"])
    )
    assert "fix: set control.port" in report["control port"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
