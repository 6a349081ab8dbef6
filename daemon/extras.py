"""The optional extras of pyproject.toml, what needs each, and the line a missing one gives.

The configuration and the CLI import none of them at module level: a feature that needs an
extra calls :func:`require` first, so its absence is one line naming the extra and the install
command (``streamv2v: error: ...``, exit code 2), never a traceback, and everything else keeps
working. Nothing here imports an extra: :func:`importlib.util.find_spec` only looks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec

from daemon.errors import UserError


@dataclass(frozen=True)
class Extra:
    name: str  #: the extra's name in pyproject.toml
    modules: tuple[str, ...]  #: the top-level modules it brings
    distributions: tuple[str, ...]  #: their distributions (for the versions doctor shows)
    features: str  #: what needs it, as the README says


#: Every optional extra (``app`` is not optional: the CLI needs it).
EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra("remote", ("aiortc", "av"), ("aiortc", "av"), "`streamv2v serve`, `[engine] remote`"),
        Extra("eval", ("matplotlib",), ("matplotlib",), "`streamv2v eval --report`"),
        Extra("mask", ("ai_edge_litert",), ("ai-edge-litert",), 'presets with `mask = "person"`'),
    )
}


def install_command(extra: str) -> str:
    return f"pip install 'streamv2v[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be found here (empty: it is installed)."""
    return [module for module in EXTRAS[extra].modules if find_spec(module) is None]


def versions(extra: str) -> str:
    """``aiortc 1.16.0, av 18.1.0``: the installed versions of the extra's distributions."""
    found = []
    for name in EXTRAS[extra].distributions:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (no version)")
    return ", ".join(found)


def message(extra: str, feature: str) -> str:
    """The one line a missing extra gives: the feature, the extra, the install command."""
    return f"{feature} needs the {extra!r} extra: {install_command(extra)}"


class ExtraMissing(UserError):
    """A feature was asked for whose extra is not installed."""


def require(extra: str, feature: str) -> None:
    """Return when ``extra`` is installed; else raise :class:`ExtraMissing` naming it."""
    if missing_modules(extra):
        raise ExtraMissing(message(extra, feature))
