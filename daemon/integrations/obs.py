"""OBS Studio remote control (obs-websocket v5 through obsws-python): the program scene and
custom events pick presets.

Everything runs in one thread that connects, watches the event socket and reconnects with
backoff, so a missing, restarting or misconfigured OBS never blocks or crashes the daemon. Each
kind of trouble is logged once (not once per retry) and the password never reaches a log line:
obsws-python logs it at INFO, so its logger is silenced here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import obsws_python
from obsws_python.error import OBSSDKError, OBSSDKRequestError, OBSSDKTimeoutError
from obsws_python.subs import Subs
from websocket import WebSocketException

from daemon.config import ConfigError, ObsConfig

log = logging.getLogger("streamv2v.obs")
# obsws-python logs the password ("Connecting with parameters", client reprs) and a traceback
# for every refused connection; nothing it says is worth that.
logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 1)

#: How often the thread checks that the event socket is still open (loss-detection latency).
_WATCH_S = 0.1
#: CustomEvent is in obs-websocket's "General" category; scene changes in "Scenes".
_SUBSCRIPTIONS = Subs.GENERAL | Subs.SCENES
_CONNECTION_ERRORS = (OSError, WebSocketException, OBSSDKTimeoutError)


class ObsControl:
    """obs-websocket v5 client (obsws-python) in its own thread: program-scene changes and
    CustomEvents {"streamv2v": {"preset": NAME}} select presets; reconnects with backoff.

    ``state`` is "connecting" (never connected yet), "connected", "auth_failed" (wrong or
    unresolvable password), "lost" (was connected, reconnecting) or "stopped".
    ``on_preset(name, reason)`` runs in obsws-python's event thread and should return quickly.
    """

    def __init__(
        self,
        config: ObsConfig,
        *,
        on_preset: Callable[[str, str], None],
        preset_for_scene: Callable[[str], str | None],
    ) -> None:
        self.state = "stopped"
        self.scene: str | None = None
        self.generation = 0  #: connections made so far (a reconnect is a new OBS session)
        self._config = config
        self._on_preset = on_preset
        self._preset_for_scene = preset_for_scene
        self._where = f"{config.host}:{config.port}"
        self._stopping = threading.Event()
        self._request_failed = threading.Event()  # the request socket broke: reconnect both
        self._thread: threading.Thread | None = None
        self._events: obsws_python.EventClient | None = None
        self._requests: obsws_python.ReqClient | None = None
        # obsws-python pairs a request with the next message read: one request at a time.
        self._request_lock = threading.Lock()
        # Orders the scene from an event against the one GetCurrentProgramScene reports.
        self._scene_lock = threading.Lock()
        self._scene_events = 0
        self._ever_connected = False
        self._reported: str | None = None  # the trouble already logged; retries stay quiet

    def start(self) -> None:
        """Start the connection thread and return at once (right after a stop() that gave up on
        a connect attempt, once that attempt has ended: at most obs.timeout_s)."""
        if self._thread is not None and self._thread.is_alive():
            if not self._stopping.is_set():
                return
            self._thread.join()
        self._stopping.clear()
        self.state = "lost" if self._ever_connected else "connecting"
        self._thread = threading.Thread(target=self._run, name="obs-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect and join the thread; returns after ``timeout`` even if a connect attempt
        is still in flight (the daemon thread then closes what it opened and ends)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def request(self, name: str, data: dict | None = None) -> Any | None:
        """Send an obs-websocket request; its response data ({} for a request that answers
        none), or None while not connected (or when the connection breaks now).
        OBSSDKRequestError (OBS refused it) is raised."""
        client = self._requests
        if client is None or self.state != "connected":
            return None
        return self._send(client, name, data)

    def _send(self, client: obsws_python.ReqClient, name: str, data: dict | None) -> Any | None:
        with self._request_lock:
            try:
                answer = client.send(name, data, raw=True)
                return {} if answer is None else answer
            except OBSSDKRequestError:
                raise
            except _CONNECTION_ERRORS as exc:
                # A timed-out answer may still arrive and be taken for the next one's: start over.
                log.debug("OBS request %s not sent (%s); reconnecting", name, type(exc).__name__)
                self._request_failed.set()
                return None

    # The connection thread

    def _run(self) -> None:
        min_s, max_s = self._config.reconnect_min_s, self._config.reconnect_max_s
        backoff = min_s
        try:
            while not self._stopping.is_set():
                trouble = self._connect()
                if trouble is None:
                    self._watch()
                    self._disconnect()
                    pause, backoff = min_s, min(min_s * 2, max_s)
                elif trouble in ("auth", "config"):  # a person has to fix it: no hurry
                    pause = max_s
                else:
                    pause, backoff = backoff, min(backoff * 2, max_s)
                self._stopping.wait(pause)
        finally:
            self._disconnect()
            self.state = "stopped"

    def _connect(self) -> str | None:
        """One attempt: None when connected, else the kind of trouble ("config", "auth",
        "unreachable", "error"), logged only when it differs from the last one logged."""
        config = self._config
        try:
            password = config.resolve_password()
        except ConfigError as exc:
            self._report("config", logging.ERROR, "OBS: %s", exc)
            self._set_state("auth_failed")
            return "config"
        events = None
        try:
            server = {"host": config.host, "port": config.port, "password": password}
            events = obsws_python.EventClient(
                **server, timeout=config.timeout_s, subs=_SUBSCRIPTIONS
            )
            requests = obsws_python.ReqClient(**server, timeout=config.timeout_s)
        except Exception as exc:
            if events is not None:
                _close(events)
            return self._connect_failed(exc, password)
        self._events, self._requests = events, requests
        self._request_failed.clear()
        events.callback.register(self._callbacks())
        if self._stopping.is_set():
            return None  # stop() came while connecting; _run closes the clients
        self._follow_current_scene(requests)
        log.info("Connected to OBS at %s (program scene %r)", self._where, self.scene)
        self._ever_connected, self._reported = True, None
        self.generation += 1
        self._set_state("connected")
        return None

    def _connect_failed(self, exc: Exception, password: str) -> str:
        if isinstance(exc, OBSSDKError) and not isinstance(exc, OBSSDKTimeoutError):
            problem = "rejected the websocket password" if password else "wants a password"
            self._report(
                "auth",
                logging.ERROR,
                "OBS at %s %s: check obs.password / obs.password_env / obs.password_file "
                "against OBS Tools > WebSocket Server Settings (retrying every %g s)",
                self._where,
                problem,
                self._config.reconnect_max_s,
            )
            self._set_state("auth_failed")
            return "auth"
        if isinstance(exc, _CONNECTION_ERRORS):
            reason = _redact(str(exc) or type(exc).__name__, password)
            self._report(
                "unreachable", logging.INFO, "OBS not reachable at %s (%s), retrying",
                self._where, reason,
            )  # fmt: skip
            trouble = "unreachable"
        else:
            reason = _redact(f"{type(exc).__name__}: {exc}", password)
            self._report("error", logging.WARNING, "OBS at %s: %s; retrying", self._where, reason)
            trouble = "error"
        self._set_state("lost" if self._ever_connected else "connecting")
        return trouble

    def _watch(self) -> None:
        """Wait until the event socket closes (OBS quit or the network went) or stop()."""
        events = self._events
        while not self._stopping.wait(_WATCH_S):
            if events is None or not events.worker.is_alive() or self._request_failed.is_set():
                log.warning("Lost the connection to OBS at %s; reconnecting", self._where)
                self._reported = "unreachable"  # said already: the retries that follow are quiet
                self._set_state("lost")
                return

    def _disconnect(self) -> None:
        events, self._events = self._events, None
        requests, self._requests = self._requests, None
        for client in (requests, events):
            if client is not None:
                _close(client)

    def _set_state(self, state: str) -> bool:
        """Set ``state`` unless stop() was called (it says "stopped" then); False if so."""
        if self._stopping.is_set():
            return False
        self.state = state
        return True

    def _report(self, trouble: str, level: int, message: str, *args: object) -> None:
        if trouble != self._reported:
            self._reported = trouble
            log.log(level, message, *args)

    # Scenes and custom events

    def _callbacks(self) -> list[Callable[[Any], None]]:
        """obsws-python calls a callback by its function name (on_<snake_case event>)."""

        def on_current_program_scene_changed(data: Any) -> None:
            scene = getattr(data, "scene_name", None)
            if isinstance(scene, str):
                with self._scene_lock:
                    self._scene_events += 1
                    self._apply_scene(scene)

        def on_custom_event(data: Any) -> None:
            self._custom_event(getattr(data, "streamv2v", None))

        return [_guarded(on_current_program_scene_changed), _guarded(on_custom_event)]

    def _follow_current_scene(self, requests: obsws_python.ReqClient) -> None:
        """Apply the scene OBS already shows, unless an event reported a newer one meanwhile."""
        with self._scene_lock:
            seen = self._scene_events
        try:
            reply = self._send(requests, "GetCurrentProgramScene", None) or {}
        except OBSSDKRequestError as exc:
            log.warning("OBS did not say its program scene: %s", exc)
            return
        # obs-websocket 5.1 answers currentProgramSceneName; 5.3+ adds sceneName.
        scene = reply.get("sceneName") or reply.get("currentProgramSceneName")
        with self._scene_lock:
            if isinstance(scene, str) and self._scene_events == seen:
                self._apply_scene(scene)

    def _apply_scene(self, scene: str) -> None:
        """Record ``scene`` and select its preset (called with _scene_lock held, so the presets
        of two scene reports cannot arrive in the wrong order)."""
        self.scene = scene
        try:
            preset = self._preset_for_scene(scene)
        except Exception as exc:
            log.error("OBS scene %r: finding its preset failed: %s: %s", scene, _kind(exc), exc)
            return
        if preset:
            self._select(preset, f"OBS scene {scene!r}")

    def _custom_event(self, payload: Any) -> None:
        if payload is None:
            return  # someone else's custom event
        preset = payload.get("preset") if isinstance(payload, dict) else None
        if not isinstance(preset, str) or not preset.strip():
            shown = repr(payload)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            log.warning(
                'OBS custom event ignored: "streamv2v" must be {"preset": NAME}, got %s', shown
            )
            return
        self._select(preset.strip(), "OBS custom event")

    def _select(self, preset: str, reason: str) -> None:
        if self._stopping.is_set():
            return
        try:
            self._on_preset(preset, reason)
        except Exception as exc:
            log.error("Preset %r from %s failed: %s: %s", preset, reason, _kind(exc), exc)


def _guarded(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """An exception escaping a callback would end obsws-python's event thread (and with it the
    connection): log it in one line instead. Keeps the name obsws-python dispatches on."""

    def guarded(data: Any) -> None:
        try:
            callback(data)
        except Exception as exc:
            log.error("OBS event handler %s failed: %s: %s", callback.__name__, _kind(exc), exc)

    guarded.__name__ = callback.__name__
    return guarded


def _close(client: obsws_python.EventClient | obsws_python.ReqClient) -> None:
    try:
        client.disconnect()
    except Exception as exc:  # the socket may be half gone already; closing is best effort
        log.debug("closing the OBS %s client: %s", type(client).__name__, _kind(exc))


def _redact(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def probe(config: ObsConfig, password: str) -> tuple[str, str]:
    """One connection attempt for `streamv2v doctor`: ("ok" | "auth" | "unreachable" |
    "error", what OBS said). Never logs, never raises."""
    where = f"{config.host}:{config.port}"
    try:
        client = obsws_python.ReqClient(
            host=config.host, port=config.port, password=password, timeout=config.timeout_s
        )
    except OBSSDKError as exc:
        if not isinstance(exc, OBSSDKTimeoutError):
            problem = "rejected the password" if password else "wants a password"
            return "auth", f"OBS at {where} {problem}"
        return "unreachable", f"OBS at {where}: no answer in {config.timeout_s:g} s"
    except _CONNECTION_ERRORS as exc:
        reason = _redact(str(exc) or type(exc).__name__, password)
        return "unreachable", f"OBS not reachable at {where} ({reason})"
    except Exception as exc:
        return "error", _redact(f"OBS at {where}: {type(exc).__name__}: {exc}", password)
    try:
        version = client.send("GetVersion", raw=True)
        return "ok", (
            f"OBS {version.get('obsVersion', '?')}, obs-websocket "
            f"{version.get('obsWebSocketVersion', '?')} at {where}"
        )
    except Exception as exc:
        return "error", _redact(f"OBS at {where}: {type(exc).__name__}: {exc}", password)
    finally:
        _close(client)
