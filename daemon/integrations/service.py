"""Start the daemon at login, headless: a systemd user unit (Linux), a launchd agent (macOS) or a
Task Scheduler logon task (Windows).

Each platform is a :class:`ServiceKind` that renders its definition file as text (pure, so tests
check every platform's file on any machine) and knows the commands that register it. Install is
idempotent; uninstall removes only a file that carries install's marker, so it never deletes a
file the user wrote.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from daemon.errors import UserError
from daemon.logs import default_log_file

MARKER = "Installed by `streamv2v service install`"
LABEL = "io.github.streamv2v.daemon"
TASK_NAME = "streamv2v"
#: Exit code of a configuration error: restarting cannot help, so the service manager must not.
CONFIG_ERROR_EXIT = 2
RESTART_DELAY_S = 5


@dataclass(frozen=True)
class Launch:
    """How the service starts the daemon."""

    program: str  #: the Python interpreter (pythonw.exe on Windows: no console window)
    args: tuple[str, ...]  #: e.g. ("-m", "daemon", "run", "--config", "/abs/config.toml")
    log_dir: Path

    @property
    def argv(self) -> list[str]:
        return [self.program, *self.args]


def default_launch(config: Path | None, log_dir: Path, windows: bool | None = None) -> Launch:
    """Run ``python -m daemon run`` with this interpreter (the environment streamv2v is
    installed in), with an absolute config path when one is given."""
    windows = sys.platform == "win32" if windows is None else windows
    program = sys.executable
    if windows:
        candidate = Path(program).with_name("pythonw.exe")
        program = str(candidate) if candidate.exists() else program
    args = ["-m", "daemon", "run"]
    if config is not None:
        args += ["--config", str(Path(config).expanduser().resolve())]
    return Launch(program, tuple(args), log_dir)


class ServiceKind:
    """One platform's service definition."""

    name = ""

    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def path(self) -> Path:
        raise NotImplementedError

    def render(self, launch: Launch) -> str:
        raise NotImplementedError

    def register(self) -> list[list[str]]:
        """Commands that make the service manager load and start it."""
        raise NotImplementedError

    def unregister(self) -> list[list[str]]:
        raise NotImplementedError

    def query(self) -> list[str]:
        """A command that reports the service's state."""
        raise NotImplementedError

    def manager_available(self) -> bool:
        raise NotImplementedError


class SystemdUnit(ServiceKind):
    """``~/.config/systemd/user/streamv2v.service``, enabled with ``systemctl --user``."""

    name = "systemd user unit"

    @property
    def path(self) -> Path:
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(config_home) / "systemd" / "user" / "streamv2v.service"

    def render(self, launch: Launch) -> str:
        command = " ".join(_systemd_quote(a) for a in launch.argv)
        return f"""# {MARKER}; `streamv2v service uninstall` removes it.
[Unit]
Description=streamv2v: real-time diffusion restyling as a virtual camera
# Hotkeys need the graphical session; the camera and the model do not wait for it.
After=graphical-session.target

[Service]
Type=simple
ExecStart={command}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec={RESTART_DELAY_S}
# Exit code {CONFIG_ERROR_EXIT} is a configuration error: restarting would repeat it. Fix the
# file, then: systemctl --user restart streamv2v
RestartPreventExitStatus={CONFIG_ERROR_EXIT}
# Stop within the daemon's own 2 s shutdown, with margin.
TimeoutStopSec=10

[Install]
WantedBy=default.target
"""

    def register(self) -> list[list[str]]:
        return [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", "streamv2v.service"],
        ]

    def unregister(self) -> list[list[str]]:
        return [["systemctl", "--user", "disable", "--now", "streamv2v.service"]]

    def after_unregister(self) -> list[list[str]]:
        return [["systemctl", "--user", "daemon-reload"]]

    def query(self) -> list[str]:
        return ["systemctl", "--user", "status", "--no-pager", "--lines=5", "streamv2v.service"]

    def manager_available(self) -> bool:
        if shutil.which("systemctl") is None:
            return False
        probe = subprocess.run(
            ["systemctl", "--user", "is-system-running"], capture_output=True, text=True
        )
        # "running"/"degraded"/"starting" answer; without a user manager the call fails to
        # connect ("Failed to connect to bus") and prints nothing on stdout.
        return bool(probe.stdout.strip()) and "offline" not in probe.stdout


