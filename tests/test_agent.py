"""serve's HAProxy agent check: the reply is read the way HAProxy reads it (a real TCP client that
connects, reads one line and sees the connection closed), and checked against the words HAProxy's
configuration manual documents for ``agent-check``: ``N%`` (weight), ``ready``, ``drain``, ``up``,
``down``, and a ``#`` description. The drain that empties a box, and the HAProxy configuration
``serve haproxy-config`` prints, checked by ``haproxy -c``."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading

import pytest

from daemon.remote.agent import Capacity, Drain, agent_reply, start_agent

#: The words an agent reply may carry (HAProxy configuration manual, agent-check).
DOCUMENTED = re.compile(
    r"^(\d{1,3}%|ready|drain|maint|up|down|fail|stopped|maxconn:\d+)$", re.IGNORECASE
)


def words(reply: str) -> list[str]:
    """The state words of a reply, as HAProxy splits them (the description after # aside)."""
    assert reply.endswith("\n"), "HAProxy needs the line ended by a newline"
    head = reply.split("#", 1)[0]
    found = [w for w in re.split(r"[\s,]+", head) if w]
    for word in found:
        assert DOCUMENTED.match(word), f"{word!r} is not an agent-check word"
    return found


def test_a_box_with_room_is_up_ready_weighted_by_its_free_share():
    assert words(agent_reply(Capacity("ready", 0, 2))) == ["up", "ready", "100%"]
    assert words(agent_reply(Capacity("ready", 1, 2))) == ["up", "ready", "50%"]
    assert words(agent_reply(Capacity("ready", 3, 4))) == ["up", "ready", "25%"]
    assert words(agent_reply(Capacity("ready", 9, 10))) == ["up", "ready", "10%"]


def test_a_full_or_draining_box_drains_and_a_loading_or_failing_one_is_down():
    full = agent_reply(Capacity("ready", 2, 2))
    assert words(full) == ["up", "drain"] and "2/2" in full
    assert words(agent_reply(Capacity("ready", 0, 2, draining=True))) == ["up", "drain"]
    assert words(agent_reply(Capacity("loading", 0, 2))) == ["down"]
    assert words(agent_reply(Capacity("failing", 1, 2))) == ["down"]
    # Never a weight of 0% with "ready": HAProxy would keep the box in the round robin at 0.
    for sessions in range(5):
        reply = words(agent_reply(Capacity("ready", sessions, 4)))
        assert "0%" not in reply and ("drain" in reply) == (sessions == 4)


def read_agent(port: int) -> str:
    """What HAProxy's checker does: connect, read until the agent closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        data = b""
        while chunk := conn.recv(1024):
            data += chunk
    return data.decode("ascii")


@pytest.fixture
def agent():
    loop = asyncio.new_event_loop()
    state = {"capacity": Capacity("loading", 0, 2)}
    server = loop.run_until_complete(start_agent("127.0.0.1", 0, lambda: state["capacity"]))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1], state
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_the_agent_answers_one_line_per_connection_and_closes(agent):
    port, state = agent
    assert words(read_agent(port)) == ["down"]
    state["capacity"] = Capacity("ready", 1, 2)
    assert read_agent(port) == "up ready 50% #1/2 sessions\n"
    state["capacity"] = Capacity("ready", 2, 2)
    assert words(read_agent(port)) == ["up", "drain"]


def test_a_drain_stops_when_its_last_session_ends():
    stopped = []
    drain = Drain(lambda: stopped.append(True))
    drain.check(0)
    assert not stopped  # not draining: an empty box keeps running
    drain.start(2, "test")
    drain.check(1)
    assert drain.active and not stopped
    drain.check(0)
    assert stopped == [True]
    idle = Drain(lambda: stopped.append(True))
    idle.start(0, "test")  # nothing running: it stops at once
    assert stopped == [True, True]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_the_generated_configuration_passes_haproxy_check(tmp_path):
    from daemon.remote.haproxy import haproxy_config

    text = haproxy_config(
        "127.0.0.1:8780", ["10.0.0.5:8770:8771", "gpu-b.invalid:8770:8771", "[::1]:8770:8771"]
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "agent-check agent-port 8771" in text and "retry-on" in text
    assert "option redispatch" in text and "http-check" in text


def test_bad_boxes_are_named_with_the_fix():
    from daemon.remote.haproxy import haproxy_config

    with pytest.raises(ValueError, match="HOST:PORT:AGENT_PORT"):
        haproxy_config("127.0.0.1:8780", ["10.0.0.5:8770"])
    with pytest.raises(ValueError, match="--box"):
        haproxy_config("127.0.0.1:8780", [])
    with pytest.raises(ValueError, match="--bind"):
        haproxy_config("8780", ["10.0.0.5:8770:8771"])
