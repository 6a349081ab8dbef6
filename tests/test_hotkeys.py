"""Global hotkeys with a real X server (a private Xvfb) and real key events (xdotool).

pynput checks the X connection while it is imported, so the scenarios that need pynput to be
imported without a display run in a fresh interpreter; the rest share one Xvfb in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.integrations import hotkeys as hotkeys_module
from daemon.integrations.hotkeys import HotkeyListener, wayland_session

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("xdotool")),
    reason="needs Xvfb and xdotool (Debian packages xvfb, xdotool)",
)

REPO = Path(__file__).resolve().parents[1]
# -noreset: by default Xvfb resets when its last client leaves, and a client connecting
# meanwhile (the next test's listener) gets "Connection reset by peer".
XVFB_OPTIONS = ("-screen", "0", "640x480x24", "-nolisten", "tcp", "-noreset")


class Xvfb:
    """A private X server in its own process group, on a free display number (or on a given
    one, to bring a killed server back on the same DISPLAY)."""

    def __init__(self, number: str | None = None) -> None:
        read_end, write_end = os.pipe()
        display_arg = [f":{number}"] if number is not None else []
        self.process = subprocess.Popen(
            ["Xvfb", *display_arg, "-displayfd", str(write_end), *XVFB_OPTIONS],
            pass_fds=(write_end,),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_end)
        # Xvfb writes its display number once it accepts connections; EOF means it died.
        with os.fdopen(read_end) as numbers:
            self.number = numbers.readline().strip()
        if not self.number:
            self.process.wait(5)
            raise RuntimeError(f"Xvfb did not start (exit status {self.process.returncode})")
        self.display = f":{self.number}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    server = Xvfb()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def on_display(xvfb: Xvfb, monkeypatch: pytest.MonkeyPatch) -> Xvfb:
    monkeypatch.setenv("DISPLAY", xvfb.display)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("XDG_SESSION_TYPE", raising=False)
    return xvfb


@pytest.fixture(autouse=True)
def wayland_note_not_said_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Wayland note is said once per process; each test is a process of its own here."""
    monkeypatch.setattr(hotkeys_module, "_wayland_note", threading.Lock())


class LogLines(logging.Handler):
    """The messages the hotkeys logger emits (its own handler: the daemon's logging setup may
    stop records from reaching pytest's root handler)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    logger = logging.getLogger("streamv2v.hotkeys")
    handler, old_level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def thread_crashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Exceptions that escape any thread (pynput's or the watchdog) while the test runs."""
    crashes: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: crashes.append(f"{args.thread}: {args.exc_value!r}")
    )
    return crashes


def press(display: str, keys: str) -> None:
    """Send real key events (press and release) to ``display``, as a user would type them."""
    env = {**os.environ, "DISPLAY": display}
    subprocess.run(["xdotool", "key", keys], env=env, check=True, timeout=10)


