"""The MJPEG-over-HTTP preview: the output frames for a browser, OpenCV or an OBS Media Source.

One published frame is JPEG-encoded at most once, the first time a client asks for it, and all
clients share those bytes. Each client sends the newest frame when its socket is ready: a slow
client skips frames instead of queueing them, and ``publish`` never waits for any client.

Endpoints: ``/`` a small HTML page, ``/stream.mjpg`` the stream (multipart/x-mixed-replace),
``/frame.jpg`` the latest frame once. Loopback only: the port has no authentication.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import cv2
import numpy as np

log = logging.getLogger(__name__)

BOUNDARY = "frame"

#: How long a stream handler waits for a frame before it re-checks whether the server stops.
_WAIT_S = 0.25
#: A client whose socket accepts nothing for this long is dropped (a frozen viewer, a dead peer).
_CLIENT_TIMEOUT_S = 10.0

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>streamv2v preview</title>
<style>body{{margin:0;background:#111;color:#ccc;font:14px sans-serif}}
img{{display:block;max-width:100vw;max-height:90vh;margin:auto}}p{{margin:8px 12px}}</style>
</head><body>
<img src="/stream.mjpg" alt="streamv2v output">
<p>OBS: add a Media Source, untick "Local File", Input <code>{stream_url}</code>,
Input Format <code>mjpeg</code>, FFmpeg Options <code>framerate=30</code> (the daemon's output fps;
without it OBS assumes 25 fps and falls behind).</p>
</body></html>
"""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview frame as JPEG")
    return data.tobytes()


class LatestFrame:
    """The newest published frame and, once somebody asked for it, its JPEG bytes."""

    def __init__(self, quality: int) -> None:
        self.quality = quality
        self.frames_encoded = 0
        self._changed = threading.Condition()
        self._rgb: np.ndarray | None = None
        self._seq = 0
        self._closed = False
        # Separate from _changed so publish() never waits while a client encodes.
        self._encode_lock = threading.Lock()
        self._jpeg: tuple[int, bytes] | None = None

    def put(self, rgb: np.ndarray) -> None:
        frame = np.array(rgb, dtype=np.uint8, copy=True)  # the caller may reuse its buffer
        with self._changed:
            self._rgb = frame
            self._seq += 1
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every waiting client with None (the server stops)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def reopen(self) -> None:
        with self._changed:
            self._closed = False

    def wait_newer(self, seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest frame after ``seq`` as (seq, JPEG), or None on timeout or close."""
        with self._changed:
            ready = self._changed.wait_for(lambda: self._closed or self._seq > seq, timeout)
            if not ready or self._closed:
                return None
            seq, rgb = self._seq, self._rgb
        return self._encoded(seq, rgb)

    def latest(self) -> tuple[int, bytes] | None:
        with self._changed:
            seq, rgb = self._seq, self._rgb
        return None if rgb is None else self._encoded(seq, rgb)

    def _encoded(self, seq: int, rgb: np.ndarray) -> tuple[int, bytes]:
        with self._encode_lock:
            # Another client may already have encoded this frame, or a newer one: reuse it.
            if self._jpeg is None or self._jpeg[0] < seq:
                self._jpeg = (seq, encode_jpeg(rgb, self.quality))
                self.frames_encoded += 1
            return self._jpeg


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must never keep the process alive
    block_on_close = False

    def __init__(self, address: tuple[str, int], frames: LatestFrame) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.frames = frames
        self.page = b""
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.stream_clients = 0

    def track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def count_stream(self, delta: int) -> None:
        with self._lock:
            self.stream_clients += delta

    def drop_connections(self) -> None:
        """Shut every client socket down, which wakes a handler blocked in send or recv."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already gone
                connection.shutdown(socket.SHUT_RDWR)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall for seconds
        # on machines with slow DNS; the name is only used in CGI environments, so skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        # Viewers vanish mid-write all the time; that is not worth a traceback on stderr.
        log.debug("preview client %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _CLIENT_TIMEOUT_S
    server_version = "streamv2v-preview"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send_body(200, "text/html; charset=utf-8", self.server.page)
        elif path == "/stream.mjpg":
            self._stream()
        elif path == "/frame.jpg":
            latest = self.server.frames.latest()
            if latest is None:
                self._send_body(503, "text/plain", b"no frame published yet\n")
            else:
                self._send_body(200, "image/jpeg", latest[1])
        else:
            self._send_body(404, "text/plain", b"not found\n")

    def _send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.server.count_stream(+1)
        try:
            self._send_parts()
        except OSError:
            pass  # the viewer left, or stop() shut its socket down
        finally:
            self.server.count_stream(-1)
            self.close_connection = True

    def _send_parts(self) -> None:
        seq = 0
        while not self.server.stopping.is_set():
            newest = self.server.frames.wait_newer(seq, _WAIT_S)
            if newest is None:
                continue
            seq, jpeg = newest
            head = (
                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            ).encode("ascii")
            self.wfile.write(head + jpeg + b"\r\n")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("preview %s: " + format, self.address_string(), *args)


class PreviewServer:
    """Serves the published frames as MJPEG on a loopback address (port 0: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, quality: int = 85) -> None:
        if not is_loopback(host):
            raise ValueError(
                f"preview host {host!r} is not a loopback address: the preview has no "
                "authentication, so it only listens on 127.0.0.1, ::1 or localhost"
            )
        if not 1 <= quality <= 100:
            raise ValueError(f"preview JPEG quality must be 1..100, got {quality}")
        self.host, self.port = host, port
        self._frames = LatestFrame(quality)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a background thread; OSError names the port if it is taken."""
        if self._server is not None:
            return
        self._frames.reopen()  # after a stop(): serve the last frame and new ones again
        try:
            server = _Server((self.host, self.port), self._frames)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot serve the preview on {self.host}:{self.port}: {error.strerror} "
                "(is another streamv2v running? choose another preview port)",
            ) from error
        self._server = server
        server.page = _PAGE.format(stream_url=self.stream_url).encode("utf-8")
        # A short poll interval lets stop() return well within a second.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="preview-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close every client connection (returns within about 0.3 s)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        self._frames.close()
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def publish(self, rgb: np.ndarray) -> None:
        """Make ``rgb`` (HxWx3 uint8 RGB) the frame every client gets next; never blocks."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
        self._frames.put(rgb)

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError("the preview server is not running: call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}/"

    @property
    def stream_url(self) -> str:
        return self.url + "stream.mjpg"

    @property
    def frame_url(self) -> str:
        return self.url + "frame.jpg"

    @property
    def clients(self) -> int:
        """Stream clients connected now."""
        return self._server.stream_clients if self._server is not None else 0

    @property
    def frames_encoded(self) -> int:
        """JPEG encodes so far: at most one per published frame, however many clients watch."""
        return self._frames.frames_encoded

    def __enter__(self) -> PreviewServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
