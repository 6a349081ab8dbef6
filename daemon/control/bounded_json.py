"""JSON request bodies parsed within fixed bounds: size, nesting depth and number length.

``json.loads`` recurses once per nesting level (deep nesting raises RecursionError) and
``int()`` of a number past Python's digit limit raises a plain ValueError: both once became
500s. Here the depth is measured by a flat scan before parsing, numbers are checked by the
parser's own hooks before conversion, and every failure is a :class:`BodyError` naming the bound.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40

# One token at a time, never backtracking: an escape pair, a quote or a bracket.
_TOKENS = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


class BodyError(ValueError):
    """A request body outside the bounds or not JSON; the message says which and why."""


def nesting_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
    """The deepest ``[``/``{`` nesting outside strings, counted without recursion; stops
    counting once past ``limit`` (returns ``limit + 1``)."""
    depth = deepest = 0
    in_string = False
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue  # a bracket inside a string, or an escape pair
        elif token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth -= 1
    return deepest


def _number(convert: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise BodyError(
                f"a number in the body has {len(text)} characters (at most {MAX_NUMBER_CHARS})"
            )
        return convert(text)

    return parse


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


def parse_body(raw: bytes) -> Any:
    """The JSON value of ``raw`` (None for an empty body); BodyError when it is too big, too
    deep, has a too long number, or is not JSON."""
    if len(raw) > MAX_BODY_BYTES:
        raise BodyError(f"body must be at most {MAX_BODY_BYTES} B")
    if not raw.strip():
        return None
    if nesting_depth(raw) > MAX_DEPTH:
        raise BodyError(f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        text = raw.decode("utf-8")  # strict: the depth scan above read UTF-8 bytes
    except UnicodeDecodeError:
        raise BodyError("body is not UTF-8 JSON") from None
    try:
        return json.loads(
            text,
            parse_int=_number(int),
            parse_float=_number(float),
            parse_constant=_no_constant,
        )
    except BodyError:
        raise
    except (ValueError, RecursionError) as err:
        raise BodyError(f"body is not JSON: {err}") from None
