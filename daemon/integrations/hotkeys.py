"""Global hotkeys (pynput): combos that switch presets, from any application.

pynput is imported only when the listener starts: without a usable display (a headless service,
Wayland without XWayland) its import fails, and without accessibility permission on macOS it sees
no keys; the daemon then carries on without hotkeys after one log line. check_combo() validates
combos without pynput, so a config error shows even where hotkeys cannot run.

Known pynput-on-X limits (usual XKB keymap): ``<ctrl>+<alt>+<fN>`` never fires (X maps it to
XF86Switch_VT_N and pynput drops the key), nor does ``<ctrl>+<shift>+1`` (the key arrives as
``!``); letters with shift are fine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

#: Special key names pynput understands inside ``<...>`` (its ``Key`` members), plus ``<NNN>``
#: virtual key codes. Checked here, without importing pynput, so a config error shows at once.
_SPECIAL_KEY_NAMES = """
    alt alt_l alt_r alt_gr backspace caps_lock cmd cmd_l cmd_r ctrl ctrl_l ctrl_r delete down end
    enter esc home left page_down page_up right shift shift_l shift_r space tab up insert menu
    num_lock pause print_screen scroll_lock media_play_pause media_volume_mute media_volume_down
    media_volume_up media_previous media_next"""
_SPECIAL_KEYS = frozenset(_SPECIAL_KEY_NAMES.split() + [f"f{i}" for i in range(1, 21)])
_MODIFIERS = frozenset({"alt", "alt_l", "alt_r", "alt_gr", "cmd", "cmd_l", "cmd_r", "ctrl"})
_MODIFIERS |= {"ctrl_l", "ctrl_r", "shift", "shift_l", "shift_r"}
_VK = re.compile(r"<\d+>")


def check_combo(text: str) -> str:
    """Validate a pynput hotkey combo such as ``<ctrl>+<alt>+1`` and return it normalised
    (lower case, no spaces). Raises ValueError naming the bad part and the expected form."""
    combo = text.strip().lower().replace(" ", "")
    parts = combo.split("+") if combo else []
    example = "e.g. '<ctrl>+<alt>+1' or '<ctrl>+<shift>+<f5>'"
    if not parts or any(not p for p in parts):
        raise ValueError(
            f"hotkey {text!r} is empty or has an empty part; write keys joined by +, {example}"
        )
    for part in parts:
        if len(part) == 1 or _VK.fullmatch(part):
            continue
        if part.startswith("<") and part.endswith(">") and part[1:-1] in _SPECIAL_KEYS:
            continue
        hint = f"; did you mean <{part}>?" if part in _SPECIAL_KEYS else ""
        raise ValueError(
            f"hotkey {text!r}: {part!r} is not a key (a single character, <name> such as <ctrl>, "
            f"<f5>, <space>, or <NNN> for a key code){hint}; {example}"
        )
    if len(set(parts)) != len(parts):
        raise ValueError(f"hotkey {text!r} names a key twice")
    if all(p[1:-1] in _MODIFIERS for p in parts if p.startswith("<")) and all(
        p.startswith("<") for p in parts
    ):
        raise ValueError(f"hotkey {text!r} has only modifiers; add a key, {example}")
    return combo


log = logging.getLogger("streamv2v.hotkeys")

#: How long a new pynput listener may take to connect before start() gives up on it (it takes
#: ~25 ms on Xvfb).
_READY_TIMEOUT_S = 3.0
#: How long stop() waits for pynput's thread to close its X connections.
_JOIN_TIMEOUT_S = 2.0
#: How often the watchdog looks at the listener thread; a lost X server shows within this.
_WATCH_INTERVAL_S = 0.5


class HotkeyListener:
    """Global hotkeys through pynput, in pynput's own listener thread.

    Actions run on pynput's thread, so they should be quick (set a flag, queue a preset switch);
    one that raises is logged in one line and the listener keeps going (pynput itself would stop
    the listener on any exception from a callback).

    ``state`` is ``"off"`` (not started or stopped), ``"listening"``, ``"unavailable"`` (start()
    failed: no display, no permission, pynput missing; call start() again once that is fixed)
    or ``"lost"`` (the listener thread died, e.g. the X server went away; a watchdog thread
    retries every ``retry_interval_s`` seconds, quietly, and logs once when hotkeys are back).
    """

    #: "off" | "listening" | "unavailable" | "lost", for the daemon's status.
    state: str

    def __init__(
        self, bindings: Mapping[str, Callable[[], None]], *, retry_interval_s: float = 5.0
    ) -> None:
        self.state = "off"
        self._bindings = dict(bindings)
        self._retry_interval_s = retry_interval_s
        self._next_retry = 0.0
        self._lock = threading.RLock()
        self._listener: Any = None
        #: Bumped for each new pynput listener; a callback from an older one does nothing.
        self._generation = 0
        self._listener_combos: frozenset[str] = frozenset()
        self._reported_bad_combos: set[str] = set()
        self._death_reasons: dict[int, str] = {}
        self._closing = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self) -> bool:
        """Start listening. Returns False after one log line saying what is missing, so the
        daemon can carry on without hotkeys; calling it again later (e.g. once DISPLAY is set)
        tries again."""
        with self._lock:
            if self.state in ("listening", "lost"):
                return self.state == "listening"
            problem = self._start_listener()
            wayland = wayland_session()
            if problem is not None:
                self.state = "unavailable"
                if not wayland:
                    log.warning("global hotkeys unavailable: %s", problem)
                elif _first_wayland_note():
                    log.warning(
                        "global hotkeys need X11 and this Wayland session has none usable "
                        "(%s); on Wayland, use %s",
                        problem,
                        WAYLAND_WAYS,
                    )
                return False
            self.state = "listening"
            if wayland and _first_wayland_note():
                log.info(
                    "hotkeys listen through XWayland: they fire only while an X11 (XWayland) "
                    "window has focus; for keys that work everywhere, use %s",
                    WAYLAND_WAYS,
                )
            self._start_watchdog()
            return True

    def update(self, bindings: Mapping[str, Callable[[], None]]) -> None:
        """Use new bindings (the preset files changed). pynput is restarted only when the set
        of combos changed: a new action for the same combo is looked up at key time."""
        with self._lock:
            self._bindings = dict(bindings)
            if self.state != "listening" or set(self._bindings) == self._listener_combos:
                return  # off/unavailable: stored for start(); lost: the watchdog uses them
            self._stop_listener()
            problem = self._start_listener()
            if problem is not None:
                self._mark_lost(problem)

    def stop(self) -> None:
        """Stop listening and the watchdog; the bindings are kept for a later start()."""
        with self._lock:
            self._closing.set()
            watchdog, self._watchdog = self._watchdog, None
            self._stop_listener()
            self.state = "off"
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(_JOIN_TIMEOUT_S)

    # -- internals -------------------------------------------------------------------------

    def _start_listener(self) -> str | None:
        """Create and start a pynput listener for the current combos; None when it listens,
        else what is missing (without logging, so the watchdog can retry quietly)."""
        problem = _display_problem()
        if problem is not None:
            return problem
        try:
            keyboard = _import_pynput_keyboard()
        except ImportError as error:
            return _import_problem(error)
        self._generation += 1
        hotkeys = {}
        for combo in self._bindings:
            try:
                keyboard.HotKey.parse(combo)
            except ValueError:
                if combo not in self._reported_bad_combos:
                    self._reported_bad_combos.add(combo)
                    log.error("hotkey %r: pynput cannot parse it; it is ignored", combo)
                continue
            hotkeys[combo] = self._dispatcher(combo, self._generation)
        listener = keyboard.GlobalHotKeys(hotkeys)
        self._record_death_of(listener)
        listener.start()
        ready = _wait_until_ready(listener)
        if sys.platform == "darwin" and not getattr(listener, "IS_TRUSTED", True):
            _stop_pynput_listener(listener)
            return (
                "macOS does not let this process see key events; grant it Accessibility "
                "(and Input Monitoring) in System Settings > Privacy & Security, then restart it"
            )
        if not ready:
            _stop_pynput_listener(listener)
            reason = self._death_reasons.pop(listener.ident or 0, None)
            if reason is None:
                return f"the key listener did not connect within {_READY_TIMEOUT_S:g} s"
            return f"the key listener could not start: {reason}"
        self._listener, self._listener_combos = listener, frozenset(self._bindings)
        return None

    def _dispatcher(self, combo: str, generation: int) -> Callable[[], None]:
        """The callback pynput calls for ``combo``: it runs the action bound now (so update()
        with the same combos needs no restart) and keeps its exceptions from pynput."""

        def run_action() -> None:
            action = self._bindings.get(combo)
            if action is None or generation != self._generation:
                return
            try:
                action()
            except Exception as error:
                log.error("hotkey %s: the action failed: %s", combo, _describe(error))

        return run_action

    def _record_death_of(self, listener: Any) -> None:
        """Wrap the listener thread's run() so that its death (the X connection closed) is
        kept for the watchdog's log line instead of printed as a thread traceback."""
        run = listener.run

        def run_recording_death() -> None:
            try:
                run()
            except Exception as error:
                self._death_reasons[threading.get_ident()] = _describe(error)

        listener.run = run_recording_death

    def _stop_listener(self) -> None:
        listener, self._listener = self._listener, None
        self._listener_combos = frozenset()
        self._generation += 1
        if listener is not None:
            _stop_pynput_listener(listener)
            self._death_reasons.pop(listener.ident or 0, None)

    def _mark_lost(self, reason: str) -> None:
        self.state = "lost"
        self._next_retry = time.monotonic() + self._retry_interval_s
        log.warning("global hotkeys lost: %s; retrying every %g s", reason, self._retry_interval_s)

    def _start_watchdog(self) -> None:
        self._closing = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, args=(self._closing,), name="hotkeys-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch(self, closing: threading.Event) -> None:
        """Notice a dead listener thread (pynput dies silently when the X server goes) and
        start a new listener with a fixed back-off until it works again."""
        while not closing.wait(min(_WATCH_INTERVAL_S, self._retry_interval_s)):
            with self._lock:
                if closing.is_set():
                    return
                listener = self._listener
                if self.state == "listening" and listener is not None and not listener.is_alive():
                    reason = self._death_reasons.pop(listener.ident or 0, "its thread ended")
                    self._stop_listener()
                    self._mark_lost(f"the key listener stopped ({reason})")
                elif self.state == "lost" and time.monotonic() >= self._next_retry:
                    if self._start_listener() is None:
                        self.state = "listening"
                        log.info("global hotkeys are back")
                    else:
                        self._next_retry = time.monotonic() + self._retry_interval_s


