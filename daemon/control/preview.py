"""The MJPEG-over-HTTP preview as an output: frames in (``publish``), a stream out for a
browser, OpenCV or an OBS Media Source (``/stream.mjpg``, ``/frame.jpg``, and ``/`` a page).

The frames and their JPEG bytes live in a :class:`~daemon.control.mjpeg.FrameStore` (one
encode per frame whatever the number of viewers; ``publish`` never waits); they are served by
the control-plane server (server.py). On its own a PreviewServer runs a server of its own with
the preview only; the daemon passes its one ``server`` instead, which also carries the control
API, and starts and stops it itself. Loopback only: the preview has no authentication.
"""

from __future__ import annotations

import numpy as np

from daemon.config import is_loopback
from daemon.control.mjpeg import BOUNDARY, FrameStore, encode_jpeg
from daemon.control.server import ControlPlaneServer

__all__ = ["BOUNDARY", "PreviewServer", "encode_jpeg"]


class PreviewServer:
    """Serves the published frames as MJPEG on a loopback address (port 0: any free port)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        quality: int = 85,
        *,
        server: ControlPlaneServer | None = None,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(
                f"preview host {host!r} is not a loopback address: the preview has no "
                "authentication, so it only listens on 127.0.0.1, ::1 or localhost"
            )
        self.host, self.port = host, port
        self.frames = FrameStore(quality)  # ValueError for a quality outside 1..100
        self._shared = server
        self._server: ControlPlaneServer | None = None
        self._url: str | None = None

    def start(self) -> None:
        """Listen (OSError names the port if it is taken) and, on its own, serve."""
        if self._url is not None:
            return
        server = self._shared or ControlPlaneServer(api=None)
        server.frames = self.frames
        try:
            url = server.listen(self.host, self.port)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot serve the preview on {self.host}:{self.port}: {error.strerror} "
                "(is another streamv2v running? choose another preview port)",
            ) from error
        if self._shared is None:
            server.start()
            self._server = server
        self._url = url + "/"

    def stop(self) -> None:
        """Stop serving (on its own) and close every client connection (within ~0.3 s)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._url = None

    def publish(self, rgb: np.ndarray) -> None:
        """Make ``rgb`` (HxWx3 uint8 RGB) the frame every client gets next; never blocks."""
        self.frames.publish(rgb)

    @property
    def bound_port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the preview server is not running: call start() first")
        return self._url

    @property
    def stream_url(self) -> str:
        return self.url + "stream.mjpg"

    @property
    def frame_url(self) -> str:
        return self.url + "frame.jpg"

    @property
    def clients(self) -> int:
        """Stream clients connected now."""
        return self.frames.stream_clients

    @property
    def frames_encoded(self) -> int:
        """JPEG encodes so far: at most one per published frame, however many clients watch."""
        return self.frames.frames_encoded

    def __enter__(self) -> PreviewServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
