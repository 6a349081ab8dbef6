"""``streamv2v run``: the daemon in the foreground, from start to stop.

It applies the embedded demo when asked, sets up logging and signals (SIGINT/SIGTERM stop,
SIGHUP reloads the configuration), starts the :class:`~daemon.app.Daemon`, and restarts it, or
only switches its prompt, when the configuration changes on a reload.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from daemon.app import Daemon
from daemon.config import DaemonConfig
from daemon.config_camera import missing_source
from daemon.dataplane.camera import describe_source
from daemon.errors import UserError
from daemon.extras import require
from daemon.logs import setup_logging
from daemon.models.registry import (
    TINY_CANNY,
    TINY_MODEL,
    TINY_SDXL,
    TINY_STYLES,
    tiny_canny_available,
    tiny_sdxl_dir,
    tiny_styles_available,
)
from daemon.styles.presets import UnknownPreset, config_preset

#: Reads the effective configuration again (file and overrides); raises UserError.
ConfigReader = Callable[[], DaemonConfig]


def apply_demo(config: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """The embedded default: a generated camera and a built-in model, so the whole daemon runs
    on a machine with no camera, no GPU and no network. With the trained tiny style model (the
    package ships it) the camera is a moving scene of its world and the demo presets switch
    between its four styles. Returns what was substituted, for the log."""
    data = config.model_dump()
    # A camera the user named (file or --set) wins over the generated one.
    own_camera = "source" in config.camera.model_fields_set
    sdxl = config.engine.model == TINY_SDXL and (tiny_sdxl_dir() / "model_index.json").is_file()
    if sdxl:  # `--demo --model tiny-sdxl`: the SDXL family's tiny model on the same world
        model, size, source, steps = TINY_SDXL, 128, "scene", 1
        notes = [
            "demo: camera -> a generated moving scene of simple shapes (no camera needed)",
            "demo: model -> the built-in tiny SDXL model, trained on such scenes (no download):"
            " presets plain, warm, cool and outline (hotkeys <ctrl>+<alt>+1..4, or `streamv2v "
            "preset NAME`); it knows nothing else",
        ]
        data["presets"].update({"bundled": "demo-sdxl", "startup": "warm"})
    elif tiny_styles_available():
        model, size, source, steps = TINY_STYLES, 128, "scene", 1
        notes = [
            "demo: camera -> a generated moving scene of simple shapes (no camera needed)",
            "demo: model -> the built-in tiny style model, trained on such scenes (no "
            "download): presets plain, warm, cool, outline and sepia, a style LoRA switched in "
            "place (hotkeys <ctrl>+<alt>+1..5, or `streamv2v preset NAME`); it knows nothing "
            "else",
        ]
        data["presets"].update({"bundled": "demo", "startup": "warm"})
        if tiny_canny_available():  # the demo presets' strength needs it to keep the shapes
            data["engine"]["settings"]["control"] = [
                {"model": TINY_CANNY, "preprocess": "canny", "scale": 1.0}
            ]
            notes.append(
                "demo: control -> the built-in tiny canny ControlNet (the camera's edges keep "
                "the scene's shapes at the presets' high strength)"
            )
    else:
        model, size, source, steps = TINY_MODEL, 256, "testpattern", 2
        notes = [
            "demo: camera -> a generated moving test pattern (no physical camera needed)",
            "demo: model -> the built-in tiny model with RANDOM weights (no download): its "
            "output is noise-like, it shows the pipeline, not a style",
        ]
    notes.append(f"demo: engine size {size}x{size}, {steps} step(s) (fast enough on a CPU)")
    data["engine"].update({"model": model, "loras": []})
    data["engine"]["settings"].update({"width": size, "height": size, "steps": steps})
    if own_camera:
        notes[0] = f"demo: camera -> camera.source as set ({describe_source(config.camera.source)})"
    else:
        data["camera"].update({"source": source, "width": 256, "height": 256})
    data["output"]["virtual_camera"].update({"width": 256, "height": 256})
    return DaemonConfig.model_validate(data), notes


def read_usable(read_config: ConfigReader) -> tuple[DaemonConfig, list[str]]:
    """The configuration to run (the demo applied, with its notes for the log); UserError for
    one that can not run at all, such as a camera file that is not there (devices and streams
    are waited for: they may come up later)."""
    config = read_config()
    notes: list[str] = []
    if config.demo:
        config, notes = apply_demo(config)
    problem = missing_source(config.camera.source)
    if problem is not None:
        raise UserError(problem)
    if config.engine.remote:
        require("remote", "[engine] remote")
    return config, notes


def run_foreground(read_config: ConfigReader, duration: float | None, owns_process: bool) -> None:
    """Run the daemon until SIGINT/SIGTERM or ``duration`` seconds; ``owns_process``: this is
    the whole process, which may end at once when a worker lingers in native code."""
    config, notes = read_usable(read_config)
    log_file = setup_logging(config.log.level, config.log.file)
    logger = logging.getLogger("streamv2v")
    for note in notes:
        logger.warning("%s", note)
    logger.info("log file: %s", log_file or "(none)")

    stop = threading.Event()
    reload_requested = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())

    daemon = start_daemon(config)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            stop.wait(0.2 if remaining is None else min(0.2, remaining))
            if reload_requested.is_set():
                reload_requested.clear()
                daemon = reload_daemon(daemon, read_config, logger)
    finally:
        daemon.stop()
        logger.info("stopped: %s", daemon.status())
    if owns_process:
        exit_now_if_threads_linger()


def start_daemon(config: DaemonConfig) -> Daemon:
    """A started Daemon; a startup preset that does not exist is a configuration error."""
    try:
        daemon = Daemon(config)
    except UnknownPreset as err:
        raise UserError(f"presets.startup = {config.presets.startup!r}: {err}") from None
    daemon.start()
    return daemon


def exit_now_if_threads_linger() -> None:
    """End the process at once when a worker is still inside native code (a model load, a long
    engine call): letting the interpreter finalise under a running torch thread can abort it.
    Everything that needed closing (camera, virtual camera, preview, log) is closed by now."""
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def reload_daemon(daemon: Daemon, read_config: ConfigReader, logger: logging.Logger) -> Daemon:
    """SIGHUP: read the configuration again; a bad file keeps the running configuration."""
    try:
        config, _ = read_usable(read_config)
    except UserError as err:
        logger.error("reload refused, keeping the running configuration: %s", err)
        return daemon
    if config == daemon.config:
        logger.info("reload: configuration unchanged")
        return daemon
    if without_prompt(config) == without_prompt(daemon.config):
        # Only the [engine] prompt changed: a preset switch, not a restart.
        daemon.library.set_config_preset(
            config_preset(config.engine.prompt, config.engine.negative_prompt)
        )
        daemon.config = config
        logger.info("reload: new [engine] prompt (preset 'config')")
        return daemon
    logger.info("reload: configuration changed, restarting the daemon")
    daemon.stop()
    try:
        return start_daemon(config)
    except UserError as err:
        logger.error("reload: %s; restarting with the previous configuration", err)
        return start_daemon(daemon.config)


def without_prompt(config: DaemonConfig) -> DaemonConfig:
    engine = config.engine.model_copy(update={"prompt": "", "negative_prompt": ""})
    return config.model_copy(update={"engine": engine})