def _stop_pynput_listener(listener: Any) -> None:
    """Stop a pynput listener and wait for its thread to close its X connections (so that a
    restart in update() never leaves two listeners, and stop() leaves no thread behind).

    pynput's stop() raises when the X connection is already gone (nothing left to stop then),
    and blocks until the listener is ready when it is not yet; such a stop is left to a helper
    thread so no caller hangs on a display that does not answer."""

    def stop_quietly() -> None:
        with contextlib.suppress(Exception):
            listener.stop()

    if not listener.is_alive():
        return
    if not getattr(listener, "_ready", True):
        threading.Thread(target=stop_quietly, name="hotkeys-stop", daemon=True).start()
        return
    stop_quietly()
    if listener is threading.current_thread():
        return
    threading.Thread.join(listener, 0.1)  # pynput's own join() re-raises the thread's error
    if listener.is_alive():
        # pynput 1.8 on X disables the record context on the connection that is blocked
        # reading it, so once a key has been seen the thread only ends at the next key event
        # (moses-palmer/pynput#583); disabling it from the other connection ends it now.
        with contextlib.suppress(Exception):
            listener._display_stop.record_disable_context(listener._context)
            listener._display_stop.flush()
        threading.Thread.join(listener, _JOIN_TIMEOUT_S)


