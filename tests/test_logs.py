"""The daemon's log: a file in the user's log dir plus stderr, one line per state change (never
per frame), and --log-level."""

from __future__ import annotations

import logging.handlers
import os
import subprocess
import sys
import threading
import time

from test_daemon import wait_for

from daemon.cli import main
from daemon.logs import setup_logging


def run_daemon(tmp_path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "daemon", "run", "--demo", "--set", "output.preview.port=0"]
    cmd += ["--set", "control.port=0", "--set", "hotkeys.enabled=false", *extra]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_state_changes_are_logged_once_each_to_the_user_log_dir_never_per_frame(tmp_path):
    proc, lines = run_daemon(tmp_path)
    try:
        assert wait_for(lambda: any("engine: running" in ln for ln in lines), 90), lines
        time.sleep(1.0)
        assert main(["preset", "cool"]) == 0
        time.sleep(4.0)  # ~120 frames published at 30 fps
    finally:
        stop(proc)
    log_file = tmp_path / "state" / "streamv2v" / "log" / "streamv2v.log"
    text = log_file.read_text()
    assert text.count("engine: running") == 1
    assert "preset: warm -> cool (control API)" in text
    assert "camera live: generated scene" in text
    assert "stopped:" in text  # the figures at exit
    logged = text.splitlines()
    published = int(text.split("'published': ")[1].split(",")[0])
    assert published > 100 and len(logged) < 30, (published, logged)
    assert "".join(lines).count("preset: warm -> cool") == 1  # and the same on stderr


def test_log_level_warning_keeps_info_lines_out(tmp_path):
    proc, lines = run_daemon(tmp_path, "--log-level", "WARNING")
    try:
        assert wait_for(lambda: any("demo: model ->" in ln for ln in lines), 30), lines
        time.sleep(3.0)
    finally:
        stop(proc)
    text = (tmp_path / "state" / "streamv2v" / "log" / "streamv2v.log").read_text()
    assert "WARNING" in text and " INFO " not in text


def test_the_log_file_rotates(tmp_path):
    logger = logging.getLogger("streamv2v")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        path = setup_logging("INFO", tmp_path / "d.log")
        rotating = [
            h for h in logger.handlers if isinstance(h, logging.handlers.RotatingFileHandler)
        ]
        assert path == tmp_path / "d.log" and len(rotating) == 1
        assert rotating[0].maxBytes == 5 * 2**20 and rotating[0].backupCount == 3
    finally:  # leave the logger as other tests (caplog) expect it
        for handler in logger.handlers:
            handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
