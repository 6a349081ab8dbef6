"""Five failures seen from outside (issue 23), each on the real part that had it: a camera file
that is not there, the demo that dropped the user's camera, a FIFO in the presets folder, the
fallback when the active preset's file is deleted, and aiohttp's own error answers (which
echoed the request's bytes, token included) on both servers."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp import web
from http_helpers import exchange
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.cli import main
from daemon.config import load_config
from daemon.runner import read_usable

# --------------------------------------------------------------------------- camera.source


def test_a_camera_file_that_is_not_there_exits_2_naming_camera_source(tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    # --duration: today's main ran the whole time on "camera unavailable" and exited 0.
    settings = ["--set", "engine.model=tiny", "--set", f"camera.source='{missing}'"]
    assert main(["run", "--duration", "3", *settings]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert "camera.source" in err and str(missing) in err and "no such video file" in err
    assert main(["run", "--duration", "3", "--set", f"camera.source='{tmp_path}'"]) == 2
    assert "is a folder" in capsys.readouterr().err

    # An absent device may be plugged in later: it is still waited for.
    for device in (7, "/dev/video97"):
        config, _ = read_usable(lambda d=device: load_config(None, {"camera": {"source": d}}))
        assert config.camera.source == device


def write_clip(path: Path, frames: int = 10) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (20 * i, 200, 30), np.uint8))
    writer.release()
    return path


def test_the_demo_keeps_the_camera_the_user_names(tmp_path, memory_vcam, caplog):
    clip = write_clip(tmp_path / "clip.avi")
    config, notes = read_usable(
        lambda: load_config(None, {"demo": True, "camera": {"source": str(clip)}})
    )
    assert config.camera.source == str(clip)
    assert config.engine.model in ("tiny-styles", "tiny")  # the rest of the demo applies
    assert any(f"camera.source as set (video file {clip})" in note for note in notes), notes
    # Without a camera of the user's, the demo's generated one.
    generated, _ = read_usable(lambda: load_config(None, {"demo": True}))
    assert generated.camera.source in ("scene", "testpattern")

    data = config.model_dump()
    data["output"]["preview"]["port"] = data["control"]["port"] = 0
    data["hotkeys"]["enabled"] = False
    daemon = Daemon(type(config).model_validate(data))
    caplog.set_level(logging.INFO, "streamv2v")
    daemon.start()
    try:  # the clip's frames, not a generated scene, reach the engine's input
        assert wait_for(lambda: daemon.camera.frames_read > 3, 20), daemon.status()
        assert daemon.camera.state == "live"
    finally:
        daemon.stop()
    assert f"camera live: video file {clip}" in caplog.text


# --------------------------------------------------------------------------- presets folder
def preset(path: Path, prompt: str) -> Path:
    path.write_text(f'prompt = "{prompt}"\n')
    return path


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    preset(folder / "mine.toml", "a startup style")
    cfg = demo_config(tiny_model, presets={"dir": str(folder), "startup": "mine"})
    data = cfg.model_dump()
    data["presets"]["reload_interval_s"] = 0.1
    data["control"]["token_file"] = str(tmp_path_factory.mktemp("control") / "control.json")
    daemon = Daemon(type(cfg).model_validate(data))
    daemon.start()
    yield daemon, folder
    daemon.stop()


def get_json(url: str, timeout: float = 3.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def unblock(fifo: Path) -> None:
    """Give a reader stuck on the FIFO (the bug) its end of file, so the daemon can stop."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as err:
        assert err.errno == errno.ENXIO  # nobody reading it: nothing is stuck


