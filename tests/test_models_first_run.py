"""The daemon's first run against a slow hub on 127.0.0.1: it fetches the model in its loader
while the camera passes through, shows the download moving on /status, in its log and on the
page (in a real browser when Debian's chromium is here), then runs styled and the panel goes.
And an offline machine with a missing model says so in one line at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from hub_server import HubServer
from test_models_pull import MODEL, VAE, build_repos, wanted_bytes
from test_server_page import CHROMEDRIVER, login_link, until

HAVE_BROWSER = CHROMEDRIVER.exists() and shutil.which("chromium") is not None


def write_config(folder: Path) -> tuple[Path, Path]:
    token = folder / "control.json"
    path = folder / "config.toml"
    path.write_text(
        f"""
[camera]
source = "testpattern"
fps = 15
[engine]
model = "{MODEL}"
loras = []
prompt = "a warm scene"
[engine.settings]
vae = "{VAE}"
width = 128
height = 128
steps = 1
strength = 0.5
[output.virtual_camera]
enabled = false
[output.preview]
port = 0
[control]
port = 0
token_file = "{token}"
[presets]
bundled = "demo"
dir = "{folder / "presets"}"
[hotkeys]
enabled = false
[log]
file = "{folder / "daemon.log"}"
"""
    )
    return path, token


def start_daemon(config: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def get_status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=5) as response:
        return json.loads(response.read())


def wait(predicate, timeout: float, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


@pytest.fixture
def browser_if_any(tmp_path):
    if not HAVE_BROWSER:
        yield None
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


PANEL = """
const box = document.getElementById('ready');
return box.hidden ? '' : document.getElementById('ready-text').textContent;
"""


def test_first_run_downloads_with_progress_then_styles(tmp_path, browser_if_any, capsys):
    repos = build_repos(tmp_path / "hub")
    config, token = write_config(tmp_path)
    # A preset whose LoRA the hub does not have: said in the log; the daemon starts all the same.
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "ghost.toml").write_text(
        'prompt = "a cool striped scene"\nloras = [{ id = "test-org/no-such-lora" }]\n'
    )
    with HubServer(repos) as hub:
        hub.rate_bps = 1_000_000  # the 4 MB take ~4 s
        env = hub.online_env(tmp_path / "hf")
        proc, lines = start_daemon(config, env)
        try:
            assert wait(token.is_file, 60), lines
            url = json.loads(token.read_text())["url"]
            panel_texts: list[str] = []
            if browser_if_any is not None:
                browser_if_any.get(login_link(token, capsys))
            seen: list[dict] = []

            def downloading_moved() -> bool:
                ready = get_status(url)["getting_ready"]
                if ready and ready["phase"] == "download":
                    seen.append(ready)
                if browser_if_any is not None and (text := browser_if_any.execute_script(PANEL)):
                    panel_texts.append(text)
                done = {s["bytes_done"] for s in seen}
                return len(done) >= 3 and (not panel_texts or len(set(panel_texts)) >= 2)

            assert wait(downloading_moved, 60, 0.25), (seen, lines[-20:])
            total = sum(wanted_bytes(repos).values())
            assert all(s["bytes_total"] == total and s["files"] == 10 for s in seen)
            assert seen[-1]["bytes_done"] > seen[0]["bytes_done"] and seen[-1]["eta_s"] is not None
            assert seen[-1]["file"].startswith("test-org/")
            # Meanwhile the camera passes through.
            assert get_status(url)["kinds"].get("passthrough", 0) > 0
            # Then the styled output, and nothing to show any more.
            running = wait(lambda: (s := get_status(url))["kinds"].get("styled") and s, 120, 0.3)
            assert running and running["getting_ready"] is None, lines[-20:]
            assert dict(hub.served) == wanted_bytes(repos)  # only what the engine loads
            log = "".join(lines)
            assert "models: downloading 4.0 MB in 10 files" in log
            assert " of 4.0 MB (" in log and "left" in log and "models: downloaded 4.0 MB" in log
            assert "deprecated" not in log and "Traceback" not in log
            assert "LoRA test-org/no-such-lora: not found on" in log
            if browser_if_any is not None:
                assert any("of 3.8 MiB" in t and "Downloading" in t for t in panel_texts)
                until(browser_if_any, "return document.getElementById('ready').hidden")
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_offline_with_a_missing_model_says_so_in_one_line_at_once(tmp_path, how):
    config, _ = write_config(tmp_path)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    if how != "HF_HUB_OFFLINE":  # (tests/conftest.py sets it for every test: online here)
        env.pop("HF_HUB_OFFLINE")
    env.update({} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    proc, lines = start_daemon(config, env)
    try:
        assert wait(lambda: any("log file:" in ln for ln in lines), 60), lines
        started = time.monotonic()
        said = wait(lambda: [ln for ln in lines if "could not load" in ln], 10, 0.02)
        took = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)
    assert said and took < 2.0, (took, lines)
    line = said[0]
    assert "not in the local cache" in line and MODEL in line and "streamv2v models pull" in line
    assert "deprecated" not in "".join(lines) and "Traceback" not in "".join(lines)


def test_every_test_is_offline_with_a_private_hub_cache():
    """tests/conftest.py: the hub is off in the test process and in the processes tests start
    (the local hub's tests opt back in), and its cache is a temporary folder, not the user's."""
    from huggingface_hub import constants

    home = Path(os.environ["HF_HOME"])
    assert constants.HF_HUB_OFFLINE and home.name.startswith("streamv2v-test-hf-")
    assert Path(constants.HF_HUB_CACHE).is_relative_to(home)
    code = "from huggingface_hub import constants as c; print(c.HF_HUB_OFFLINE, c.HF_HOME)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(home)]
