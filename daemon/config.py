"""The daemon's configuration: one TOML file, validated by pydantic, with CLI overrides on top.

Every model forbids unknown keys, so a typo is an error that names the key instead of a setting
silently ignored. Failures become :class:`ConfigError`, whose message names the file, the dotted
key, the value given and what is allowed, so the CLI can print it as is and exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from daemon.config_camera import SOURCE_WORDS, SourceKind, check_source, source_kind
from daemon.config_text import BARE_KEY, describe_errors, to_toml
from daemon.integrations.hotkeys import check_combo
from daemon.remote.config import RemoteEngineFields
from streamv2v import EngineConfig, LoraSpec
from streamv2v.config import SCHEDULE_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP_NAME = "streamv2v"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_LORA = "latent-consistency/lcm-lora-sdv1-5"
#: The preset made of the [engine] prompt, always present.
CONFIG_PRESET = "config"


#: A path the user may write with ~ (expanded when the configuration is read).
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]


def loopback_only(why: str) -> AfterValidator:
    """A host validator for servers that must stay on this machine; ``why`` says why."""

    def check(host: str) -> str:
        if not is_loopback(host):
            raise ValueError(
                f"{why}, so it is served on this machine only: use a loopback address "
                "(127.0.0.1, ::1 or localhost)"
            )
        return host

    return AfterValidator(check)


class _Section(BaseModel):
    # coerce_numbers_to_str: a CLI override "engine.prompt=42" parses as a number; keep it text.
    model_config = ConfigDict(extra="forbid", validate_default=True, coerce_numbers_to_str=True)


class CameraConfig(_Section):
    """Where frames come from, and what to ask the camera for."""

    source: int | str = Field(0, description=SOURCE_WORDS)
    width: int = Field(640, gt=0, le=7680)
    height: int = Field(480, gt=0, le=4320)
    fps: float = Field(30.0, gt=0, le=240)
    fourcc: str | None = Field(
        "MJPG", description="Pixel format to request (4 characters), '' to take the default."
    )
    mirror: bool = False
    reconnect_min_s: float = Field(0.5, gt=0, le=60)
    # 2 s, not more: a camera that comes back must show again within ~3 s even after a long
    # outage, and a failed attempt is cheap (refused at once, or timed out off-thread for URLs).
    reconnect_max_s: float = Field(2.0, gt=0, le=600)

    @field_validator("source", mode="before")
    @classmethod
    def _check_source(cls, value: Any) -> int | str:
        # Before the int|str union runs, so a bad value gives one clear error, not one per type.
        return check_source(value)

    @field_validator("fourcc", mode="before")
    @classmethod
    def _check_fourcc(cls, value: Any) -> str | None:
        # TOML has no null: "" is how a file says "let the camera pick its format".
        if value is None or value == "":
            return None
        if not isinstance(value, str) or len(value) != 4 or not value.isascii():
            raise ValueError(
                "fourcc must be 4 ASCII characters such as 'MJPG' or 'YUYV', "
                "or '' to let the camera choose"
            )
        return value

    @field_serializer("fourcc")
    def _dump_fourcc(self, value: str | None) -> str:
        return value or ""  # so a dumped config loads back to the same None

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s:g}) must be at least "
                f"reconnect_min_s ({self.reconnect_min_s:g})"
            )
        return self

    def source_kind(self) -> SourceKind:
        """How :attr:`source` is opened."""
        return source_kind(self.source)


def _default_loras() -> list[LoraSpec]:
    return [LoraSpec(id=DEFAULT_LORA)]


class EngineSection(_Section, RemoteEngineFields):
    """The model, its prompt, the engine's settings (``[engine.settings]``), or a remote."""

    model: str = DEFAULT_MODEL
    loras: list[LoraSpec] = Field(default_factory=_default_loras)
    prompt: str = "a claymation figure, studio lighting"
    negative_prompt: str = ""
    device: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    allow_pickle: bool = False
    settings: EngineConfig = Field(default_factory=EngineConfig)

    @field_validator("settings")
    @classmethod
    def _loras_once(cls, value: EngineConfig) -> EngineConfig:
        # The daemon builds the engine's LoRA list from engine.loras; a second list would be
        # silently ignored, so refuse it.
        if value.loras:
            raise ValueError("LoRAs go in engine.loras, not engine.settings.loras")
        return value


