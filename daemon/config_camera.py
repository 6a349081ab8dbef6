"""What a camera source is: the forms ``camera.source`` accepts, how each is opened, and the
check ``streamv2v run`` makes before it starts.

A device (an index or a /dev/videoN path) that is absent may be plugged in later, and a stream
may come up later, so the capture thread waits for those; a video *file* that is not there will
not appear by itself, so it is refused at start like any other bad value (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

SourceKind = Literal["device", "file", "url", "testpattern", "scene", "ndi"]

SOURCE_WORDS = (
    "a device index (0, 1, ...), a /dev/videoN path, a video file, "
    "an http(s)/rtsp URL, 'ndi:NAME' (an NDI source), 'testpattern' or 'scene' (generated cameras)"
)
_URL_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp", "udp", "tcp")


def check_source(value: Any) -> int | str:
    """``camera.source`` as given (TOML or a ``--set`` override), normalised: digits become a
    device index. ValueError says what the forms are."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"camera source must be {SOURCE_WORDS}")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ValueError(f"camera source is empty; give {SOURCE_WORDS}")
        if value.isdigit():
            return int(value)
        if value.startswith("ndi:") and not value[4:].strip():
            raise ValueError("camera source 'ndi:' names no NDI source; give ndi:NAME")
    if isinstance(value, int) and value < 0:
        raise ValueError("a camera device index is 0 or more")
    return value


def source_kind(source: int | str) -> SourceKind:
    """Classify a camera source: device index or /dev path, URL, the test pattern, or a file."""
    if isinstance(source, int) or source.startswith("/dev/"):
        return "device"
    if source in ("testpattern", "scene"):
        return source  # type: ignore[return-value]
    if source.startswith("ndi:"):
        return "ndi"
    scheme, sep, _ = source.partition("://")
    if sep and scheme.lower() in _URL_SCHEMES:
        return "url"
    return "file"


def missing_source(source: int | str) -> str | None:
    """Why ``source`` cannot be used at all, as one line naming ``camera.source`` and the fix;
    None when it can (or may become usable: devices and streams are waited for)."""
    if source_kind(source) != "file":
        return None
    path = Path(str(source)).expanduser()
    if path.is_dir():
        problem = f"{str(path)!r} is a folder, not a video file"
    elif not path.exists():
        problem = f"no such video file ({path.absolute()})"
    else:
        return None
    return f"camera.source = {source!r}: {problem}; give an existing file, or {SOURCE_WORDS}"
