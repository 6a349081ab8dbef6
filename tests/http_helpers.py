"""Raw HTTP over a socket, for requests no well-behaved client library would send."""

from __future__ import annotations

import re
import select
import socket
import time
from dataclasses import dataclass

_STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)


@dataclass
class Answer:
    """What came back: the status of each response read (several when pipelined), the bytes,
    and whether the server closed the connection."""

    statuses: list[int]
    data: bytes
    closed: bool
    seconds: float

    @property
    def status(self) -> int | None:
        return self.statuses[0] if self.statuses else None


def statuses_in(data: bytes, head: bool = False) -> list[int]:
    """Status codes of the complete responses in ``data`` (1xx interim ones left out); the
    answers to HEAD requests have no body, whatever their Content-Length says."""
    found, rest = [], data
    while True:
        match = _STATUS.match(rest)
        head_end = rest.find(b"\r\n\r\n")
        if match is None or head_end < 0:
            return found
        status = int(match.group(1))
        length = _LENGTH.search(rest[: head_end + 2])
        end = head_end + 4 + (int(length.group(1)) if length and not head else 0)
        if head and status >= 200:
            found.append(status)
            rest = rest[end:]
            continue
        if status >= 200 and length is None and b"chunked" not in rest[:head_end].lower():
            found.append(status)  # no length: the body runs until the server closes
            return found
        if len(rest) < end:
            return found
        if status >= 200:
            found.append(status)
        rest = rest[end:]


def exchange(
    port: int,
    payload: bytes,
    *,
    expect: int = 1,
    timeout: float = 3.0,
    piece: int = 1 << 16,
    pause: float = 0,
) -> Answer:
    """Send ``payload`` in ``piece``-byte writes ``pause`` s apart (stopping early when the
    server answers or hangs up), then read until ``expect`` responses arrived, the server
    closed, or ``timeout`` passed."""
    head = payload.startswith(b"HEAD ")
    start = time.monotonic()
    deadline = start + timeout
    data, closed = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setblocking(False)
        view = memoryview(payload)
        while view and not closed:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                break  # answered (or closed) before the whole request went out
            if writable:
                try:
                    sent = sock.send(view[:piece])
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                view = view[sent:]
                if pause:
                    time.sleep(pause)
            if time.monotonic() > deadline:
                break
        while len(statuses_in(data, head)) < expect and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    return Answer(statuses_in(data, head), data, closed, time.monotonic() - start)


def request(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
    length: bool = True,
) -> bytes:
    """An HTTP/1.1 request as bytes (Content-Length added when ``length`` and there is a body)."""
    lines = [f"{method} {path} HTTP/1.1"]
    all_headers = {"Host": host, **(headers or {})}
    if length and body:
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n"
    return head + body
