"""The page on `streamv2v serve` in a real browser (Debian's chromium + chromedriver, Selenium
with the driver's path given) and its fake camera: logged in with a one-time link asked for with
the token, it publishes the camera by WHIP, shows the styled stream (its pixels read back through
a canvas: the warm preset makes them red, the cool one blue), switches presets with its buttons,
shows a round-trip figure; the viewer page (WHEP) shows the same stream. A session cookie alone
(no same-origin Origin) changes nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from test_daemon import wait_for
from test_whip import TOKEN, Serve

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.skipif(
        not (CHROMEDRIVER.exists() and shutil.which("chromium")),
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
    ),
    pytest.mark.slow,
]

# The mean colour of a video element's current frame, read through a canvas (null before one).
READ_PIXELS = """
const video = document.getElementById(arguments[0]);
if (!video || !video.videoWidth) return null;
const canvas = document.createElement("canvas");
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const g = canvas.getContext("2d");
g.drawImage(video, 0, 0);
const d = g.getImageData(0, 0, canvas.width, canvas.height).data;
let r = 0, gr = 0, b = 0;
for (let i = 0; i < d.length; i += 4) { r += d[i]; gr += d[i + 1]; b += d[i + 2]; }
const n = d.length / 4;
return [r / n, gr / n, b / n];
"""


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    server = Serve(tmp_path_factory.mktemp("whip-page"))
    try:
        assert wait_for(lambda: server.proc.poll() is None and _up(server), 90, 0.2)
        yield server
    finally:
        assert TOKEN not in server.stop()


def _up(server: Serve) -> bool:
    try:
        return server.request("GET", "/presets")[0] == 200
    except OSError:
        return False


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def login_link(serve: Serve, key: str = "url") -> str:
    status, _, body = serve.request("POST", "/login-code")
    assert status == 200
    link = json.loads(body)[key]
    assert TOKEN not in link
    return link


def warmth(rgb) -> float:
    return rgb[0] - rgb[2]


def pixels(driver, element: str):
    return driver.execute_script(READ_PIXELS, element)


def test_a_cookie_without_this_origin_changes_nothing(serve):
    link = login_link(serve)
    path = link.split(str(serve.port), 1)[1]
    status, headers, _ = serve.request("GET", path, token=None)
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    assert serve.request("GET", path, token=None)[0] == 403  # the code works once
    offer = "v=0\r\n"
    for origin, expected in (("http://evil.example", 403), (None, 403), (serve.base, 415)):
        headers = {"Cookie": cookie, "Host": f"127.0.0.1:{serve.port}"}
        if origin:
            headers["Origin"] = origin
        status = serve.request("POST", "/whip", offer, headers, token=None)[0]
        assert status == expected, (origin, status)
    assert serve.request("GET", "/presets", headers={"Cookie": cookie}, token=None)[0] == 200


def test_the_page_publishes_the_camera_and_shows_it_styled(serve, browser):
    browser.get(login_link(serve))
    assert browser.current_url.rstrip("/").endswith(str(serve.port))  # the code left the URL
    assert wait_for(lambda: browser.find_elements("css selector", "#presets button"), 10)
    browser.find_element("css selector", '#presets button[data-preset="warm"]').click()
    t0 = time.monotonic()
    browser.find_element("id", "start").click()

    def styled(sign: int) -> bool:
        rgb = pixels(browser, "styled")
        return rgb is not None and sign * warmth(rgb) > 20

    assert wait_for(lambda: styled(+1), 60), (pixels(browser, "styled"), _console(browser))
    print(f"\npage: first warm frame {time.monotonic() - t0:.1f} s after Start")
    camera = pixels(browser, "camera")
    assert camera is not None and abs(warmth(camera)) < 20  # the styling, not the camera
    browser.find_element("css selector", '#presets button[data-preset="cool"]').click()
    assert wait_for(lambda: styled(-1), 20), pixels(browser, "styled")
    shown = browser.find_element("id", "roundtrip").get_attribute("data-ms")
    assert wait_for(lambda: browser.find_element("id", "roundtrip").get_attribute("data-ms"), 10), (
        shown
    )
    round_trip = float(browser.find_element("id", "roundtrip").get_attribute("data-ms"))
    assert 0 < round_trip < 5000
    print(f"page: round trip shown {round_trip:.0f} ms")

    # The viewer page (what an OBS Browser Source loads) shows the same styled stream.
    browser.switch_to.new_window("tab")
    browser.get(f"{serve.base}/view")
    assert wait_for(
        lambda: (rgb := pixels(browser, "styled")) is not None and warmth(rgb) < -20, 30
    ), (pixels(browser, "styled"), _console(browser))
    errors = [e for e in _console(browser) if e["level"] == "SEVERE"]
    assert not errors, errors


def _console(driver) -> list:
    try:
        return driver.get_log("browser")
    except Exception:  # not every driver keeps the log
        return []
