"""Several ``serve`` boxes behind a real HAProxy, started on loopback ports with exactly the
configuration ``streamv2v serve haproxy-config`` prints: five real daemons whose ``[engine]
remote`` is the front URL, placed by the boxes' agents, a box killed (SIGKILL) and a new one
started, a box drained. Real processes (HAProxy, ``serve``), real WebRTC, the tiny style model.

Cost on the 2-core box: three ``serve`` processes and five in-process daemons at 96x96, 10 fps
(a camera frame soon after the styled ones stop: passthrough within 1 s), no preview, no
virtual camera, no control API; about 2-3.5 minutes on this loaded box.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_agent import read_agent
from test_daemon import wait_for
from test_remote import TOKEN, free_port, offer_sdp, remote_config

from daemon.app import Daemon
from daemon.config import DaemonConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]
ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
FIGURES: dict[str, list[float]] = {}
#: From the third box answering to its three daemons styled (the issue's 10 s). Measured with two
#: busy processes beside the test on the 2 cores: 3.0, 3.8, 4.1 s (it was 6.2-8.4 s, and 6.5-18 s
#: in loaded suites, while every joining session ran a ~1 s UNet pass on the box's one engine
#: thread to find the bank's layer shapes; now read off the UNet's blocks).
STYLED_S = 10.0


def figure(name: str, seconds: float) -> None:
    """A measured figure, kept for the module's summary and printed at once (pytest -s)."""
    FIGURES.setdefault(name, []).append(seconds)
    print(f"figure {name}: {seconds:.3f} s")


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, **kw)


def request(port: int, method: str, path: str, body: bytes = b"", token: str = TOKEN):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}", "Content-Length": str(len(body))}
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    return answer.status, dict(answer.getheaders()), data


class Box:
    """One ``serve --agent-port`` process, its log in a file."""

    def __init__(self, folder: Path, name: str, port: int, agent: int, token: Path) -> None:
        self.name, self.port, self.agent = name, port, agent
        self.log = folder / f"{name}.log"
        self.max_sessions = 2
        self.proc: subprocess.Popen | None = None
        self.token = token

    def start(self, max_sessions: int = 2) -> None:
        self.max_sessions = max_sessions
        args = ["serve", "--port", str(self.port), "--agent-port", str(self.agent)]
        args += ["--token-file", str(self.token), "--max-sessions", str(max_sessions)]
        with self.log.open("a") as log:
            self.proc = cli(*args, stdout=log, stderr=subprocess.STDOUT)

    def health(self) -> dict | None:
        try:
            status, _, data = request(self.port, "GET", "/health")
        except OSError:
            return None
        return json.loads(data) if status == 200 else None

    def sessions(self) -> int | None:
        health = self.health()
        return None if health is None else health["sessions"]


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("haproxy")
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    boxes = [Box(folder, f"box{n}", free_port(), free_port(), token) for n in (1, 2, 3)]
    front = free_port()
    specs = [f"127.0.0.1:{b.port}:{b.agent}" for b in boxes]
    args = ["serve", "haproxy-config", "--bind", f"127.0.0.1:{front}", "--token-file", str(token)]
    generate = cli(*args, *[a for spec in specs for a in ("--box", spec)], stdout=subprocess.PIPE)
    config, _ = generate.communicate(timeout=60)
    assert generate.returncode == 0
    cfg = folder / "haproxy.cfg"
    cfg.write_bytes(config)
    haproxy_log = folder / "haproxy.log"
    with haproxy_log.open("w") as log:
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
    for box in boxes[:2]:
        box.start()
    try:
        for box in boxes[:2]:
            assert wait_for(lambda b=box: b.health() is not None, 90, 0.1), box.log.read_text()
        yield {"front": front, "boxes": boxes, "logs": [haproxy_log] + [b.log for b in boxes]}
    finally:
        for box in boxes:
            if box.proc is not None and box.proc.poll() is None:
                box.proc.terminate()
                box.proc.wait(10)
        haproxy.terminate()
        haproxy.wait(10)


def light_daemon(tmp_path: Path, url: str, token: Path, n: int) -> Daemon:
    data = remote_config(tmp_path, url, token, "warm")
    data["camera"]["fps"] = data["output"]["fps"] = 10.0
    data["output"]["preview"]["enabled"] = False
    data["output"]["virtual_camera"]["enabled"] = False
    data["control"]["enabled"] = False
    data["control"]["token_file"] = tmp_path / f"control-{n}.json"
    return Daemon(DaemonConfig.model_validate(data))


def kind(daemon: Daemon) -> str | None:
    frame = daemon.output_slot.latest()
    return None if frame is None else frame.kind


