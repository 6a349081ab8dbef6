"""The OBS script's side of the daemon (see streamv2v_obs.py): finding the running daemon as the
CLI does, calling its control API, and the worker thread that does all of that off OBS's threads.

Standard library only, no obspython: OBS's embedded Python has no third-party packages, and
this part is tested without OBS. It is copied next to streamv2v_obs.py when installed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import queue
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_NAME = "streamv2v"
HTTP_TIMEOUT_S = 0.5  # every call goes to this machine: a daemon that needs longer is stuck
POLL_S = 1.0  # how often the worker refreshes the daemon's state
MAX_REPLY_BYTES = 1 << 20
NOT_RUNNING = "daemon not running: start it with `streamv2v run`"
PRESET_PREFIX = "streamv2v.preset."


# --------------------------------------------------------------------------- finding the daemon
def default_control_file(env: dict[str, str] | None = None, platform: str = sys.platform) -> Path:
    """Where the daemon writes control.json by default: the user config dir by platformdirs'
    rules (which this file can not import): ``$XDG_CONFIG_HOME`` when absolute, else ~/.config
    on Linux, ~/Library/Application Support on macOS; %LOCALAPPDATA% on Windows."""
    env = os.environ if env is None else env
    # A Flatpak OBS sets XDG_CONFIG_HOME to its own sandbox folder; the daemon runs outside it.
    xdg = "" if env.get("FLATPAK_ID") else env.get("XDG_CONFIG_HOME", "")
    if platform == "win32":
        base = env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif posixpath.isabs(xdg):
        base = xdg
    elif platform == "darwin":
        base = str(Path.home() / "Library" / "Application Support")
    else:
        base = str(Path.home() / ".config")
    return Path(base) / APP_NAME / "control.json"


def configured_control_file(config_toml: Path) -> Path | None:
    """``[control] token_file`` from the daemon's config.toml, when it sets one."""
    try:
        import tomllib  # Python 3.11+; with an older OBS Python only the default place is known
    except ModuleNotFoundError:
        return None
    try:
        with config_toml.open("rb") as f:
            value = tomllib.load(f).get("control", {}).get("token_file")
    except (OSError, ValueError, AttributeError):  # missing or broken: the daemon says why
        return None
    return Path(value).expanduser() if isinstance(value, str) and value else None


def find_control_file(override: str = "", env: dict[str, str] | None = None) -> Path:
    """As the CLI finds it: the panel's "Control file" when set, else the default config's
    ``control.token_file``, else the default place."""
    if override.strip():
        return Path(override.strip()).expanduser()
    default = default_control_file(env)
    return configured_control_file(default.with_name("config.toml")) or default


class DaemonUnavailable(Exception):
    """No daemon to talk to (or not the one the file names); the message says what to do."""


