"""Logging for the daemon: stderr plus a rotating file in the user's log dir, one line per state
change (never per frame)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from platformdirs import user_log_dir

FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s: %(message)s"


def default_log_file() -> Path:
    return Path(user_log_dir("streamv2v")) / "streamv2v.log"


def setup_logging(level: str = "INFO", file: Path | None = None) -> Path | None:
    """Log to stderr and to ``file`` (default: the user log dir), rotating at 5 MB x 3.

    Returns the log file in use, or None when it could not be opened (stderr only, said once).
    """
    root = logging.getLogger("streamv2v")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter)
    root.addHandler(err)
    path = file or default_log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=5 * 2**20, backupCount=3, encoding="utf-8"
        )
    except OSError as exc:
        root.warning("log file %s cannot be opened (%s): logging to stderr only", path, exc)
        return None
    handler.setFormatter(formatter)
    root.addHandler(handler)
    return path
