"""``streamv2v serve haproxy-config``: an HAProxy configuration that puts several ``serve`` boxes
behind one front URL (the daemons' ``[engine] remote``).

What goes through HAProxy is signalling only (a daemon's ``POST /offer``, WHIP/WHEP requests,
the page); the media then flows between the daemon and the chosen box directly (ICE), so a
session lasts as long as it likes whatever HAProxy's timeouts. Placement: each box's agent
(``serve --agent-port``) gives its weight as its share of free sessions, ``drain`` when full,
``down`` while loading or failing; a box that refuses anyway (503, a race between two offers) or
cannot be reached is retried on another (``retry-on`` + ``option redispatch``).

A session's follow-up requests (WHIP's PATCH/DELETE, WHEP's, on the ``Location`` the box gave)
reach the same box by a box id in the path: HAProxy rewrites a box's ``Location: /whip/ID`` to
``/box/NAME/whip/ID``, and routes ``/box/NAME/...`` to server NAME with the prefix removed. A
daemon's session needs none: after its one offer, everything goes over ICE.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def _split(spec: str, what: str, form: str) -> tuple[str, list[int]]:
    """HOST and the ports of ``HOST:PORT[:PORT]`` (IPv6 in brackets); ValueError names the fix."""
    host, _, rest = spec.rpartition("]") if spec.startswith("[") else ("", "", spec)
    host = host + "]" if host else ""
    parts = (rest.lstrip(":") if host else rest).split(":")
    if not host:
        host, parts = parts[0], parts[1:]
    want = form.count(":")
    ports = [int(p) for p in parts if p.isdigit() and 0 < int(p) < 65536]
    if not host or len(parts) != want or len(ports) != want:
        raise ValueError(f"{what} {spec!r}: expected {form} (e.g. {_example(form)})")
    return host, ports


def _example(form: str) -> str:
    return "10.0.0.5:8770:8771" if form.count(":") == 2 else "0.0.0.0:8780"


def haproxy_config(
    bind: str,
    boxes: Sequence[str],
    *,
    token: str = "",
    check_inter: str = "1s",
) -> str:
    """The configuration text: ``bind`` is HOST:PORT of the front, each box HOST:PORT:AGENT_PORT.
    With ``token`` the health checks send it (the file then holds a secret: chmod 600)."""
    if not boxes:
        raise ValueError("give at least one --box HOST:PORT:AGENT_PORT (one per serve)")
    front_host, (front_port,) = _split(bind, "--bind", "HOST:PORT")
    servers = []
    for number, spec in enumerate(boxes, 1):
        host, (port, agent) = _split(spec, "--box", "HOST:PORT:AGENT_PORT")
        servers.append((f"box{number}", host, port, agent))
    auth = f' hdr Authorization "Bearer {token}"' if token else ""
    lines = [
        "# streamv2v serve boxes behind one front URL (streamv2v serve haproxy-config).",
        "# Signalling only goes through HAProxy; media flows daemon <-> box directly (ICE).",
        "global",
        "    log stdout format raw local0 info   # to HAProxy's stdout (journal, container log)",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 1s            # a box that does not accept in 1 s is tried no more",
        "    timeout client 30s            # signalling requests are short: media is not here",
        "    timeout server 15s            # an offer is answered once the box gathered ICE",
        "    timeout http-request 10s      # a client must send its request within 10 s",
        "    timeout http-keep-alive 10s",
        "    timeout queue 2s              # no queueing for a full farm: answer 503 soon",
        "",
        "frontend streamv2v",
        f"    bind {front_host}:{front_port}",
        "    default_backend serve",
        "",
        "backend serve",
        "    balance roundrobin            # weighted by each agent's share of free sessions",
        "    option http-buffer-request    # the offer is kept, so a retry can resend it",
        "    retry-on conn-failure empty-response response-timeout 503",
        "    retries 3                     # a refused or dead box: the offer goes to another",
        "    option redispatch 1           # every retry picks a box again (not the same one)",
        "    default-server init-addr last,libc,none   # a box's name may resolve later",
        "    option httpchk",
        f"    http-check send meth GET uri /health{auth}",
        "    http-check expect status 200",
        "    # A session's follow-ups: /box/NAME/... goes to box NAME, the prefix removed;",
        "    # a box's Location /whip/ID (or /whep/...) comes back as /box/NAME/whip/ID.",
        "    http-request set-var(txn.box) path,field(3,/) if { path_beg /box/ }",
        r"    http-request set-path %[path,regsub(^/box/[^/]*,)] if { path_beg /box/ }",
    ]
    lines += [f"    use-server {name} if {{ var(txn.box) -m str {name} }}" for name, *_ in servers]
    lines.append(r"    http-response replace-header Location ^/(wh[ei]p/.*)$ /box/%[srv_name]/\1")
    for name, host, port, agent in servers:
        lines.append(
            f"    server {name} {host}:{port} check inter {check_inter} fall 2 rise 1 "
            f"agent-check agent-port {agent} agent-inter {check_inter} weight 100"
        )
    return "\n".join(lines) + "\n"