def wait_for(condition: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Calls:
    """Actions that record which one ran, when, and on which thread."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.threads: list[threading.Thread] = []
        self.times: list[float] = []

    def action(self, name: str) -> Callable[[], None]:
        def record() -> None:
            self.names.append(name)
            self.threads.append(threading.current_thread())
            self.times.append(time.monotonic())

        return record


def test_bound_combo_fires_within_a_second_and_unbound_does_not(on_display, log_lines):
    calls = Calls()
    hotkeys = HotkeyListener(
        {"<ctrl>+<alt>+1": calls.action("one"), "<ctrl>+<alt>+2": calls.action("two")}
    )
    assert hotkeys.state == "off"
    try:
        assert hotkeys.start() is True
        assert hotkeys.state == "listening"
        # Events arrive in order: once ctrl+alt+1 fired, ctrl+alt+3 (sent first) had its turn.
        press(on_display.display, "ctrl+alt+3")
        sent = time.monotonic()
        press(on_display.display, "ctrl+alt+1")
        assert wait_for(lambda: calls.names, 1.0), "ctrl+alt+1 did not fire within 1 s"
        assert calls.names == ["one"]
        assert calls.times[0] - sent < 1.0
        assert calls.threads[0] is not threading.main_thread()  # pynput's thread
        pynput_thread = calls.threads[0]
    finally:
        hotkeys.stop()
    assert hotkeys.state == "off"
    assert not pynput_thread.is_alive()
    assert log_lines.at(logging.WARNING) == [] and log_lines.at(logging.ERROR) == []


def test_update_switches_combos_and_restarts_only_when_they_change(on_display):
    calls = Calls()
    hotkeys = HotkeyListener({"<ctrl>+<alt>+1": calls.action("old")})
    try:
        assert hotkeys.start()
        press(on_display.display, "ctrl+alt+1")
        assert wait_for(lambda: calls.names == ["old"], 1.0)

        # Same combo, new action: no restart, the same pynput thread runs the new action.
        hotkeys.update({"<ctrl>+<alt>+1": calls.action("renamed")})
        press(on_display.display, "ctrl+alt+1")
        assert wait_for(lambda: len(calls.names) == 2, 1.0)
        assert calls.names[1] == "renamed"
        assert calls.threads[1] is calls.threads[0]

        # Another combo: a new listener; the old combo no longer fires.
        hotkeys.update({"<ctrl>+<alt>+2": calls.action("new")})
        assert hotkeys.state == "listening"
        press(on_display.display, "ctrl+alt+1")
        press(on_display.display, "ctrl+alt+2")
        assert wait_for(lambda: len(calls.names) == 3, 1.0), "the new combo did not fire"
        assert calls.names[2] == "new"
        assert calls.threads[2] is not calls.threads[0]
        assert not calls.threads[0].is_alive()
    finally:
        hotkeys.stop()


def test_an_action_that_raises_is_logged_and_the_listener_keeps_going(on_display, log_lines):
    calls = Calls()
    record = calls.action("ran")

    def fail_the_first_time() -> None:
        record()
        if len(calls.names) == 1:
            raise RuntimeError("preset file vanished")

    hotkeys = HotkeyListener({"<ctrl>+<alt>+1": fail_the_first_time})
    try:
        assert hotkeys.start()
        press(on_display.display, "ctrl+alt+1")
        assert wait_for(lambda: len(calls.names) == 1, 1.0)
        press(on_display.display, "ctrl+alt+1")
        assert wait_for(lambda: len(calls.names) == 2, 1.0), "the listener died after raising"
        assert calls.threads[1] is calls.threads[0]
        assert hotkeys.state == "listening"
    finally:
        hotkeys.stop()
    errors = log_lines.at(logging.ERROR)
    assert len(errors) == 1
    assert "<ctrl>+<alt>+1" in errors[0] and "preset file vanished" in errors[0]


def test_wayland_without_display_says_xwayland_is_needed(monkeypatch, log_lines):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    if not sys.platform.startswith("linux"):
        pytest.skip("DISPLAY/WAYLAND_DISPLAY matter on Linux only")
    hotkeys = HotkeyListener({"<ctrl>+<alt>+1": lambda: None})
    assert hotkeys.start() is False
    assert hotkeys.state == "unavailable"
    [line] = [r.getMessage() for r in log_lines.records]
    assert "Wayland" in line and "XWayland" in line and "DISPLAY" in line


WAYS = ("`streamv2v obs-script`", "`streamv2v preset NAME|next|prev`", "desktop's settings")


def test_a_wayland_session_is_told_once_what_works_instead(monkeypatch, log_lines):
    if not sys.platform.startswith("linux"):
        pytest.skip("Wayland is a Linux matter")
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_SESSION_TYPE", "wayland")  # as GNOME and KDE set it
    for _ in range(3):  # each config reload starts a new listener: the note is not repeated
        assert HotkeyListener({"<ctrl>+<alt>+1": lambda: None}).start() is False
    [line] = [r.getMessage() for r in log_lines.records]
    assert line.startswith("global hotkeys need X11 and this Wayland session has none usable")
    assert all(way in line for way in WAYS), line


def test_elsewhere_a_missing_display_is_said_at_each_start(monkeypatch, log_lines):
    if not sys.platform.startswith("linux"):
        pytest.skip("DISPLAY matters on Linux only")
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_SESSION_TYPE", "tty")  # e.g. a service or an SSH session
    for _ in range(2):
        assert HotkeyListener({"<ctrl>+<alt>+1": lambda: None}).start() is False
    lines = log_lines.at(logging.WARNING)
    assert len(lines) == 2 and all("no DISPLAY is set" in line for line in lines)
    assert not any("obs-script" in line for line in lines)


def test_through_xwayland_hotkeys_listen_and_the_note_says_where_they_fail(
    on_display, log_lines, monkeypatch
):
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")  # Xvfb plays XWayland's part
    listener = HotkeyListener({"<ctrl>+<alt>+1": lambda: None})
    try:
        assert listener.start() is True
    finally:
        listener.stop()
    [line] = log_lines.at(logging.INFO)
    assert "only while an X11 (XWayland) window has focus" in line
    assert all(way in line for way in WAYS), line


def test_wayland_session_detection():
    assert wayland_session({"XDG_SESSION_TYPE": "wayland"}) is sys.platform.startswith("linux")
    assert wayland_session({"WAYLAND_DISPLAY": "wayland-0"}) is sys.platform.startswith("linux")
    assert wayland_session({"XDG_SESSION_TYPE": "x11", "DISPLAY": ":0"}) is False
    assert wayland_session({}) is False


# Runs in a fresh interpreter: pynput must not have been imported with a working display.
UNAVAILABLE_THEN_BACK = """
import json, logging, os, subprocess, sys, time
from daemon.integrations import hotkeys as hotkeys_module
from daemon.integrations.hotkeys import HotkeyListener, wayland_session

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logger = logging.getLogger("streamv2v.hotkeys")
logger.addHandler(handler)
logger.setLevel(logging.DEBUG)
live_display, dead_display = sys.argv[1:3]
fired = []
hotkeys = HotkeyListener({"<ctrl>+<alt>+1": lambda: fired.append(1)})
result = {}

def attempt(name):
    del lines[:]
    started = hotkeys.start()
    result[name] = {"started": started, "state": hotkeys.state, "lines": list(lines),
                    "pynput_imported": "pynput.keyboard" in sys.modules}

os.environ.pop("DISPLAY", None)
attempt("no_display")
os.environ["DISPLAY"] = dead_display
attempt("refused")
os.environ["DISPLAY"] = live_display
attempt("display_appeared")
subprocess.run(["xdotool", "key", "ctrl+alt+1"], check=True, timeout=10)
deadline = time.monotonic() + 1
while not fired and time.monotonic() < deadline:
    time.sleep(0.01)
result["fired"] = len(fired)
hotkeys.stop()
print(json.dumps(result))
"""


def run_scenario(script: str, *args: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


def free_display_number() -> str:
    """A display number no X server listens on (for a refused connection)."""
    for number in range(600, 700):
        if (
            not Path(f"/tmp/.X11-unix/X{number}").exists()
            and not Path(f"/tmp/.X{number}-lock").exists()
        ):
            return str(number)
    pytest.skip("no free display number")


def test_no_display_then_refused_then_a_later_start_works(xvfb):
    result = run_scenario(UNAVAILABLE_THEN_BACK, xvfb.display, f":{free_display_number()}")

    no_display = result["no_display"]
    assert no_display["started"] is False and no_display["state"] == "unavailable"
    assert len(no_display["lines"]) == 1
    assert "DISPLAY" in no_display["lines"][0] and "X session" in no_display["lines"][0]

    # pynput's import fails on the refused X connection, half-way through pynput's modules.
    refused = result["refused"]
    assert refused["started"] is False and refused["state"] == "unavailable"
    assert len(refused["lines"]) == 1 and "cannot connect" in refused["lines"][0]
    assert refused["pynput_imported"] is False

    # ... and importing it again once a display works succeeds: nothing stale was kept.
    back = result["display_appeared"]
    assert back == {"started": True, "state": "listening", "lines": [], "pynput_imported": True}
    assert result["fired"] == 1
    assert "Traceback" not in result["stderr"]


def test_without_pynput_start_says_to_install_it(xvfb):
    script = """
import json, logging, sys
sys.modules["pynput"] = None  # as if not installed
from daemon.integrations import hotkeys as hotkeys_module
from daemon.integrations.hotkeys import HotkeyListener, wayland_session
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("streamv2v.hotkeys").addHandler(handler)
hotkeys = HotkeyListener({"<ctrl>+<alt>+1": lambda: None})
print(json.dumps({"started": hotkeys.start(), "state": hotkeys.state, "lines": lines}))
"""
    result = run_scenario(script, DISPLAY=xvfb.display)
    assert result["started"] is False and result["state"] == "unavailable"
    assert len(result["lines"]) == 1 and "pip install" in result["lines"][0]


def test_x_server_death_is_noticed_and_hotkeys_come_back(monkeypatch, log_lines, thread_crashes):
    server = Xvfb()
    calls = Calls()
    hotkeys = HotkeyListener({"<ctrl>+<alt>+1": calls.action("one")}, retry_interval_s=0.2)
    try:
        monkeypatch.setenv("DISPLAY", server.display)
        assert hotkeys.start()
        server.kill()
        assert wait_for(lambda: hotkeys.state == "lost", 5.0), hotkeys.state
        [warning] = log_lines.at(logging.WARNING)
        assert "lost" in warning

        # Retries are quiet while the server is away (several retry intervals pass here) ...
        time.sleep(0.6)
        assert hotkeys.state == "lost" and len(log_lines.at(logging.WARNING)) == 1
        # ... and once it is back on the same display, so are the hotkeys, with one line.
        server = Xvfb(server.number)
        assert wait_for(lambda: hotkeys.state == "listening", 5.0), hotkeys.state
        assert log_lines.at(logging.INFO) == ["global hotkeys are back"]
        press(server.display, "ctrl+alt+1")
        assert wait_for(lambda: calls.names == ["one"], 1.0)
    finally:
        hotkeys.stop()
        server.kill()
    assert len(log_lines.at(logging.WARNING)) == 1
    assert log_lines.at(logging.ERROR) == []
    assert thread_crashes == []
