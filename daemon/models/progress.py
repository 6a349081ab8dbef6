"""Progress of the long first-run work (downloading, then compiling), where a person looks.

:class:`Readiness` is the one record of it: the fetch and the engine worker write it, and it is
read as a dict (``snapshot``) by /status, /events and the page, and as a log line every few
seconds (a service has no terminal for a bar). :class:`BarProgress` is the terminal's bar
(``streamv2v models pull``): bytes, rate and ETA, by tqdm.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("streamv2v")

#: Seconds between two progress lines in the log.
LOG_EVERY_S = 3.0
#: The rate is measured over this window (s): it follows a connection that slows down.
_RATE_WINDOW_S = 5.0


class DownloadProgress(Protocol):
    """What a fetch reports: a total once, then each file and each chunk of bytes."""

    def begin(self, total_bytes: int, files: int) -> None: ...

    def file(self, name: str, size: int, index: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def end(self) -> None: ...


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0, round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def describe(ready: dict[str, Any]) -> str:
    """One line for a :meth:`Readiness.snapshot` (the log, `streamv2v status`)."""
    if ready["phase"] == "download":
        rate = ready["rate_bps"]
        return (
            f"{human_bytes(ready['bytes_done'])} of {human_bytes(ready['bytes_total'])} "
            f"({ready['file_index']}/{ready['files']}: {ready['file']}), "
            f"{'?' if rate is None else human_bytes(rate)}/s, "
            f"about {human_seconds(ready['eta_s'])} left"
        )
    if ready["phase"] == "compiling":
        left = "" if ready["eta_s"] is None else f", about {human_seconds(ready['eta_s'])} left"
        return f"compiling {min(ready['done'] + 1, ready['total'])} of {ready['total']}{left}"
    return f"loading {ready.get('what', 'the model')}"


class Readiness:
    """What the engine is doing before its first styled frame, thread-safe.

    Phases: ``download`` (file, bytes done/total, rate, ETA), ``loading`` and ``compiling``
    (k of n configurations, with an estimate from the ones done); None once the engine runs.
    """

    def __init__(
        self, log_every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock  # (monotonic seconds; a test's own clock times the rate exactly)
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._samples: list[tuple[float, int]] = []
        self._log_every_s = log_every_s
        self._logged_at = 0.0
        self._started = 0.0

    # ------------------------------------------------------------ download (DownloadProgress)
    def begin(self, total_bytes: int, files: int) -> None:
        now = self._clock()
        with self._lock:
            self._started, self._logged_at = now, now
            self._samples = [(now, 0)]
            self._state = {
                "phase": "download",
                "file": None,
                "file_index": 0,
                "files": files,
                "bytes_done": 0,
                "bytes_total": total_bytes,
                "rate_bps": None,
                "eta_s": None,
            }
        log.info("models: downloading %s in %d files", human_bytes(total_bytes), files)

    def file(self, name: str, size: int, index: int) -> None:
        with self._lock:
            if self._state is not None:
                self._state.update(file=name, file_index=index, file_bytes=size)

    def advance(self, nbytes: int) -> None:
        now = self._clock()
        line = None
        with self._lock:
            st = self._state
            if st is None:
                return
            st["bytes_done"] += nbytes
            self._samples.append((now, st["bytes_done"]))
            while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW_S:
                self._samples.pop(0)
            t0, b0 = self._samples[0]
            if now - t0 > 0.2:
                rate = (st["bytes_done"] - b0) / (now - t0)
                st["rate_bps"] = rate
                left = st["bytes_total"] - st["bytes_done"]
                st["eta_s"] = left / rate if rate > 0 else None
            if now - self._logged_at >= self._log_every_s:
                self._logged_at = now
                line = describe(st)
        if line:
            log.info("models: %s", line)

    def end(self) -> None:
        with self._lock:
            st = self._state
            took = self._clock() - self._started
        if st is not None and st.get("phase") == "download":
            log.info("models: downloaded %s in %.0f s", human_bytes(st["bytes_done"]), took)

    # ------------------------------------------------------------ loading and compiling
    def loading(self, what: str) -> None:
        with self._lock:
            self._state = {"phase": "loading", "what": what}

    def compiling(self, done: int, total: int, started: float) -> None:
        """``done`` of ``total`` configurations compiled since ``started`` (on this clock)."""
        elapsed = self._clock() - started
        eta = elapsed / done * (total - done) if done else None
        state = {
            "phase": "compiling",
            "done": done,
            "total": total,
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }
        with self._lock:
            self._state = state
        log.info("engine: %s", describe(state))

    def clear(self) -> None:
        with self._lock:
            self._state = None

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._state is None else dict(self._state)


class BarProgress:
    """A terminal progress bar over all the files of a pull: bytes, rate and ETA."""

    def __init__(self, stream: Any = None) -> None:
        self._bar: Any = None
        self._stream = stream

    def begin(self, total_bytes: int, files: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc=f"{files} files",
            file=self._stream,
            mininterval=0.5,
            dynamic_ncols=True,
        )

    def file(self, name: str, size: int, index: int) -> None:
        if self._bar is not None:
            self._bar.set_description_str(name[-40:], refresh=False)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
