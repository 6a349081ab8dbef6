"""Service definitions for every platform (checked on any machine), and the install -> status ->
uninstall round trip on this one with HOME in a temporary folder."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.integrations.service import (
    MARKER,
    Launch,
    LaunchdAgent,
    SystemdUnit,
    WindowsTask,
    default_launch,
    read_text,
)

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """HOME (and the XDG dirs) in a temporary folder, with no user service manager to reach."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime-dir"))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    return home


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs Debian's systemd")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # An interpreter path with a space and a '%' (a unit-file specifier) exercises the quoting.
    odd = tmp_path / "with space %x"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    config = tmp_path / "my config.toml"
    config.write_text("")
    launch = default_launch(config, tmp_path / "logs")
    launch = Launch(str(odd / "python"), launch.args, launch.log_dir)
    unit = tmp_path / "streamv2v.service"
    unit.write_text(SystemdUnit(tmp_path).render(launch))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "streamv2v.service" not in done.stderr  # no warning about our unit
    text = unit.read_text()
    assert MARKER in text
    quoted = str(odd / "python").replace("%", "%%")
    assert f'ExecStart="{quoted}" -m daemon run --config "{config}"' in text.splitlines()
    for line in ("Restart=on-failure", "RestartSec=5", "RestartPreventExitStatus=2"):
        assert line in text.splitlines()
    assert "WantedBy=default.target" in text
    # A broken unit fails the same check (the check can fail).
    unit.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "restart specifier" in bad.stderr


def test_launchd_plist_parses_and_has_the_required_keys(tmp_path):
    launch = default_launch(tmp_path / "c.toml", tmp_path / "logs")
    agent = LaunchdAgent(tmp_path)
    plist = plistlib.loads(agent.render(launch).encode())
    assert plist["Label"] == "io.github.streamv2v.daemon"
    config = str((tmp_path / "c.toml").resolve())
    assert plist["ProgramArguments"] == [sys.executable, "-m", "daemon", "run", "--config", config]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}  # restart on crash
    assert plist["StandardErrorPath"].startswith(str(tmp_path / "logs"))
    assert agent.path == tmp_path / "Library" / "LaunchAgents" / "io.github.streamv2v.daemon.plist"


def test_windows_task_runs_pythonw_at_logon(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    pythonw = r"C:\Program Files\Python311\pythonw.exe"
    config = r"C:\Users\Ana\my config.toml"
    launch = Launch(pythonw, ("-m", "daemon", "run", "--config", config), tmp_path)
    task = WindowsTask(tmp_path)
    task.write(task.render(launch))
    raw = task.path.read_bytes()
    assert raw[:2] in (b"\xff\xfe", b"\xfe\xff")  # UTF-16, as schtasks /XML wants it
    root = ET.fromstring(raw)
    assert root.find("t:Actions/t:Exec/t:Command", TASK_NS).text == pythonw  # no console
    arguments = root.find("t:Actions/t:Exec/t:Arguments", TASK_NS).text
    assert arguments == f'-m daemon run --config "{config}"'
    assert root.find("t:Triggers/t:LogonTrigger/t:Enabled", TASK_NS).text == "true"
    assert root.find("t:Settings/t:RestartOnFailure/t:Count", TASK_NS) is not None
    assert MARKER in read_text(task)


def test_install_status_uninstall_round_trip_leaves_no_file(home, capsys):
    config = home / "streamv2v.toml"
    config.write_text('[camera]\nsource = "testpattern"\n')
    before = files_under(home)
    assert main(["service", "install", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    unit = home / ".config" / "systemd" / "user" / "streamv2v.service"
    assert f"wrote systemd user unit: {unit}" in out
    assert "systemctl --user daemon-reload && systemctl --user enable --now" in out
    assert f"--config {config}" in unit.read_text()

    assert main(["service", "install", "--config", str(config)]) == 0  # idempotent
    assert "already up to date" in capsys.readouterr().out
    assert main(["service", "status"]) == 0
    assert f"installed: {unit}" in capsys.readouterr().out

    assert main(["service", "uninstall"]) == 0
    assert f"removed {unit}" in capsys.readouterr().out
    assert main(["service", "status"]) == 3
    assert "not installed" in capsys.readouterr().out
    assert files_under(home) == before  # nothing left behind but the config we made


def test_dry_run_prints_and_writes_nothing(home, capsys):
    assert main(["service", "install", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# would write ") and "ExecStart=" in out
    assert files_under(home) == []


def test_a_file_not_written_by_install_is_never_replaced_or_removed(home, capsys):
    unit = home / ".config" / "systemd" / "user" / "streamv2v.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/bin/true\n")
    assert main(["service", "install"]) == 2
    assert "not written by streamv2v" in capsys.readouterr().out
    assert main(["service", "uninstall"]) == 2
    assert unit.read_text() == "[Service]\nExecStart=/usr/bin/true\n"


def test_a_broken_config_is_refused_before_anything_is_written(home, capsys):
    bad = home / "bad.toml"
    bad.write_text("[camera]\nfps = 'fast'\n")
    assert main(["service", "install", "--config", str(bad)]) == 2
    assert "camera.fps" in capsys.readouterr().err
    assert files_under(home) == [bad]
