"""The control API over real HTTP on 127.0.0.1, and the CLI commands that use it."""

from __future__ import annotations

import http.client
import json
import socket
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from daemon.cli import main
from daemon.config import DaemonConfig, load_config
from daemon.control.api import ControlServer
from daemon.styles.presets import PresetLibrary, PresetManager, config_preset


class PresetsOnly:
    """The daemon's control surface over a real preset library and manager (no engine)."""

    def __init__(self) -> None:
        base = DaemonConfig().engine.settings
        self.library = PresetLibrary(None, base, config_preset("a photo", ""))
        self.library.scan()
        self.manager = PresetManager(self.library, "config")
        self.reloads = 0

    def status(self) -> dict[str, Any]:
        return {"preset": self.manager.active}

    def preset_listing(self) -> dict[str, Any]:
        return {"active": self.manager.active, "presets": self.manager.listing(), "errors": {}}

    def select_preset(self, target: str, reason: str) -> str:
        return self.manager.select(target, reason)

    def reload_presets(self) -> dict[str, Any]:
        self.reloads += 1
        return {"presets": list(self.library.presets), "errors": {}}


@pytest.fixture
def server(private_user_dirs):
    api = PresetsOnly()
    srv = ControlServer(api, "127.0.0.1", 0, None)
    srv.start()
    yield srv
    srv.stop()


def request(srv, method, path, body=None, token=None, headers=None, raw=None):
    port = int(srv.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, payload


def test_token_file_is_private_and_names_the_url(server):
    info = json.loads(server.control_file.read_text())
    assert info["url"] == server.url and info["token"] == server.token
    assert stat.S_IMODE(server.control_file.stat().st_mode) == 0o600
    assert server.control_file.is_relative_to(Path(str(server.control_file.parents[1])))


def test_mutating_calls_need_the_token(server):
    assert request(server, "POST", "/preset", {"name": "anime"})[0] == 401
    status, body = request(server, "POST", "/preset", {"name": "anime"}, token="wrong")
    assert status == 401 and "token" in body["error"]
    assert server.api.manager.active == "config"
    status, body = request(server, "POST", "/preset", {"name": "anime"}, token=server.token)
    assert (status, body) == (200, {"active": "anime"})
    assert server.api.manager.active == "anime"
    assert request(server, "POST", "/reload", token="")[0] == 401
    assert request(server, "POST", "/reload", token=server.token)[0] == 200
    assert server.api.reloads == 1


def test_reads_need_no_token(server):
    status, body = request(server, "GET", "/presets")
    assert status == 200 and body["active"] == "config"
    assert {"anime", "passthrough"} <= {p["name"] for p in body["presets"]}
    assert request(server, "GET", "/status") == (200, {"preset": "config"})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'["anime"]', "expected a JSON object"),
        (b'{"name": 3}', "expected a JSON object"),
        (b"", "expected a JSON object"),
    ],
)
def test_malformed_requests_get_400_with_a_reason(server, raw, reason):
    status, body = request(server, "POST", "/preset", token=server.token, raw=raw)
    assert status == 400 and reason in body["error"]
    assert request(server, "GET", "/status")[0] == 200  # still serving


def test_unknown_preset_path_and_method_are_4xx(server):
    status, body = request(server, "POST", "/preset", {"name": "nope"}, token=server.token)
    assert status == 404 and "there are: config, anime" in body["error"]
    status, body = request(server, "GET", "/nope")
    assert status == 404 and "GET /status" in body["error"]
    assert request(server, "GET", "/preset")[0] == 405
    status, body = request(
        server, "POST", "/preset", token=server.token, headers={"Content-Length": "99999999"}
    )
    assert status == 400


def test_a_foreign_host_header_is_refused(server):
    status, body = request(server, "GET", "/status", headers={"Host": "evil.example:80"})
    assert status == 403 and "Host" in body["error"]


def test_listens_on_loopback_only(server):
    assert urlsplit(server.url).hostname == "127.0.0.1"
    with pytest.raises(ValueError, match="loopback"):
        ControlServer(server.api, "0.0.0.0", 0, None)
    with pytest.raises(Exception, match="loopback"):
        load_config(None, {"control": {"host": "0.0.0.0"}})
    other = non_loopback_address()
    if other is not None:  # reachable only through 127.0.0.1, not the machine's other address
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(OSError), socket.create_connection((other, port), timeout=1):
            pass


def non_loopback_address() -> str | None:
    for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        address = info[4][0]
        if not address.startswith("127."):
            return address
    return None


def test_the_token_file_goes_when_the_server_stops(private_user_dirs):
    srv = ControlServer(PresetsOnly(), "127.0.0.1", 0, None)
    srv.start()
    assert srv.control_file.exists()
    srv.stop()
    assert not srv.control_file.exists()


# --------------------------------------------------------------------------- the CLI
def test_cli_switches_and_lists_through_the_running_daemon(server, capsys):
    assert main(["preset", "cyberpunk"]) == 0
    assert "active preset: cyberpunk" in capsys.readouterr().out
    assert server.api.manager.active == "cyberpunk"
    assert main(["preset", "next"]) == 0
    assert server.api.manager.active == "oil-painting"
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "* oil-painting" in out and "  anime" in out and "<ctrl>+<alt>+2" in out
    assert main(["presets", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "oil-painting"
    assert main(["preset", "nope"]) == 2
    assert "404 no preset named 'nope'" in capsys.readouterr().err


def test_cli_without_a_daemon_says_how_to_start_one(private_user_dirs, capsys):
    assert main(["preset", "anime"]) == 2
    err = capsys.readouterr().err
    assert "no running daemon" in err and "streamv2v run" in err
    assert main(["presets"]) == 0  # the files, without an active mark
    captured = capsys.readouterr()
    assert "anime" in captured.out and "*" not in captured.out
    assert "showing the preset files" in captured.err
