"""docs/kubernetes.yaml, the Kubernetes example of the README: parsed (kubectl's client-side
dry run still needs a cluster's API discovery here), and its readiness probe run for real
against serve's agent: ready exactly when the agent says ``up``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from test_agent import agent  # noqa: F401  (the fixture: a real agent on a loopback port)

from daemon.remote.agent import Capacity

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "kubernetes.yaml"


def documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d}


def serve_container() -> dict:
    (container,) = documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_deployment_asks_for_a_gpu_drains_before_stop_and_exposes_both_ports():
    docs = documents()
    container = serve_container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"])
    assert args["listen"] == "0.0.0.0" and args["token-file"].startswith("/etc/streamv2v/")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"signalling": int(args["port"]), "agent": int(args["agent-port"])}
    service = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert service == ports
    assert "kill -USR1 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 3600  # time for the last session to end
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert str(ports["agent"]) in probe


def test_the_readiness_probe_is_ready_exactly_when_the_agent_says_up(agent):  # noqa: F811
    port, state = agent
    command = serve_container()["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    code = command[2].replace("8771", str(port))

    def ready() -> bool:
        return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0

    state["capacity"] = Capacity("loading", 0, 2)
    assert not ready()
    state["capacity"] = Capacity("ready", 0, 2)
    assert ready()
    state["capacity"] = Capacity("ready", 2, 2)  # full: still ready, HAProxy drains it
    assert ready()
    state["capacity"] = Capacity("failing", 1, 2)
    assert not ready()