class RequestRefused(Exception):
    """The daemon said no (e.g. an unknown preset); the message is its reason."""


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_control_file(path: Path) -> tuple[str, str]:
    """The daemon's URL and token; a missing daemon or a bad file is explained."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        url, token = info["url"], info["token"]
    except FileNotFoundError:
        raise DaemonUnavailable(f"{NOT_RUNNING} (no {path})") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DaemonUnavailable(
            f"{path}: unreadable control file ({err}); restart the daemon (streamv2v run)"
        ) from None
    parts = urllib.parse.urlsplit(url if isinstance(url, str) else "")
    if parts.scheme != "http" or not is_loopback(parts.hostname or ""):
        # The token must never leave this machine, whatever the file says.
        raise DaemonUnavailable(f"{path}: the control URL {url!r} is not on this machine")
    if not isinstance(token, str) or not token:
        raise DaemonUnavailable(f"{path}: no token in it; restart the daemon (streamv2v run)")
    return url.rstrip("/"), token


class ControlClient:
    """The control API of the daemon named by ``control_file``, re-read on each call (a
    restarted daemon has a new port and token)."""

    def __init__(self, control_file: Path, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.control_file = control_file
        self.timeout = timeout
        # No proxy, whatever the environment says: a proxy would receive the token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        url, token = read_control_file(self.control_file)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read(MAX_REPLY_BYTES))
        except urllib.error.HTTPError as err:
            if err.code == 401:
                err.close()
                raise DaemonUnavailable(
                    f"the daemon at {url} refused the token in {self.control_file} (a stale "
                    "file of another daemon?): restart it (streamv2v run)"
                ) from None
            raise RequestRefused(_error_reason(err)) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise DaemonUnavailable(
                f"{NOT_RUNNING} ({url}: {getattr(err, 'reason', err)})"
            ) from None


def _error_reason(err: urllib.error.HTTPError) -> str:
    """The API's {"error": ...} text, else the HTTP status."""
    with err:
        try:
            return str(json.loads(err.read(MAX_REPLY_BYTES))["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"{err.code} {err.reason}"


# --------------------------------------------------------------------------- what the panel shows
@dataclass(frozen=True)
class DaemonState:
    """One snapshot of the daemon, replaced as a whole by the worker (readers need no lock)."""

    connected: bool = False
    problem: str = "asking the daemon..."
    status: dict[str, Any] = field(default_factory=dict)
    presets: tuple[dict[str, Any], ...] = ()

    @property
    def active(self) -> str | None:
        return self.status.get("preset") if self.connected else None

    @property
    def preset_names(self) -> tuple[str, ...]:
        return tuple(p["name"] for p in self.presets)


def summary_text(state: DaemonState) -> str:
    """The panel's state: connected, active preset, fps, p95; or what is wrong."""
    if not state.connected:
        return state.problem
    s = state.status
    fps, p95 = (s.get("fps") or {}).get("output"), (s.get("latency_ms") or {}).get("p95")
    return "\n".join(
        [
            f"connected to the daemon at {s.get('control_url') or '?'}",
            f"preset: {s.get('preset')}{'  (switching)' if s.get('switching') else ''}",
            f"output: {_number(fps, ' fps', '.1f')}, glass-to-glass p95 {_number(p95, ' ms')}",
            f"engine: {s.get('engine', '?')}, camera: {s.get('camera', '?')}",
        ]
    )


def _number(value: Any, unit: str, spec: str = ".0f") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, (int, float)) else "-"


# --------------------------------------------------------------------------- hotkeys
@dataclass(frozen=True)
class HotkeySpec:
    name: str  # OBS's id for it; its bindings are saved under this name
    description: str  # what Settings -> Hotkeys shows
    action: str  # "preset" (select ``target``), "passthrough" (toggle) or "add_source"
    target: str = ""  # for "preset": a preset name, "next" or "prev"


#: The hotkeys of every daemon, in the order Settings -> Hotkeys lists them.
FIXED_HOTKEYS = (
    HotkeySpec("streamv2v.next", "streamv2v: next preset", "preset", "next"),
    HotkeySpec("streamv2v.prev", "streamv2v: previous preset", "preset", "prev"),
    HotkeySpec("streamv2v.passthrough", "streamv2v: passthrough on/off", "passthrough"),
    HotkeySpec("streamv2v.add_source", "streamv2v: add/fix the output source", "add_source"),
)


def hotkey_plan(preset_names: list[str] | tuple[str, ...]) -> list[HotkeySpec]:
    """The fixed hotkeys, then one per preset (in the daemon's order, each name once)."""
    presets = [
        HotkeySpec(PRESET_PREFIX + name, f"streamv2v: preset {name}", "preset", name)
        for name in dict.fromkeys(preset_names)
    ]
    return [*FIXED_HOTKEYS, *presets]


def presets_to_remember(
    registered: list[str], daemon_presets: list[str] | None, bound: set[str]
) -> list[str]:
    """The presets whose hotkeys the next start registers before the daemon answers: those the
    daemon has and those with a key bound (their preset may come back); with no daemon to ask,
    all of them."""
    if daemon_presets is None:
        return list(registered)
    return [name for name in registered if name in daemon_presets or name in bound]


def passthrough_target(
    presets: tuple[dict[str, Any], ...], active: str | None, last_styled: str | None
) -> str:
    """The passthrough hotkey toggles: to the first passthrough preset, or, when one is active,
    back to the last styled preset (or the first)."""
    passthrough = [p["name"] for p in presets if p.get("passthrough")]
    styled = [p["name"] for p in presets if not p.get("passthrough")]
    if not passthrough:
        raise RequestRefused("the daemon has no passthrough preset (passthrough = true)")
    if active not in passthrough:
        return passthrough[0]
    if not styled:
        raise RequestRefused("the daemon has no styled preset to go back to")
    return last_styled if last_styled in styled else styled[0]


# --------------------------------------------------------------------------- the preview source
def preview_stream(status: dict[str, Any]) -> tuple[str, float]:
    """The preview's MJPEG URL and the frame rate OBS must be told (without it the MJPEG
    demuxer assumes 25 fps and falls behind a faster stream)."""
    base = status.get("preview_url")
    if not base:
        raise RequestRefused(
            "the daemon's preview is off: set output.preview.enabled = true and restart it"
        )
    # An older daemon does not say its output_fps: its measured rate, rounded, is the next best.
    fps = status.get("output_fps") or round((status.get("fps") or {}).get("output") or 0) or 30
    return urllib.parse.urljoin(base, "stream.mjpg"), float(fps)


def media_source_settings(url: str, fps: float) -> dict[str, Any]:
    """A Media Source (ffmpeg_source) reading the preview with the least delay."""
    return {
        "is_local_file": False,
        "input": url,
        "input_format": "mjpeg",
        "ffmpeg_options": f"framerate={fps:g}",
        "reconnect_delay_sec": 1,
        "buffering_mb": 0,
        "restart_on_activate": False,
        "close_when_inactive": False,
        "hw_decode": False,
        "clear_on_media_end": False,
    }


# --------------------------------------------------------------------------- the worker thread
@dataclass
class Job:
    action: str  # "preset" (select ``target``), "passthrough" (toggle) or "refresh"
    target: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The one thread that does HTTP. OBS's threads submit jobs and read ``state``; lines for
    OBS's log wait in ``messages`` as (level, text), level "info" or "warning"."""

    def __init__(self, client: ControlClient, poll_s: float = POLL_S) -> None:
        self.client, self.poll_s = client, poll_s
        self.state = DaemonState()
        self.messages: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._last_styled: str | None = None
        self._thread = threading.Thread(target=self._run, name="streamv2v-obs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, action: str, target: str = "") -> threading.Event:
        """Queue a job; the event is set once it is done and the state refreshed."""
        job = Job(action, target)
        self._jobs.put(job)
        return job.done

    def _run(self) -> None:
        job: Job | None = Job("refresh")  # at once: OBS shows the state as soon as it loads us
        while job is not None:
            try:
                if job.action != "refresh":
                    self._select(job.action, job.target)
                self.refresh()
            except Exception as err:  # a bug must not end the thread (nor print: see the top)
                self.messages.put(("warning", f"unexpected error: {err!r}"))
            finally:
                job.done.set()
            try:
                job = self._jobs.get(timeout=self.poll_s)
            except queue.Empty:
                job = Job("refresh")

    def refresh(self) -> None:
        try:
            status = self.client.call("GET", "/status")
            presets = tuple(self.client.call("GET", "/presets")["presets"])
            state = DaemonState(True, "", status, presets)
            passthrough = {p["name"] for p in presets if p.get("passthrough")}
        except (DaemonUnavailable, RequestRefused) as err:
            state, passthrough = DaemonState(False, str(err)), set()
        except (KeyError, TypeError, AttributeError) as err:  # JSON of another shape
            state, passthrough = (
                DaemonState(False, f"unexpected answer from the daemon: {err!r}"),
                set(),
            )
        if (state.connected, state.problem) != (self.state.connected, self.state.problem):
            self.messages.put(
                ("info", "connected to the daemon" if state.connected else state.problem)
            )
        if state.active and state.active not in passthrough:
            self._last_styled = state.active
        self.state = state

    def _select(self, action: str, target: str) -> None:
        try:
            if action == "passthrough":
                self.refresh()  # the toggle depends on what is active now
                if not self.state.connected:
                    raise DaemonUnavailable(self.state.problem)
                target = passthrough_target(
                    self.state.presets, self.state.active, self._last_styled
                )
            active = self.client.call("POST", "/preset", {"name": target}).get("active")
            self.messages.put(("info", f"preset: {active}"))
        except DaemonUnavailable as err:  # harmless: the panel says the same
            self.messages.put(("info", f"{target or action}: {err}"))
        except RequestRefused as err:
            self.messages.put(("warning", f"{target or action}: {err}"))
