"""The daemon's configuration: one TOML file, validated by pydantic, with CLI overrides on top.

Every model forbids unknown keys, so a typo is an error that names the key instead of a setting
silently ignored. Failures become :class:`ConfigError`, whose message names the file, the dotted
key, the value given and what is allowed, so the CLI can print it as is and exit 2.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from datetime import date, datetime, time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

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

from daemon.hotkeys import check_combo
from streamv2v import EngineConfig, LoraSpec
from streamv2v.config import SCHEDULE_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP_NAME = "streamv2v"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_LORA = "latent-consistency/lcm-lora-sdv1-5"
#: Key names whose values ``dump_config`` hides (the last word of the key, any case).
SECRET_WORDS = ("password", "token", "secret")
#: The preset made of the [engine] prompt, always present.
CONFIG_PRESET = "config"
_SOURCE_WORDS = (
    "a device index (0, 1, ...), a /dev/videoN path, a video file, "
    "an http(s)/rtsp URL, 'testpattern' or 'scene' (generated cameras)"
)
_URL_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp", "udp", "tcp")


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

    source: int | str = Field(0, description=_SOURCE_WORDS)
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
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"camera source must be {_SOURCE_WORDS}")
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError(f"camera source is empty; give {_SOURCE_WORDS}")
            if value.isdigit():
                return int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("a camera device index is 0 or more")
        return value

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

    def source_kind(self) -> Literal["device", "file", "url", "testpattern", "scene"]:
        """How :attr:`source` is opened."""
        return source_kind(self.source)


def source_kind(source: int | str) -> Literal["device", "file", "url", "testpattern", "scene"]:
    """Classify a camera source: device index or /dev path, URL, the test pattern, or a file."""
    if isinstance(source, int) or source.startswith("/dev/"):
        return "device"
    if source in ("testpattern", "scene"):
        return source  # type: ignore[return-value]
    scheme, sep, _ = source.partition("://")
    if sep and scheme.lower() in _URL_SCHEMES:
        return "url"
    return "file"


def _default_loras() -> list[LoraSpec]:
    return [LoraSpec(id=DEFAULT_LORA)]


class EngineSection(_Section):
    """The model, its prompt, and the engine's settings (``[engine.settings]``)."""

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


class OutputConfig(_Section):
    virtual_camera: VirtualCameraConfig = Field(default_factory=VirtualCameraConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
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
    bundled: Literal["default", "demo"] = Field(
        "default",
        description="Which bundled set: the SD styles, or the built-in tiny style model's.",
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
        raise ConfigError(_describe(exc, path, overrides or {})) from None


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


_MAX_PROBLEMS = 5


def _describe(exc: ValidationError, path: Path | None, overrides: Mapping[str, Any]) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        where = "command-line override" if _in_mapping(loc, overrides) else str(path or "config")
        problems.append(f"{where}: {_problem(error, loc)}")
    if len(problems) > _MAX_PROBLEMS:
        extra = len(problems) - _MAX_PROBLEMS
        problems = [*problems[:_MAX_PROBLEMS], f"... and {extra} more"]
    return "\n".join(problems)


def _problem(error: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    key = dotted(loc)
    if error["type"] == "extra_forbidden":
        return _unknown_key(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if not loc:
        return message
    if isinstance(value, Mapping) or error["type"] == "missing":
        return f"{key}: {message}"  # a whole table: its contents say little
    return f"{key} = {_short(value)}: {message}"


def _unknown_key(loc: tuple[Any, ...]) -> str:
    key = dotted(loc)
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {dotted((*loc[:-1], close[0]))}?" if close else ""
    where = f"in [{dotted(loc[:-1])}]" if len(loc) > 1 else "at the top level"
    return f"unknown key {key}{hint} (allowed {where}: {', '.join(allowed)})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the table at ``loc``, following field annotations."""
    current: Any = DaemonConfig
    for part in loc:
        if isinstance(part, int):
            args = [a for a in get_args(current) if a is not Ellipsis]
            if get_origin(current) not in (list, tuple) or not args:
                return None
            current = args[0]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = _strip_optional(field.annotation)
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) not in (list, tuple) and len(args) == 1:
        return args[0]
    return annotation


def dotted(loc: tuple[Any, ...]) -> str:
    """('engine', 'loras', 0, 'id') -> 'engine.loras[0].id'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = _toml_value(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _in_mapping(loc: tuple[Any, ...], data: Mapping[str, Any]) -> bool:
    """Whether the value at ``loc`` (or a table holding it) comes from ``data``."""
    current: Any = data
    for part in loc:
        if not isinstance(current, Mapping):
            return True  # a whole table or list was given there
        if part not in current:
            return False
        current = current[part]
    return bool(loc)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def parse_override(text: str) -> dict:
    """``"camera.fps=15"`` -> ``{"camera": {"fps": 15}}``.

    The value is read as a TOML value when it is one (15, 2.5, true, [1, 2], "quoted"),
    otherwise taken as text, so ``engine.prompt=a cat`` and URLs need no quotes.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(_BARE_KEY.fullmatch(p) for p in parts):
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


def to_toml(data: Mapping[str, Any], *, mask_secrets: bool = True) -> str:
    """A tiny TOML writer for configuration data: str, int, float, bool, Path, Enum, lists and
    nested dicts (tables; dicts inside lists become inline tables). None values are left out."""
    lines: list[str] = []
    _write_table(lines, (), data, mask_secrets)
    return "\n".join(lines).strip("\n") + "\n"


def _write_table(
    lines: list[str], prefix: tuple[str, ...], table: Mapping[str, Any], mask: bool
) -> None:
    # TOML needs a table's own keys before its sub-tables' headers.
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if prefix:
        lines.append("")
        lines.append(f"[{'.'.join(_toml_key(p) for p in prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_entry(key, value, mask)}")
    for key, value in tables.items():
        if mask and _is_secret(key):
            lines.append(f'{_toml_key(key)} = "***"')
        else:
            _write_table(lines, (*prefix, str(key)), value, mask)


def _is_secret(key: Any) -> bool:
    # "obs_password" and "token" are secrets; "password_file" and "token_file" name where one
    # is kept, which is worth showing.
    return str(key).lower().rsplit("_", 1)[-1] in SECRET_WORDS


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_entry(key: Any, value: Any, mask: bool) -> str:
    # An empty secret hides nothing, and masking it would not load back as empty.
    hide = mask and _is_secret(key) and value != ""
    return '"***"' if hide else _toml_value(value, mask)


def _toml_value(value: Any, mask: bool = False) -> str:
    """``value`` as TOML; ``mask`` hides secret keys of inline tables inside it."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan
    if isinstance(value, str | Path):
        return _toml_string(str(value))
    if isinstance(value, list | tuple):
        return f"[{', '.join(_toml_value(v, mask) for v in value if v is not None)}]"
    if isinstance(value, Mapping):
        items = [
            f"{_toml_key(k)} = {_toml_entry(k, v, mask)}" for k, v in value.items() if v is not None
        ]
        return f"{{ {', '.join(items)} }}" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