def test_a_fifo_in_the_presets_folder_is_skipped_with_one_line(daemon, caplog):
    daemon, folder = daemon
    caplog.set_level(logging.INFO, "streamv2v.presets")
    fifo = folder / "blocked.toml"
    os.mkfifo(fifo)
    preset(folder / "after.toml", "added after the fifo")
    try:
        assert wait_for(lambda: "after" in daemon.library.presets, 5)
        for _ in range(3):  # answered at once, scan after scan
            listing = get_json(daemon.control.url + "/presets")
        reload = daemon.reload_presets()
    finally:
        unblock(fifo)
        fifo.unlink()
    assert "not a regular file" in listing["errors"][str(fifo)]
    assert "after" in reload["presets"] and "blocked" not in reload["presets"]
    said = [r for r in caplog.records if "blocked.toml" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def test_deleting_the_active_presets_file_falls_back_to_the_startup_preset(daemon):
    daemon, folder = daemon
    other = preset(folder / "other.toml", "another style")
    assert wait_for(lambda: "other" in daemon.library.presets, 5)
    daemon.select_preset("other", "test")
    other.unlink()
    assert wait_for(lambda: "other" not in daemon.library.presets, 5)
    assert daemon.presets.active == "mine"  # the startup preset, not "config"
    applied = daemon.engine  # the engine follows it (once loaded)
    assert wait_for(lambda: applied.applied is None or applied.applied.name == "mine", 10)

    # With the startup preset's file gone too, the [engine] prompt is what is left.
    mine = folder / "mine.toml"
    text = mine.read_text()
    preset(folder / "other.toml", "another style")
    assert wait_for(lambda: "other" in daemon.library.presets, 5)
    daemon.select_preset("other", "test")
    mine.unlink()
    (folder / "other.toml").unlink()
    try:
        assert wait_for(lambda: "other" not in daemon.library.presets, 5)
        assert daemon.presets.active == "config"
    finally:
        mine.write_text(text)
        assert wait_for(lambda: "mine" in daemon.library.presets, 5)


# --------------------------------------------------------------------------- aiohttp's own 400s
def refused(port: int, payload: bytes, secret: str) -> dict:
    """Send a request aiohttp's parser refuses; the answer must be ours."""
    answer = exchange(port, payload)
    head, _, body = answer.data.partition(b"\r\n\r\n")
    assert answer.status == 400, answer.data[:300]
    assert b"content-type: application/json" in head.lower(), head
    assert b"aiohttp" not in head.lower()  # nor the library's name and version
    assert secret.encode() not in answer.data and b"\\x00" not in answer.data
    return json.loads(body)


def hostile(token: str) -> list[bytes]:
    return [
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token.encode()
        + b"\x00x\r\n\r\n",  # a NUL byte in a header
        b"GET /status?" + token.encode() + b"\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /status HTTP/1.1\r\nX-Long: " + token.encode() * 600 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01" + token.encode() + b"\r\n\r\n",  # TLS on the HTTP port
    ]


def test_requests_aiohttp_refuses_get_our_json_and_no_echo(daemon, caplog):
    daemon, _ = daemon
    caplog.set_level(logging.DEBUG, "streamv2v")
    token = daemon.control.token
    port = int(daemon.control.url.rsplit(":", 1)[1])
    for payload in hostile(token):
        assert refused(port, payload, token)["error"].startswith("malformed HTTP request")
    assert token not in caplog.text and "Traceback" not in caplog.text
    assert daemon.output.published > 0 and get_json(daemon.control.url + "/status")


def test_streamv2v_serve_answers_them_the_same(tiny_model, caplog):
    """`serve`'s own runner (serve_runner) around its real application, on a real port."""
    from daemon.remote.server import RemoteServer, ServeLimits, serve_runner
    from daemon.remote.session import SharedModel

    token = "serve-secret-token-0123456789"
    settings = demo_config(tiny_model).engine.settings
    model = SharedModel.load(str(tiny_model), settings, "cpu", None, False)
    server = RemoteServer(model, ServeLimits(token, max_sessions=1))
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()

    async def start() -> tuple[web.AppRunner, int]:
        runner = serve_runner(server.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    runner, port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for payload in hostile(token):
            refused(port, payload, token)
        health = urllib.request.Request(
            f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(health, timeout=3) as answer:
            assert answer.status == 200  # still serving
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        model.close()
    assert token not in caplog.text and "Traceback" not in caplog.text