def _systemd_quote(arg: str) -> str:
    """One ExecStart argument: '%' is a specifier in unit files, quotes and backslashes escape."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in " \t\"'\\;$"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LaunchdAgent(ServiceKind):
    """``~/Library/LaunchAgents/io.github.streamv2v.daemon.plist``, loaded with launchctl."""

    name = "launchd agent"

    @property
    def path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    def render(self, launch: Launch) -> str:
        plist = {
            "Label": LABEL,
            "Comment": MARKER,
            "ProgramArguments": launch.argv,
            "RunAtLoad": True,
            # Restart after a crash, not after a clean stop or a configuration error.
            "KeepAlive": {"SuccessfulExit": False, "Crashed": True},
            "ThrottleInterval": RESTART_DELAY_S,
            "ProcessType": "Interactive",
            "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
            "StandardOutPath": str(launch.log_dir / "launchd.out.log"),
            "StandardErrorPath": str(launch.log_dir / "launchd.err.log"),
        }
        return plistlib.dumps(plist).decode()

    def _domain(self) -> str:
        return f"gui/{os.getuid()}" if hasattr(os, "getuid") else "gui/0"

    def register(self) -> list[list[str]]:
        return [["launchctl", "bootstrap", self._domain(), str(self.path)]]

    def unregister(self) -> list[list[str]]:
        return [["launchctl", "bootout", f"{self._domain()}/{LABEL}"]]

    def after_unregister(self) -> list[list[str]]:
        return []

    def query(self) -> list[str]:
        return ["launchctl", "print", f"{self._domain()}/{LABEL}"]

    def manager_available(self) -> bool:
        return shutil.which("launchctl") is not None


class WindowsTask(ServiceKind):
    """A Task Scheduler task that starts ``pythonw.exe -m daemon run`` at logon (no console)."""

    name = "Task Scheduler logon task"

    @property
    def path(self) -> Path:
        local = os.environ.get("LOCALAPPDATA") or str(self.home / "AppData" / "Local")
        return Path(local) / "streamv2v" / "streamv2v-task.xml"

    def render(self, launch: Launch) -> str:
        arguments = " ".join(_windows_quote(a) for a in launch.args)
        return f"""<?xml version="1.0" encoding="UTF-16"?>
<!-- {escape(MARKER)} -->
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>streamv2v: real-time diffusion restyling as a virtual camera</Description>
    <URI>\\{TASK_NAME}</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>10</Count>
    </RestartOnFailure>
    <Enabled>true</Enabled>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(launch.program)}</Command>
      <Arguments>{escape(arguments)}</Arguments>
    </Exec>
  </Actions>
