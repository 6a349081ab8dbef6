"""What `streamv2v serve` loads for its sessions, and what it says when its engine fails.

A real `serve` process (its log captured) on the shipped tiny style model, and real daemons whose
engine is ``[engine] remote``: their ControlNets load on the server with the first session that
names them (shared per model, freed with the last), their style LoRAs are counted per session and
freed when the last session naming them ends, `/health` and `/metrics` say what is loaded and its
bytes; a ControlNet that fails on every frame is said in the server's log once (then counted),
and in the daemon's status, log and page.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_daemon import wait_for
from test_remote import ROOT, TOKEN, free_port, remote_config, styled_now

from daemon.app import Daemon
from daemon.config import DaemonConfig
from daemon.control.api import call
from daemon.control.tables import status_table
from daemon.models.registry import tiny_canny_dir, tiny_styles_dir

pytestmark = pytest.mark.slow


class LoggedServe:
    """`streamv2v serve` in a subprocess, its stderr (the log) in a file."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = folder / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.log = folder / "serve.log"
        code = "import sys; from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["serve", "--port", str(self.port), "--token-file", str(self.token_file)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *args], env=env, cwd=ROOT, stderr=err
            )

    def get(self, path: str) -> bytes | None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                return answer.read()
        except OSError:
            return None

    def health(self) -> dict | None:
        import json

        body = self.get("/health")
        return None if body is None else json.loads(body)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    proc = LoggedServe(tmp_path_factory.mktemp("serve"))
    try:
        assert wait_for(lambda: proc.health() is not None, 120, 0.1), proc.log_text()
        yield proc
    finally:
        proc.stop()


def daemon_with(
    tmp_path: Path,
    serve: LoggedServe,
    name: str,
    control: list,
    startup: str,
    presets: Path | None = None,
):
    cfg = remote_config(tmp_path, serve.url, serve.token_file, startup)
    cfg["engine"]["settings"]["control"] = control
    if presets is not None:  # (beside the bundled demo presets)
        cfg["presets"]["dir"] = str(presets)
    cfg["control"]["token_file"] = tmp_path / f"control-{name}.json"
    return Daemon(DaemonConfig.model_validate(cfg))


def switch(daemon: Daemon, name: str) -> None:
    call("POST", "/preset", {"name": name}, control_file=daemon.config.control.token_file)


def test_controlnets_and_loras_load_with_their_sessions_and_go_with_the_last(
    tmp_path, serve, caplog
):
    # Two distinct ControlNets: the shipped canny one, and a copy of it fed the frame itself.
    other = tmp_path / "tile-net"
    shutil.copytree(tiny_canny_dir(), other)
    # A preset whose LoRA the server cannot read: it runs without it, and the daemon hears why.
    presets = tmp_path / "presets"
    presets.mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (presets / "unreadable.toml").write_text(
        f'prompt = "a warm scene"\nloras = [{{ id = "{tmp_path / "bad.safetensors"}" }}]\n'
    )
    canny = daemon_with(
        tmp_path,
        serve,
        "canny",
        [{"model": "tiny-canny", "preprocess": "canny"}],
        "warm",
        presets,
    )
    tile = daemon_with(
        tmp_path, serve, "tile", [{"model": str(other), "preprocess": "image"}], "sepia"
    )
    caplog.set_level(logging.INFO, logger="streamv2v")
    canny.start()
    tile.start()
    try:
        assert wait_for(lambda: styled_now(canny) and styled_now(tile), 40), (
            canny.status()["remote"],
            tile.status()["remote"],
            serve.log_text()[-2000:],
        )
        health = serve.health()
        loaded = health["loaded"]
        nets = loaded["controlnets"]
        assert set(nets) == {str(tiny_canny_dir()), str(other)}, nets
        assert all(n["sessions"] == 1 and n["bytes"] > 1e6 for n in nets.values()), nets
        (sepia,) = loaded["loras"]
        assert "sepia" in sepia and loaded["loras"][sepia]["sessions"] == 1
        assert loaded["loras"][sepia]["bytes"] > 1e5 and loaded["model_bytes"] > 1e6
        switch(canny, "unreadable")

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "runs without it" in r.getMessage()]

        assert wait_for(said, 10), serve.log_text()[-2000:]
        assert "unreadable" in said()[0] and "bad.safetensors" in said()[0], said()
        # The canny daemon blends its scales: to the LoRA preset, then to another ControlNet
        # preset (control_scales [1.0]), each switch a blend; no frame fails.
        switch(canny, "sepia")
        assert wait_for(lambda: serve.health()["loaded"]["loras"][sepia]["sessions"] == 2, 10)
        switch(canny, "cool")
        frames = {e["session"]: e["frames"] for e in serve.health()["engines"]}
        assert wait_for(
            lambda: all(
                e["preset"] in ("cool", "sepia") and e["frames"] > frames[e["session"]] + 10
                for e in serve.health()["engines"]
            ),
            20,
        )
        health = serve.health()
        metrics = serve.get("/metrics").decode()
        for engine in health["engines"]:
            assert engine["failed_frames"] == 0 and engine["failure"] is None, engine
            assert engine["fps"] > 0 and engine["frame_ms_p50"] > 0
        assert canny.status()["remote"]["state"] == "connected"
        assert tile.status()["remote"]["state"] == "connected"
    finally:
        tile.stop()
    try:
        # The tile daemon's session ends: its ControlNet goes; the LoRA stays (canny named it).
        def tile_gone() -> bool:
            h = serve.health()
            return h["sessions"] == 1 and set(h["loaded"]["controlnets"]) == {str(tiny_canny_dir())}

        assert wait_for(tile_gone, 15), serve.health()
        assert serve.health()["loaded"]["loras"][sepia]["sessions"] == 1
    finally:
        canny.stop()

    # The last session ends: nothing it named stays loaded.
    def all_gone() -> bool:
        h = serve.health()
        return h["sessions"] == 0 and not h["loaded"]["controlnets"] and not h["loaded"]["loras"]

    assert wait_for(all_gone, 15), serve.health()
    after = serve.health()["loaded"]
    assert after["controlnets"] == {} and after["loras"] == {}, after
    assert after["lora_base_bytes"] == 0
    log = serve.log_text()
    assert "ControlNet freed" in log and "LoRA freed" in log
    assert "this engine has no ControlNet" not in log and "Traceback" not in log

    # /metrics (Prometheus text) said the same while both ran.
    lines = metrics.splitlines()
    assert "streamv2v_serve_sessions 2.0" in lines
    assert "streamv2v_serve_free_sessions 2.0" in lines  # --max-sessions 4 by default
    assert sum(line.startswith("streamv2v_serve_controlnet_bytes{") for line in lines) == 2
    assert any(line.startswith("streamv2v_serve_lora_bytes{lora=") for line in lines)
    fps = [line for line in lines if line.startswith("streamv2v_serve_session_fps{")]
    assert len(fps) == 2 and all(float(line.rsplit(" ", 1)[1]) > 0 for line in fps), fps
    assert any('quantile="0.95"' in line for line in lines if "frame_seconds{" in line)
    assert all(line.startswith("#") or " " in line for line in lines)
    assert serve.get("/metrics") is not None
    denied = urllib.request.Request(serve.url + "/metrics")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(denied, timeout=2)
    assert err.value.code == 401


