"""The configuration as text for people: validation errors described by file, dotted key, value
and what is allowed, and a tiny TOML writer (secrets masked) for ``streamv2v config show``.

Pure functions over pydantic's error lists and plain data: daemon/config.py (the schema and
loading) uses them, and they know no section of it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

#: Key names whose values ``to_toml`` hides (the last word of the key, any case).
SECRET_WORDS = ("password", "token", "secret")
#: A TOML bare key (also the parts of a dotted ``--set`` key).
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_MAX_PROBLEMS = 5


def describe_errors(
    exc: ValidationError, root: type[BaseModel], path: Path | None, overrides: Mapping[str, Any]
) -> str:
    """One line per problem (at most a few): where it comes from (the file or a command-line
    override), the dotted key, the value and what is wrong; ``root`` is the model validated."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        where = "command-line override" if _in_mapping(loc, overrides) else str(path or "config")
        problems.append(f"{where}: {_problem(error, loc, root)}")
    if len(problems) > _MAX_PROBLEMS:
        extra = len(problems) - _MAX_PROBLEMS
        problems = [*problems[:_MAX_PROBLEMS], f"... and {extra} more"]
    return "\n".join(problems)


def _problem(error: Mapping[str, Any], loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    key = dotted(loc)
    if error["type"] == "extra_forbidden":
        return _unknown_key(loc, root)
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if not loc:
        return message
    if isinstance(value, Mapping) or error["type"] == "missing":
        return f"{key}: {message}"  # a whole table: its contents say little
    return f"{key} = {_short(value)}: {message}"


def _unknown_key(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    key = dotted(loc)
    model = _model_at(root, loc[:-1])
    if model is None:
        return f"unknown key {key}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {dotted((*loc[:-1], close[0]))}?" if close else ""
    where = f"in [{dotted(loc[:-1])}]" if len(loc) > 1 else "at the top level"
    return f"unknown key {key}{hint} (allowed {where}: {', '.join(allowed)})"


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the table at ``loc``, following field annotations."""
    current: Any = root
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
        text = toml_value(value)
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
    return key if BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_entry(key: Any, value: Any, mask: bool) -> str:
    # An empty secret hides nothing, and masking it would not load back as empty.
    hide = mask and _is_secret(key) and value != ""
    return '"***"' if hide else toml_value(value, mask)


def toml_value(value: Any, mask: bool = False) -> str:
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
        return f"[{', '.join(toml_value(v, mask) for v in value if v is not None)}]"
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