#: What works where global hotkeys do not (Wayland gives no application keys it has not got
#: the focus for): the desktop's own shortcuts, and OBS's hotkeys (OBS focused, or a Stream Deck).
WAYLAND_WAYS = (
    "`streamv2v preset NAME|next|prev` bound to keyboard shortcuts in the desktop's settings "
    "(README: Desktop shortcuts), or OBS's own hotkeys through the OBS script (`streamv2v "
    "obs-script` says how to add it; they fire while OBS has focus, or from a Stream Deck)"
)
#: Taken, never released, by the first start that notes it: the log says it once per process.
_wayland_note = threading.Lock()


def wayland_session(env: Mapping[str, str] | None = None) -> bool:
    """A Linux desktop on Wayland, where an application can not grab keys globally."""
    env = os.environ if env is None else env
    wayland = env.get("XDG_SESSION_TYPE") == "wayland" or bool(env.get("WAYLAND_DISPLAY"))
    return sys.platform.startswith("linux") and wayland


def _first_wayland_note() -> bool:
    """True the first time the Wayland note is due in this process, False after."""
    return _wayland_note.acquire(blocking=False)


def _display_problem() -> str | None:
    """What keeps pynput's X backend from working, said with what to do; None when it may."""
    if not sys.platform.startswith("linux") or os.environ.get("PYNPUT_BACKEND"):
        return None
    if os.environ.get("DISPLAY"):
        return None
    if os.environ.get("WAYLAND_DISPLAY"):
        return (
            "no DISPLAY; pynput needs XWayland: set DISPLAY to the XWayland display (keys then "
            "fire only while an X11 window has focus)"
        )
    return (
        "no DISPLAY is set; run the daemon inside an X session (or set DISPLAY, e.g. "
        "DISPLAY=:0) to use global hotkeys"
    )