def test_five_daemons_two_boxes_a_box_killed_a_box_added_a_box_drained(farm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamv2v")
    front, (box1, box2, box3) = farm["front"], farm["boxes"]
    url = f"http://127.0.0.1:{front}"
    token = box1.token
    daemons: list[Daemon] = []
    try:
        # Four daemons through the front: styled, two on each box (the agents' weights).
        t0 = time.monotonic()
        for n in range(4):
            daemons.append(light_daemon(tmp_path, url, token, n))
            daemons[-1].start()
        assert wait_for(lambda: all(kind(d) == "styled" for d in daemons), 40, 0.02), [
            d.status()["remote"] for d in daemons
        ]
        figure("placement_s", time.monotonic() - t0)
        assert wait_for(lambda: box1.sessions() == 2 and box2.sessions() == 2, 10)
        assert all(kind(d) == "styled" for d in daemons)
        # The fifth: no room anywhere; it says so (status, one log line) and keeps retrying.
        fifth = light_daemon(tmp_path, url, token, 4)
        mark = len(caplog.records)
        fifth.start()
        daemons.append(fifth)
        assert wait_for(lambda: fifth.engine.remote_state == "full", 15), fifth.status()
        reconnects = fifth.engine.reconnects
        assert wait_for(lambda: fifth.engine.reconnects >= reconnects + 2, 10)
        assert "no engine has room" in fifth.status()["remote"]["problem"]
        assert kind(fifth) == "passthrough"
        said = [r for r in caplog.records[mark:] if "no engine has room" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]

        # SIGKILL box1: its two daemons are in passthrough within 1 s, the others stay styled.
        four = daemons[:4]
        killed_at = time.monotonic()
        box1.proc.kill()
        assert wait_for(lambda: sum(kind(d) == "passthrough" for d in four) == 2, 1.0, 0.01)
        figure("failover_s", time.monotonic() - killed_at)
        orphans = [d for d in four if kind(d) == "passthrough"]
        stayed = [d for d in four if d not in orphans]
        assert all(kind(d) == "styled" for d in stayed)

        # A third box (room for three): the two orphans and the fifth are styled within 10 s.
        # (Timed from its /health answering: loading the model is not placement, and takes
        # 5-25 s on this loaded 2-core box.)
        box3.start(max_sessions=3)
        assert wait_for(lambda: box3.health() is not None, 90, 0.05), box3.log.read_text()
        started_at = time.monotonic()
        back = [*orphans, fifth]
        assert wait_for(lambda: all(d.engine.remote_state == "connected" for d in back), 10, 0.02)
        figure("third_box_placed_s", time.monotonic() - started_at)
        assert wait_for(lambda: all(kind(d) == "styled" for d in back), STYLED_S, 0.02), [
            d.status()["remote"] for d in back
        ]
        figure("third_box_styled_s", time.monotonic() - started_at)
        assert wait_for(lambda: all(kind(d) == "styled" for d in daemons), 10, 0.02)
        assert wait_for(lambda: box2.sessions() == 2 and box3.sessions() == 3, 10)

        # A session's follow-ups reach its box: /box/NAME/... through the front is that box.
        status, _, data = request(front, "GET", "/box/box3/health")
        assert status == 200 and json.loads(data)["max_sessions"] == 3
        status, _, data = request(front, "GET", "/box/box2/health")
        assert status == 200 and json.loads(data)["max_sessions"] == 2

        # Drain box2: its sessions keep running (nothing moves), new sessions are refused.
        styled_before = [d.engine.frames_styled for d in daemons]
        reconnects_before = [d.engine.reconnects for d in daemons]
        assert request(box2.port, "POST", "/admin/drain", token="wrong")[0] == 401
        status, _, data = request(box2.port, "POST", "/admin/drain")
        assert status == 200 and json.loads(data) == {"draining": True, "sessions": 2}
        offer = json.dumps({"type": "offer", "sdp": offer_sdp()}).encode()
        status, headers, _ = request(box2.port, "POST", "/offer", offer)
        assert status == 503 and int(headers["Retry-After"]) > 0
        status, _, _ = request(front, "POST", "/offer", offer)  # box3 full, box2 draining
        assert status == 503
        assert read_agent(box2.agent).startswith("up drain")
        metrics = request(box2.port, "GET", "/metrics")[2].decode().splitlines()
        assert "streamv2v_serve_draining 1.0" in metrics
        assert "streamv2v_serve_draining 0.0" in request(box3.port, "GET", "/metrics")[2].decode()
        assert wait_for(
            lambda: all(d.engine.frames_styled > n + 5 for d, n in zip(daemons, styled_before)),
            20,
        )
        assert [d.engine.reconnects for d in daemons] == reconnects_before  # nothing moved
        assert box2.sessions() == 2 and box2.proc.poll() is None
        # SIGUSR1 drains box3 the same way; the last session ending ends a drained box.
        box3.proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: (box3.health() or {}).get("draining") is True, 5)
        for daemon in daemons:
            daemon.stop()
        assert box2.proc.wait(30) == 0 and box3.proc.wait(30) == 0
    finally:
        for daemon in daemons:
            daemon.stop()
    for path in farm["logs"]:
        if path.exists():
            assert "Traceback" not in path.read_text(), path.read_text()[-3000:]
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the daemons' log"
    print(
        "figures:",
        {k: round(statistics.median(v), 3) for k, v in FIGURES.items()},
    )
