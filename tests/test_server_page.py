"""The control page in a real browser (Debian's chromium + chromedriver, driven by Selenium with
the driver's path given, so nothing is downloaded) against the running demo daemon (the shipped
tiny style model on its generated scene): logged in through `streamv2v open`, it shows the live
output, switches presets, draws the latency chart, without a JavaScript error; without the
session cookie a switch is refused.

Set STREAMV2V_PAGE_SCREENSHOT=path to also save the page's screenshot there (docs/).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.cli import main
from daemon.config import DaemonConfig
from daemon.runner import apply_demo

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMEDRIVER.exists() and shutil.which("chromium")),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

# The colour app.js draws the p50 line in (#4ea1ff).
P50_RGB = (78, 161, 255)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("control") / "control.json"


@pytest.fixture(scope="module")
def daemon(token_file):
    config, _ = apply_demo(DaemonConfig())
    data = config.model_dump()
    data["output"]["preview"]["port"] = 0
    data["control"].update({"port": 0, "token_file": str(token_file)})
    data["hotkeys"]["enabled"] = False
    daemon = Daemon(DaemonConfig.model_validate(data))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.output.kinds["styled"] > 3, 90), daemon.status()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,800")
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")  # a fresh profile: no cookie
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def login_link(token_file: Path, capsys) -> str:
    code = main(["open", "--no-browser", "--set", f"control.token_file='{token_file}'"])
    assert code == 0
    return capsys.readouterr().out.strip()


def until(driver, script: str, *args, timeout: float = 15.0):
    """The script's value once truthy (polled), else the assertion names the script."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"never true within {timeout} s: {script}")


def output_pixels(driver) -> np.ndarray:
    png = driver.find_element("id", "output").screenshot_as_png
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)


CHART_P50_PIXELS = """
const [r, g, b] = arguments;
const c = document.getElementById('chart');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  const near = Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 90;
  if (near && d[i + 3] > 200) n++;
}
return n;
"""


def status(daemon: Daemon) -> dict:
    with urllib.request.urlopen(daemon.control.url + "/status", timeout=5) as response:
        return json.loads(response.read())


def test_the_page_shows_live_output_switches_presets_and_draws_latency(
    daemon, browser, token_file, tmp_path, capsys
):
    link = login_link(token_file, capsys)
    assert link.startswith(daemon.control.url + "/login?code=")
    browser.get(link)
    assert browser.current_url == daemon.control.url + "/"  # the code left the address bar
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert until(browser, "return document.getElementById('notice').hidden") is True

    until(browser, "return document.querySelectorAll('#presets button').length")
    names = browser.execute_script(
        "return [...document.querySelectorAll('#presets button')].map(b => b.dataset.name)"
    )
    assert {"plain", "warm", "cool", "outline"} <= set(names), names
    active = browser.execute_script(
        "return document.querySelector('#presets button.active').dataset.name"
    )
    assert active == daemon.presets.active == "warm"
    until(browser, "return document.getElementById('output').naturalWidth > 0")

    first = output_pixels(browser)
    time.sleep(0.8)
    second = output_pixels(browser)
    moved = np.abs(first - second).mean()
    assert moved > 1.0, f"the output did not change between screenshots ({moved:.2f})"

    browser.find_element("css selector", '#presets button[data-name="cool"]').click()
    assert wait_for(lambda: daemon.presets.active == "cool", 5)
    assert status(daemon)["preset"] == "cool"
    until(
        browser, "return document.querySelector('#presets button.active').dataset.name === 'cool'"
    )
    browser.find_element("id", "passthrough").click()
    assert wait_for(lambda: daemon.presets.active == "passthrough", 5)
    until(browser, "return document.getElementById('passthrough').checked")
    browser.find_element("id", "passthrough").click()  # back to the style it left
    assert wait_for(lambda: daemon.presets.active == "cool", 5)

    # The p50 line grows as samples arrive: wait until it is a line, not a first dot.
    drawn = 0
    deadline = time.monotonic() + 10
    while drawn <= 50 and time.monotonic() < deadline:
        drawn = browser.execute_script(CHART_P50_PIXELS, *P50_RGB) or 0
        time.sleep(0.2)
    assert drawn > 50, drawn
    figures = browser.find_element("id", "figures").text
    assert "fps in / engine / out" in figures and "Latency p50 / p95" in figures
    shot = tmp_path / "control-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    if os.environ.get("STREAMV2V_PAGE_SCREENSHOT"):  # for the README: the switch settled
        time.sleep(4)
        browser.save_screenshot(os.environ["STREAMV2V_PAGE_SCREENSHOT"])
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_without_the_session_cookie_a_switch_is_refused(daemon, browser, token_file, capsys):
    before = daemon.presets.active
    browser.get(daemon.control.url + "/")
    notice = until(
        browser, "const n = document.getElementById('notice'); return !n.hidden && n.textContent"
    )
    assert "streamv2v open" in notice
    until(browser, "return document.querySelectorAll('#presets button').length")
    target = "outline" if before != "outline" else "plain"
    browser.find_element("css selector", f'#presets button[data-name="{target}"]').click()
    refused = until(
        browser,
        "const n = document.getElementById('notice');"
        " return n.classList.contains('error') && n.textContent",
    )
    assert "401" in refused and "streamv2v open" in refused, refused
    time.sleep(0.3)
    assert daemon.presets.active == before and status(daemon)["preset"] == before

    # A link works once: the second browser visit gets 403, and still no cookie.
    link = login_link(token_file, capsys)
    browser.get(link)
    assert browser.get_cookies()
    browser.delete_all_cookies()
    browser.get(link)
    assert "used already or has expired" in browser.page_source
    assert not browser.get_cookies()


def test_a_banner_says_when_the_camera_and_the_engine_are_down(browser, tmp_path):
    unreachable = "http://127.0.0.1:9/camera.mjpg"  # the discard port: nothing listens
    daemon = Daemon(demo_config(tmp_path / "no-model", camera={"source": unreachable}))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.engine.state == "failed", 30), daemon.status()
        browser.get(daemon.control.url + "/")
        banner = until(
            browser,
            "const b = document.getElementById('banner'); return !b.hidden && b.textContent",
        )
        assert banner.startswith("Camera ") and "reconnects" in banner, banner
        pills = browser.find_element("id", "states").text
        assert "engine: running" not in pills and "camera: live" not in pills, pills
    finally:
        daemon.stop()


def test_open_without_a_daemon_says_how_to_start_one(tmp_path, capsys):
    assert main(["open", "--set", f"control.token_file='{tmp_path / 'none.json'}'"]) == 2
    err = capsys.readouterr().err
    assert "no running daemon" in err and "streamv2v run" in err