def _import_pynput_keyboard() -> Any:
    """Import pynput.keyboard now rather than at module import: its X backend connects to the
    display while importing. A failed import leaves only display-independent modules behind
    (pynput._util, Xlib), and Python drops the half-imported ones, so importing again later
    (after DISPLAY appears) runs the X check again and can succeed."""
    import pynput.keyboard

    return pynput.keyboard


def _import_problem(error: ImportError) -> str:
    """Say what is missing from an ImportError raised while importing pynput."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "pynput":
        return "pynput is not installed (pip install 'streamv2v[app]' or pip install pynput)"
    text = " ".join(str(error).split("\n\n")[0].split())
    if "X connection" in text:
        display = os.environ.get("DISPLAY", "")
        return (
            f"cannot connect to the X server at DISPLAY={display} ({_x_connection_error(text)}); "
            "start the daemon inside that X session (or let it in with xhost)"
        )
    if sys.platform == "darwin":
        return (
            f"pynput cannot load ({text}); install pyobjc and grant this process "
            "Accessibility in System Settings > Privacy & Security"
        )
    return f"pynput cannot load: {text}"


def _x_connection_error(fallback: str) -> str:
    """Why the X connection fails, in Xlib's words (pynput's ImportError buries them in a
    tuple repr); ``fallback`` when connecting now works or Xlib is missing."""
    try:
        import Xlib.display

        Xlib.display.Display().close()
    except Exception as error:
        return str(error).strip()
    return fallback


def _wait_until_ready(listener: Any) -> bool:
    """Wait until pynput's thread is listening, or has died (no X connection). pynput's own
    wait() blocks forever when the thread dies before it is ready, hence this poll on its
    ``_ready`` flag; without that flag (a future pynput) a live thread counts as ready."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if getattr(listener, "_ready", False):
            return listener.is_alive()
        if not listener.is_alive():
            return False
        time.sleep(0.005)
    return not hasattr(listener, "_ready") and listener.is_alive()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
