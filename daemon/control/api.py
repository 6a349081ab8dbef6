"""The local control API: HTTP + JSON on a loopback address, for the CLI, scripts and the page.

    GET  /status    live figures (JSON)          POST /preset  {"name": NAME|"next"|"prev"}
    GET  /presets   the presets, active marked    POST /reload  re-read the preset files
    GET  /metrics   the figures as Prometheus text
    GET  /          the control page              POST /login-code  a one-time page login link

Changes (POST) need ``Authorization: Bearer TOKEN``, or the page's session cookie with a
same-origin Origin header (see auth.py). The token is made at start and written with the URL to
a file only the user can read (0600), which the CLI reads. The server (server.py) refuses Host
headers that do not name this machine (no DNS rebinding) and answers malformed requests with a
4xx that names the problem.

This module is the API's two ends: :class:`ControlServer` puts it on a port, and :func:`call`
is the client the CLI uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import platformdirs

from daemon.config import APP_NAME, is_loopback
from daemon.control.routes import ControlApi
from daemon.control.server import ControlPlaneServer

__all__ = ["ControlApi", "ControlClientError", "ControlServer", "call", "open_page"]

log = logging.getLogger("streamv2v.control")


def default_control_file() -> Path:
    """Where the daemon writes its URL and token (user config dir, 0600)."""
    return platformdirs.user_config_path(APP_NAME, appauthor=False) / "control.json"


class ControlServer:
    """The control API and the page on ``host:port``, with the token in the control file.

    On its own it runs a server of its own; the daemon passes its one ``server`` (which also
    carries the preview), and then starts and stops that server itself."""

    def __init__(
        self,
        api: ControlApi,
        host: str,
        port: int,
        control_file: Path | None,
        *,
        server: ControlPlaneServer | None = None,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"the control API listens on loopback only, not {host!r}")
        self.api, self.host, self.port = api, host, port
        self.control_file = control_file or default_control_file()
        self._owns_server = server is None
        self.server = server or ControlPlaneServer(api=api, control_file=self.control_file)
        self.server.control_file = self.control_file
        self.token = self.server.auth.token
        self.url = ""

    def start(self) -> None:
        """Listen (OSError when the port is taken), write the control file, serve."""
        self.url = self.server.listen(self.host, self.port)
        write_private(self.control_file, {"url": self.url, "token": self.token, "pid": os.getpid()})
        if self._owns_server:
            self.server.start()
        log.info("control API: %s (token in %s)", self.url, self.control_file)
        log.info("control page: %s/ (log the browser in with: streamv2v open)", self.url)

    def stop(self) -> None:
        if self._owns_server:
            self.server.stop()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.control_file.read_text()).get("token") == self.token:
                self.control_file.unlink()  # only our own file: another daemon may have started


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON readable by the user only (0600), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the client side
class ControlClientError(Exception):
    """The daemon could not be reached or refused the call; the message says what to do."""


def call(
    method: str, path: str, body: Any = None, *, control_file: Path | None = None
) -> dict[str, Any]:
    """One API call to the running daemon found through its control file."""
    file = control_file or default_control_file()
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
        url, token = info["url"], info["token"]
    except FileNotFoundError:
        raise ControlClientError(
            f"no running daemon ({file} not found); start it with: streamv2v run"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ControlClientError(f"{file}: unreadable control file ({err})") from None
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            reason = err.reason
        raise ControlClientError(f"{method} {path}: {err.code} {reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ControlClientError(
            f"the daemon at {url} does not answer ({err}); is it running? (streamv2v run)"
        ) from None


def open_page(login_link: str, print_only: bool) -> tuple[bool, str]:
    """`streamv2v open`: hand the one-time login link (POST /login-code) to the browser, which
    lands on the page with its session cookie. Returns (opened, link); the link is for the
    terminal when no browser could be started (it works once, within a minute, and the token
    itself never leaves the control file)."""
    if print_only:
        return False, login_link
    import webbrowser

    try:
        return webbrowser.open(login_link), login_link
    except webbrowser.Error:
        return False, login_link
