"""The latency controller in the running daemon (tiny model), read back over the real control
API: a budget far above the cost takes the steps to the maximum, one far below to the minimum."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.cli import main


def get(daemon: Daemon, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(daemon.control.url + path, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def run_with_budget(tiny_model, budget_ms: float, settled) -> tuple[dict, str, str]:
    latency = {"enabled": True, "budget_ms": budget_ms, "min_steps": 1, "max_steps": 3}
    daemon = Daemon(demo_config(tiny_model, latency=latency))
    daemon.start()
    try:
        assert wait_for(lambda: settled(daemon.status()), 90), daemon.status()
        kind, body = get(daemon, "/status")
        assert kind == "application/json"
        kind, metrics = get(daemon, "/metrics")
        assert kind.startswith("text/plain; version=0.0.4")
        return json.loads(body), metrics, daemon.engine.budget.last_reason
    finally:
        daemon.stop()


def steady(steps: int):
    """The controller has left calibration and runs ``steps`` on styled frames."""

    def check(status: dict) -> bool:
        calibrating = status["controller"]["calibrating"]
        styled = status["kinds"].get("styled", 0)
        return status["steps"] == steps and not calibrating and styled > 10

    return check


def test_a_budget_far_above_the_cost_goes_to_max_steps(tiny_model, memory_vcam):
    status, metrics, _ = run_with_budget(tiny_model, 60_000, steady(3))
    assert status["steps"] == 3 and status["controller"]["active"]
    assert status["latency_budget_ms"] == 60_000
    assert status["deadline_misses"] == 0
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["streamv2v_steps"].samples[0].value == 3
    assert families["streamv2v_latency_budget_seconds"].samples[0].value == 60.0
    fps = {s.labels["stage"]: s.value for s in families["streamv2v_fps"].samples}
    assert fps["output"] == pytest.approx(20, abs=3)  # the demo config's output rate
    quantiles = {
        s.labels["quantile"]: s.value
        for s in families["streamv2v_glass_to_glass_latency_seconds"].samples
    }
    assert 0 < quantiles["0.5"] <= quantiles["0.95"] <= quantiles["0.99"] < 60
    preset = families["streamv2v_preset"].samples[0]
    assert preset.labels["name"] == "config" and preset.value == 1
    assert math.isnan(families["streamv2v_device_memory_bytes"].samples[0].value)  # CPU


def test_a_budget_far_below_the_cost_goes_to_min_steps(tiny_model, memory_vcam):
    status, metrics, _ = run_with_budget(tiny_model, 1, steady(1))
    assert status["steps"] == 1
    assert status["deadline_misses"] > 0  # 1 ms cannot be met, and the misses are counted
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["streamv2v_steps"].samples[0].value == 1
    assert families["streamv2v_deadline_misses"].samples[0].value > 0


def test_status_command_prints_the_figures(tiny_model, memory_vcam, capsys):
    latency = {"enabled": True, "budget_ms": 60_000, "min_steps": 1, "max_steps": 2}
    daemon = Daemon(demo_config(tiny_model, latency=latency))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.status()["kinds"].get("styled", 0) > 5, 60)
        assert wait_for(lambda: daemon.status()["fps"]["output"] is not None, 5)
        assert main(["status"]) == 0
        table = capsys.readouterr().out
        assert main(["status", "--json"]) == 0
        figures = json.loads(capsys.readouterr().out)
    finally:
        daemon.stop()
    lines = dict(line.split(None, 1) for line in table.splitlines())
    assert set(lines) == {"preset", "state", "steps", "fps", "latency", "frames", "bank", "device"}
    assert "budget 60000 ms" in lines["steps"] and "engine running" in lines["state"]
    assert lines["device"].startswith("cpu float32")
    assert figures["preset"] == "config" and figures["steps"] in (1, 2)
    assert main(["status"]) == 2  # the daemon is gone: a clear error
    assert "no running daemon" in capsys.readouterr().err
