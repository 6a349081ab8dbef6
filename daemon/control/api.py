"""The local control API: HTTP + JSON on a loopback address, for the CLI and scripts.

    GET  /status    live figures (JSON)          POST /preset  {"name": NAME|"next"|"prev"}
    GET  /presets   the presets, active marked    POST /reload  re-read the preset files
    GET  /metrics   the figures as Prometheus text

Mutating calls (POST) need ``Authorization: Bearer TOKEN``. The token is made at start and
written with the URL to a file only the user can read (0600), which the CLI reads. Requests whose
Host header is not a loopback name are refused, so a web page cannot reach the API through DNS
rebinding; a malformed request gets a 4xx with the reason, never a crash.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import platformdirs

from daemon.config import APP_NAME, is_loopback
from daemon.control.presets import UnknownPreset

log = logging.getLogger("streamv2v.control")

_MAX_BODY = 64 * 1024
_JSON = "application/json"


class ControlApi(Protocol):
    """What the daemon offers the API."""

    def status(self) -> dict[str, Any]: ...

    def preset_listing(self) -> dict[str, Any]: ...

    def select_preset(self, target: str, reason: str) -> str: ...

    def reload_presets(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...


def default_control_file() -> Path:
    """Where the daemon writes its URL and token (user config dir, 0600)."""
    return platformdirs.user_config_path(APP_NAME, appauthor=False) / "control.json"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class ControlServer:
    """Serves :class:`ControlApi` on ``host:port`` in a thread of its own."""

    def __init__(self, api: ControlApi, host: str, port: int, control_file: Path | None) -> None:
        if not is_loopback(host):
            raise ValueError(f"the control API listens on loopback only, not {host!r}")
        self.api = api
        self.control_file = control_file or default_control_file()
        self.token = secrets.token_urlsafe(32)
        address = host.strip("[]")
        server_class = _Ipv6Server if ":" in address else ThreadingHTTPServer
        self._server = server_class((address, port), self._handler_class())
        self._server.daemon_threads = True
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="control", daemon=True
        )

    def start(self) -> None:
        write_private(self.control_file, {"url": self.url, "token": self.token, "pid": os.getpid()})
        self._thread.start()
        log.info("control API: %s (token in %s)", self.url, self.control_file)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.control_file.read_text()).get("token") == self.token:
                self.control_file.unlink()  # only our own file: another daemon may have started

    # ------------------------------------------------------------------ requests
    def _route(self, method: str, path: str, body: Any) -> tuple[HTTPStatus, Any]:
        api = self.api
        routes: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "/status"): lambda: api.status(),
            ("GET", "/presets"): lambda: api.preset_listing(),
            ("GET", "/metrics"): lambda: api.metrics_text(),
            ("POST", "/preset"): lambda: {"active": self._select(body)},
            ("POST", "/reload"): lambda: api.reload_presets(),
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
            known = ", ".join(sorted({f"{m} {p}" for m, p in routes}))
            raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {path}; there are: {known}")
        return HTTPStatus.OK, handler()

    def _select(self, body: Any) -> str:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, 'expected a JSON object {"name": PRESET|"next"|"prev"}'
            )
        try:
            return self.api.select_preset(name, "control API")
        except UnknownPreset as err:
            raise ApiError(HTTPStatus.NOT_FOUND, str(err)) from None

    def _authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), self.token)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "streamv2v"
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def _handle(self, method: str) -> None:
                try:
                    status, payload = self._answer(method)
                except ApiError as err:
                    status, payload = err.status, {"error": err.reason}
                except Exception as err:  # a bug must not take the API down
                    log.exception("control API: %s %s failed", method, self.path)
                    status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(err)}
                self._reply(status, payload)

            def _answer(self, method: str) -> tuple[HTTPStatus, Any]:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                if not is_loopback(host):
                    raise ApiError(HTTPStatus.FORBIDDEN, "the Host header must name this machine")
                body = self._body()
                if method != "GET" and not server._authorized(self.headers.get("Authorization")):
                    raise ApiError(
                        HTTPStatus.UNAUTHORIZED,
                        f"missing or wrong token: send 'Authorization: Bearer TOKEN' with the "
                        f"token from {server.control_file}",
                    )
                return server._route(method, self.path.split("?", 1)[0], body)

            def _body(self) -> Any:
                length = self.headers.get("Content-Length")
                if not length:
                    return None
                if not length.isdigit() or int(length) > _MAX_BODY:
                    self.close_connection = True
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"body must be at most {_MAX_BODY} B")
                raw = self.rfile.read(int(length))
                try:
                    return json.loads(raw) if raw.strip() else None
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {err}") from None

            def _reply(self, status: HTTPStatus, payload: Any) -> None:
                if isinstance(payload, str):  # /metrics
                    data, kind = payload.encode(), "text/plain; version=0.0.4; charset=utf-8"
                else:
                    data, kind = (json.dumps(payload, default=str) + "\n").encode(), _JSON
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                if status == HTTPStatus.UNAUTHORIZED:
                    self.send_header("WWW-Authenticate", 'Bearer realm="streamv2v"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("control API: " + format, *args)  # never the Authorization header

        return Handler


class _Ipv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


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