</Task>
"""

    def register(self) -> list[list[str]]:
        return [
            ["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(self.path), "/F"],
            ["schtasks", "/Run", "/TN", TASK_NAME],
        ]

    def unregister(self) -> list[list[str]]:
        return [
            ["schtasks", "/End", "/TN", TASK_NAME],
            ["schtasks", "/Delete", "/TN", TASK_NAME, "/F"],
        ]

    def after_unregister(self) -> list[list[str]]:
        return []

    def query(self) -> list[str]:
        return ["schtasks", "/Query", "/TN", TASK_NAME, "/V", "/FO", "LIST"]

    def manager_available(self) -> bool:
        return shutil.which("schtasks") is not None

    def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text, encoding="utf-16")  # what schtasks /XML expects


def _windows_quote(arg: str) -> str:
    return subprocess.list2cmdline([arg])


def service_for(platform: str, home: Path) -> ServiceKind:
    """The service kind of ``platform`` (sys.platform values)."""
    if platform.startswith("linux"):
        return SystemdUnit(home)
    if platform == "darwin":
        return LaunchdAgent(home)
    if platform == "win32":
        return WindowsTask(home)
    raise ValueError(f"no service support for {platform!r} (Linux, macOS and Windows are)")


# --------------------------------------------------------------------------- the actions
@dataclass
class Outcome:
    """What an action did, line by line, and whether it fully worked."""

    lines: list[str]
    ok: bool = True


def perform(action: str, config: Path | None, *, dry_run: bool = False) -> Outcome:
    """``streamv2v service ACTION`` (install, uninstall or status) for this platform; with
    ``dry_run`` (install only), the file install would write, changing nothing."""
    try:
        kind = service_for(sys.platform, Path.home())
    except ValueError as err:
        raise UserError(str(err)) from None
    launch = default_launch(config, default_log_file().parent)
    if dry_run:
        if action != "install":
            raise UserError("--dry-run goes with install")
        return Outcome([f"# would write {kind.path}", kind.render(launch).removesuffix("\n")])
    actions = {
        "install": lambda: install(kind, launch),
        "uninstall": lambda: uninstall(kind),
        "status": lambda: status(kind),
    }
    return actions[action]()


def read_text(kind: ServiceKind) -> str | None:
    path = kind.path
    if not path.exists():
        return None
    encoding = "utf-16" if isinstance(kind, WindowsTask) else "utf-8"
    return path.read_text(encoding=encoding)


def install(kind: ServiceKind, launch: Launch, *, run_commands: bool = True) -> Outcome:
    """Write the definition (unless identical) and register it; safe to repeat."""
    text = kind.render(launch)
    existing = read_text(kind)
    lines = []
    if existing is not None and MARKER not in existing:
        return Outcome(
            [f"{kind.path} exists and was not written by streamv2v: move it away first"], False
        )
    if existing == text:
        lines.append(f"{kind.name} already up to date: {kind.path}")
    else:
        if isinstance(kind, WindowsTask):
            kind.write(text)
        else:
            kind.path.parent.mkdir(parents=True, exist_ok=True)
            kind.path.write_text(text, encoding="utf-8")
        lines.append(f"{'updated' if existing else 'wrote'} {kind.name}: {kind.path}")
    launch.log_dir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(lines)
    if run_commands:
        _run_all(kind, kind.register(), outcome, "start it")
    return outcome


def uninstall(kind: ServiceKind, *, run_commands: bool = True) -> Outcome:
    """Unregister and remove exactly the file install wrote."""
    existing = read_text(kind)
    if existing is None:
        return Outcome([f"not installed ({kind.path} does not exist)"])
    if MARKER not in existing:
        return Outcome([f"{kind.path} was not written by streamv2v: left as it is"], False)
    outcome = Outcome([])
    if run_commands:
        _run_all(kind, kind.unregister(), outcome, "stop it", quiet_failure=True)
    kind.path.unlink()
    outcome.lines.append(f"removed {kind.path}")
    if run_commands:
        _run_all(kind, kind.after_unregister(), outcome, "reload", quiet_failure=True)
    return outcome


def status(kind: ServiceKind) -> Outcome:
    existing = read_text(kind)
    if existing is None:
        return Outcome([f"not installed ({kind.name} {kind.path} does not exist)"], False)
    lines = [f"installed: {kind.path}"]
    if MARKER not in existing:
        lines.append("(that file was not written by streamv2v)")
    if kind.manager_available():
        done = subprocess.run(kind.query(), capture_output=True, text=True)
        lines += [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()][:12]
    else:
        lines.append(f"the {kind.name}'s manager is not reachable here: state unknown")
    return Outcome(lines)


def _run_all(
    kind: ServiceKind,
    commands: list[list[str]],
    outcome: Outcome,
    purpose: str,
    *,
    quiet_failure: bool = False,
) -> None:
    if not commands:
        return
    if not kind.manager_available():
        if not quiet_failure:  # (nothing can be running under a manager that is not there)
            shown = " && ".join(" ".join(c) for c in commands)
            outcome.lines.append(
                f"the {kind.name}'s manager is not reachable here; to {purpose} later: {shown}"
            )
        return
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            outcome.lines.append(f"ran: {' '.join(command)}")
        elif not quiet_failure:
            reason = (done.stderr or done.stdout).strip().splitlines()
            outcome.lines.append(
                f"failed: {' '.join(command)}: {reason[-1] if reason else done.returncode}"
            )
            outcome.ok = False
            return