class VirtualCameraConfig(_Section):
    """The virtual webcam (pyvirtualcam); width/height unset means the engine's working size."""

    enabled: bool = True
    device: str | None = None
    width: int | None = Field(None, gt=0, le=7680)
    height: int | None = Field(None, gt=0, le=4320)
    fps: float = Field(30.0, gt=0, le=240)
    pixel_format: Literal["rgb", "bgr", "yuyv", "nv12", "i420", "uyvy"] = "rgb"


class PreviewConfig(_Section):
    """The MJPEG-over-HTTP preview; loopback only, since it has no authentication."""

    enabled: bool = True
    host: Annotated[str, loopback_only("the preview has no authentication")] = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535, description="0 picks any free port.")
    quality: int = Field(85, ge=1, le=100)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.x.x.x and ::1 (brackets allowed)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RecordConfig(_Section):
    """Optional recording of the output (.mp4 or .avi); unset means no recording."""

    path: UserPath | None = None


class NdiOutputConfig(_Section):
    """The output as an NDI source on the network (optional extra ``ndi``: cyndilib)."""

    enabled: bool = False
    name: str = Field("streamv2v", min_length=1, max_length=64, description="NDI source name.")


class OutputConfig(_Section):
    virtual_camera: VirtualCameraConfig = Field(default_factory=VirtualCameraConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    ndi: NdiOutputConfig = Field(default_factory=NdiOutputConfig)
    fps: float = Field(30.0, gt=0, le=240)


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LogConfig(_Section):
    """Log level, and the log file (unset: ``streamv2v.log`` in the user log dir)."""

    level: LogLevel = "INFO"
    file: UserPath | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        # Accept "info"; a wrong value is reported as the user wrote it.
        if isinstance(value, str) and value.upper() in get_args(LogLevel):
            return value.upper()
        return value


class PresetsConfig(_Section):
    """Where presets come from and which one is active at start.

    The bundled presets (installed with the package) are always there; files in ``dir`` add to
    them and replace a bundled preset of the same name.
    """

    dir: UserPath | None = Field(
        None, description="User presets folder (unset: 'presets' in the user config dir)."
    )
    startup: str = Field(
        CONFIG_PRESET, description="Preset active at start; 'config' is the [engine] prompt."
    )
    bundled: Literal["default", "demo", "demo-sdxl"] = Field(
        "default",
        description="Which bundled set: the SD styles, or the built-in tiny style model's "
        "(demo), or the built-in tiny SDXL model's (demo-sdxl).",
    )
    reload_interval_s: float = Field(
        0.5, gt=0, le=2.0, description="How often preset files are checked for changes."
    )


class ObsConfig(_Section):
    """The OBS websocket (v5) connection: scene changes and custom events switch presets.

    The password comes from ``password``, else the environment variable named by
    ``password_env``, else the first line of ``password_file``; it is never logged.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(4455, ge=1, le=65535)
    password: str = ""
    password_env: str | None = None
    password_file: UserPath | None = None
    scenes: dict[str, str] = Field(
        default_factory=dict,
        description="Scene name or glob (e.g. 'Gaming*') -> preset name; before the presets' own.",
    )
    timeout_s: float = Field(3.0, gt=0, le=60)
    reconnect_min_s: float = Field(1.0, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _backoff_order(self) -> ObsConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s:g}) must be at least "
                f"reconnect_min_s ({self.reconnect_min_s:g})"
            )
        return self

    def resolve_password(self) -> str:
        """The password from the first source that is set; ConfigError names the key that
        points nowhere (an unset variable, an unreadable file)."""
        if self.password:
            return self.password
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"obs.password_env = {self.password_env!r}: that environment variable is "
                    "not set; export it or set obs.password_file"
                )
            return value
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"obs.password_file = {str(self.password_file)!r}: cannot read it "
                    f"({exc.strerror or exc}); fix the path or its permissions"
                ) from None
            return lines[0].strip() if lines else ""
        return ""


class HotkeysConfig(_Section):
    """Global hotkeys (pynput syntax, e.g. '<ctrl>+<alt>+1'); a preset's own ``hotkey`` works
    too, and ``presets`` here overrides it by preset name. An empty string disables a combo."""

    enabled: bool = True
    next: str = "<ctrl>+<alt>+n"
    prev: str = "<ctrl>+<alt>+p"
    presets: dict[str, str] = Field(default_factory=dict)

    @field_validator("next", "prev")
    @classmethod
    def _combo(cls, value: str) -> str:
        return check_combo(value) if value else value

    @field_validator("presets")
    @classmethod
    def _combos(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: check_combo(combo) if combo else combo for name, combo in value.items()}


class ControlConfig(_Section):
    """The local control API (HTTP + JSON on loopback; mutating calls need the token)."""

    enabled: bool = True
    host: Annotated[str, loopback_only("the control API is for this machine's CLI")] = "127.0.0.1"
    port: int = Field(8766, ge=0, le=65535, description="0 picks any free port.")
    token_file: UserPath | None = Field(
        None, description="Where the token is written, mode 0600 (unset: the user config dir)."
    )


class LatencyConfig(_Section):
    """The latency controller: the daemon picks the number of denoising steps (and whether to
    stream-batch them) so that the measured glass-to-glass p95 fits ``budget_ms`` and the engine
    keeps up with ``target_fps``. Unset both (or enabled = false) for fixed steps."""

    enabled: bool = True
    budget_ms: float | None = Field(
        250.0, gt=0, le=60_000, description="Capture-to-publish p95 budget; 0 for none."
    )
    target_fps: float | None = Field(
        None, gt=0, le=240, description="Engine rate to sustain; 0 (or unset) for none."
    )
    min_steps: int = Field(1, ge=1, le=SCHEDULE_STEPS)
    max_steps: int = Field(4, ge=1, le=SCHEDULE_STEPS)
    stream_batch: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: use stream batching when it serves the budget better."
    )
    hysteresis: float = Field(
        0.15, ge=0.0, lt=1.0, description="Step up only with this fraction of the budget spare."
    )
    calibrate: bool = Field(True, description="Measure every step count briefly at start.")
    calibration_frames: int = Field(4, ge=1, le=100)
    av_sync_input: str | None = Field(
        None,
        description="OBS audio input whose sync offset follows the measured latency (needs [obs]).",
    )

    @field_validator("budget_ms", "target_fps", mode="before")
    @classmethod
    def _zero_is_none(cls, value: Any) -> Any:
        return None if value == 0 else value  # TOML has no null: 0 switches a goal off

    @model_validator(mode="after")
    def _range(self) -> LatencyConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether the controller runs (enabled, with a budget or a target rate)."""
        return self.enabled and (self.budget_ms is not None or self.target_fps is not None)


class DaemonConfig(_Section):
    """Everything ``streamv2v run`` reads; every section has defaults."""

    camera: CameraConfig = Field(default_factory=CameraConfig)
    engine: EngineSection = Field(default_factory=EngineSection)
    output: OutputConfig = Field(default_factory=OutputConfig)
    presets: PresetsConfig = Field(default_factory=PresetsConfig)
    obs: ObsConfig = Field(default_factory=ObsConfig)
    hotkeys: HotkeysConfig = Field(default_factory=HotkeysConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    demo: bool = False


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file, key, value and what is
    allowed, one problem per line."""


def default_config_path() -> Path:
    """``config.toml`` in the platform's user config dir (e.g. ~/.config/streamv2v/)."""
    return platformdirs.user_config_path(APP_NAME, appauthor=False) / "config.toml"


def load_config(path: Path | None, overrides: dict | None = None) -> DaemonConfig:
    """Read ``path`` (None: the default file if it exists, else defaults), merge ``overrides``
    (nested dicts, e.g. from :func:`parse_override`) over it, and validate."""
    explicit = path is not None
    path = Path(path).expanduser() if explicit else default_config_path()
    data: dict[str, Any] = {}
    if explicit or path.exists():
        data = _read_toml(path)
    else:
        path = None
    merged = deep_merge(data, overrides or {})
    try:
        return DaemonConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, DaemonConfig, path, overrides or {})) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base``: tables merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"camera.fps=15"`` -> ``{"camera": {"fps": 15}}``.

    The value is read as a TOML value when it is one (15, 2.5, true, [1, 2], "quoted"),
    otherwise taken as text, so ``engine.prompt=a cat`` and URLs need no quotes.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(BARE_KEY.fullmatch(p) for p in parts):
        raise ConfigError(
            f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. camera.fps=15"
        )
    nested: dict[str, Any] = {parts[-1]: _override_value(raw.strip())}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _override_value(raw: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    value = parsed.get("v")
    # One value only (a newline could smuggle in more keys); dates stay text, as typed.
    if len(parsed) != 1 or isinstance(value, date | time | datetime):
        return raw
    return value


def dump_config(cfg: DaemonConfig, *, mask_secrets: bool = True) -> str:
    """The effective configuration as TOML that :func:`load_config` reads back (unset values
    are left out; secrets are shown as "***" unless ``mask_secrets`` is False)."""
    header = "# streamv2v effective configuration\n"
    return header + to_toml(cfg.model_dump(mode="python"), mask_secrets=mask_secrets)
