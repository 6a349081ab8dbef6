"""``serve``'s capacity told to HAProxy, and the drain that empties a box without cutting anybody.

HAProxy's agent check (``agent-check agent-port N`` on a ``server`` line) opens a TCP connection
to the agent port every ``agent-inter``, reads one line, and the connection closes. The words of
the line (HAProxy's configuration manual, "agent-check"), as ``serve`` uses them:

- ``N%``: the server's weight as a percentage of its configured weight; here the share of free
  sessions, so HAProxy's weighted round robin places a new daemon where there is most room;
- ``drain``: no new sessions (weight 0) but the server stays up: a full box, or one draining;
  ``ready`` undoes it (HAProxy keeps a ``drain`` until the agent says ``ready``), so every reply of
  a box with room carries ``ready``;
- ``down``: the server is marked down (the model is loading, or the engine fails every frame);
  ``up`` marks it up again (when the health checks agree);
- after ``#``, a description HAProxy shows in its stats and logs.

:func:`agent_reply` is the whole protocol (a pure function, unit-tested against those words);
:func:`start_agent` serves it; :class:`Drain` is ``SIGUSR1`` / ``POST /admin/drain``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("streamv2v.serve")

#: Seconds a refused daemon (full box, draining box) is told to wait before offering again.
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class Capacity:
    """What the agent reports: the box's state and its sessions."""

    state: str  #: "loading", "ready", "failing" (every running session's frames fail)
    sessions: int
    max_sessions: int
    draining: bool = False


def agent_reply(capacity: Capacity) -> str:
    """The agent-check line (with its newline) for ``capacity``."""
    used = f"{capacity.sessions}/{capacity.max_sessions} sessions"
    if capacity.state == "loading":
        return "down #loading the model\n"
    if capacity.state == "failing":
        return f"down #the engine fails, {used}\n"
    if capacity.draining:
        return f"up drain #draining, {used}\n"
    free = capacity.max_sessions - capacity.sessions
    if free <= 0:
        return f"up drain #full, {used}\n"
    percent = max(1, round(100 * free / capacity.max_sessions))
    return f"up ready {percent}% #{used}\n"


async def start_agent(host: str, port: int, capacity: Callable[[], Capacity]) -> asyncio.Server:
    """Serve :func:`agent_reply` on ``host:port``: one line per connection, then close."""

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(agent_reply(capacity()).encode("ascii"))
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the checker went away first
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


class Drain:
    """A box that takes no new sessions and ends itself when its last session ends."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.active = False

    def start(self, sessions: int, why: str) -> None:
        if not self.active:
            self.active = True
            log.info(
                "serve: draining (%s): no new sessions; exits when its %d session(s) end",
                why,
                sessions,
            )
        self.check(sessions)

    def check(self, sessions: int) -> None:
        """Call when a session ends: the last one ends a draining box."""
        if self.active and sessions == 0:
            log.info("serve: drained, the last session ended; stopping")
            self._stop()