def broken_controlnet(folder: Path) -> Path:
    """A ControlNet that fits the model's blocks but downsamples its control image 2x instead
    of 8x: it loads, and every frame fails with a shape mismatch."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_styles_dir() / "unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    net.save_pretrained(folder)
    return folder


def test_a_failing_remote_engine_is_said_by_both_logs_the_status_and_the_page(
    tmp_path, serve, caplog
):
    net = broken_controlnet(tmp_path / "broken-net")
    daemon = daemon_with(
        tmp_path, serve, "broken", [{"model": str(net), "preprocess": "canny"}], "warm"
    )
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        daemon.start()
        try:
            assert wait_for(lambda: daemon.engine.remote_state == "failing", 30), (
                daemon.status()["remote"],
                serve.log_text()[-2000:],
            )
            failed = lambda: max(e["failed_frames"] for e in serve.health()["engines"])  # noqa: E731
            assert wait_for(lambda: failed() >= 10, 20)
            status = daemon.status()
            table = status_table(status)
            banner = page_banner(daemon)
        finally:
            daemon.stop()
    remote = status["remote"]
    assert remote["state"] == "failing" and status["engine"] == "failed"
    assert "size of tensor" in remote["error"] or "shape" in remote["error"], remote
    said = f"the engine on {serve.url} fails: "
    assert remote["problem"].startswith(said), remote
    assert said in table, table
    if banner is not None:  # (no chromium here: the page's text is not checked)
        assert banner.startswith(f"The engine on {serve.url} fails: "), banner
    # The daemon's log says it once (not once per failed frame), the camera passes through.
    lines = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert len(lines) == 1 and r"passthrough" in lines[0], lines
    assert status["kinds"].get("styled", 0) == 0 and status["kinds"]["passthrough"] > 0
    # The server's log: the first failure, once, however many frames failed; the count at the end.
    assert wait_for(lambda: "frames failed" in serve.log_text(), 15), serve.log_text()[-2000:]
    log = serve.log_text()
    assert log.count("the engine fails:") == 1, log[-3000:]


def page_banner(daemon: Daemon) -> str | None:
    """The control page's banner text in a real browser (None without chromium)."""
    from test_server_page import CHROMEDRIVER, until

    if not (CHROMEDRIVER.exists() and shutil.which("chromium")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(20)
        driver.get(daemon.control.url + "/")
        script = "const b = document.getElementById('banner'); return !b.hidden && b.textContent"
        return until(driver, script)
    finally:
        driver.quit()
