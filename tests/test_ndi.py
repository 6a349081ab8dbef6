"""NDI in and out of the daemon with the real NDI runtime (cyndilib's wheel bundles it), a sender
or receiver in a process of its own on this machine. mDNS discovery needs avahi-daemon, which
this sandbox lacks: the NDI configuration file's "extra IPs" (127.0.0.1) make the finders ask this
machine directly, as a site without multicast would (README, "NDI").

The daemon's output reaches an NDI receiver (frames counted, size right); a daemon whose camera
is an NDI source styles it, and reconnects when the source goes away and comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_daemon import demo_config, wait_for

from daemon.app import Daemon

pytest.importorskip("cyndilib", reason="the optional extra ndi (pip install 'streamv2v[ndi]')")
pytestmark = pytest.mark.slow

PEER = Path(__file__).with_name("ndi_peer.py")
RED = (200, 60, 60)


@pytest.fixture(scope="module")
def ndi_env(tmp_path_factory):
    """NDI_CONFIG_DIR for this process and the peers: discovery by address (127.0.0.1)."""
    folder = tmp_path_factory.mktemp("ndi")
    config = {"ndi": {"networks": {"ips": "127.0.0.1"}, "multicast": {"send": {"enable": False}}}}
    (folder / "ndi-config.v1.json").write_text(json.dumps(config))
    old = os.environ.get("NDI_CONFIG_DIR")
    os.environ["NDI_CONFIG_DIR"] = str(folder)
    yield {**os.environ, "NDI_CONFIG_DIR": str(folder), "PYTHONPATH": str(PEER.parents[1])}
    if old is None:
        os.environ.pop("NDI_CONFIG_DIR")
    else:
        os.environ["NDI_CONFIG_DIR"] = old


def peer(env: dict, *args: object) -> subprocess.Popen:
    command = [sys.executable, str(PEER), *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def ndi_daemon(tmp_path: Path, memory_vcam, **sections) -> Daemon:
    config = demo_config(Path("tiny-styles"), **sections)
    data = config.model_dump()
    data["engine"]["settings"].update({"width": 96, "height": 96, "steps": 1})
    data["presets"].update({"bundled": "demo", "startup": "warm"})
    data["control"]["token_file"] = tmp_path / "control.json"
    return Daemon(type(config).model_validate(data))


def test_the_output_reaches_an_ndi_receiver(tmp_path, ndi_env, memory_vcam):
    daemon = ndi_daemon(tmp_path, memory_vcam, output={"ndi": {"enabled": True, "name": "out1"}})
    daemon.start()
    try:
        # Styled frames go out (and the engine is loaded: no load left running after the test).
        assert wait_for(lambda: daemon.output.kinds["styled"] > 3, 60), daemon.status()
        assert daemon.output.ndi is not None and daemon.output.ndi.sent > 3
        # The receiver stops once it has 12 frames: on a loaded machine it may take seconds to
        # connect, so a frame count in a fixed window would measure the machine, not NDI.
        receiver = peer(ndi_env, "recv", "out1", 40, 12)
        result = json.loads(receiver.communicate(timeout=60)[0].splitlines()[-1])
        sent = daemon.output.ndi.sent
    finally:
        daemon.stop()
    assert result["frames"] == 12, result
    assert result["source"].endswith("(out1)")
    assert result["size"] == list(daemon.size), result
    assert sent > result["frames"] / 2


def test_an_ndi_camera_is_styled_and_comes_back(tmp_path, ndi_env, memory_vcam):
    sender = peer(ndi_env, "send", "cam1", 60, *RED)
    daemon = ndi_daemon(tmp_path, memory_vcam, camera={"source": "ndi:cam1"})
    daemon.start()
    try:
        assert wait_for(lambda: daemon.output.kinds["styled"] > 3, 60), daemon.status()
        camera = daemon.camera_slot.latest()
        assert camera.kind == "camera" and camera.image.shape == (96, 128, 3)
        mean = camera.image.reshape(-1, 3).mean(0)
        assert np.abs(mean - RED).max() < 12, mean  # RGB, not BGR
        sender.kill()
        sender.wait(5)
        assert wait_for(lambda: daemon.camera.state == "lost", 15), daemon.camera.state
        assert wait_for(lambda: daemon.camera_slot.latest().kind == "unavailable", 5)
        sender = peer(ndi_env, "send", "cam1", 60, *RED)
        assert wait_for(lambda: daemon.camera.state == "live", 30), daemon.camera.state
        assert daemon.camera.reconnects >= 1
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 3, 30)
    finally:
        daemon.stop()
        sender.kill()
        sender.wait(5)
