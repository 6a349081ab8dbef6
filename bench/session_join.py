"""What a daemon joining a ``serve`` box costs the box's one engine thread: the first preset of
each new session (``EngineSession.apply``: its engine on the shared UNet, its bank, its prompt),
during which every running session's frames wait. Then, in the same run, as it was before
the bank's layer shapes were read off the UNet's blocks and kept per UNet: a UNet pass on fake
tensors for every engine built.

    python bench/session_join.py --sessions 4 --size 96 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.models.registry import tiny_styles_dir
from daemon.remote.session import EngineSession, SharedModel
from daemon.styles.presets import Preset
from streamv2v import EngineConfig, attention


def joins(sessions: int, size: int, device: str | None) -> list[float]:
    """ms of each session's first preset on a freshly loaded box (a size it has not seen)."""
    model = str(tiny_styles_dir())
    shared = SharedModel.load(model, EngineConfig(vae="model"), device, None, False)
    base = EngineConfig(width=size, height=size, steps=1, vae="model")
    preset = Preset(name="warm", prompt="a warm scene")
    out, opened = [], []
    try:
        for n in range(sessions):
            session = EngineSession(shared, n)
            opened.append(session)
            t = time.perf_counter()
            session.apply(base, preset)
            out.append((time.perf_counter() - t) * 1000)
    finally:
        for session in opened:
            session.close()
        shared.close()
    return out


class _Forgetful:
    """A shapes cache that keeps nothing (each engine runs its own pass, as before)."""

    def setdefault(self, _unet: object, default: dict) -> dict:
        return default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    figures: dict[str, list[list[float]]] = {"now": [], "a pass per engine": []}
    for _ in range(args.repeats):  # the two ways interleaved, round by round
        figures["now"].append(joins(args.sessions, args.size, args.device))
        with (
            mock.patch.object(attention, "_shapes_from_structure", return_value=None),
            mock.patch.object(attention, "_SHAPES", _Forgetful()),
        ):
            figures["a pass per engine"].append(joins(args.sessions, args.size, args.device))
    for name, runs in figures.items():
        first = statistics.median(r[0] for r in runs)
        rest = statistics.median(x for r in runs for x in r[1:])
        print(f"{name:>20}: first session {first:7.1f} ms, each next one {rest:7.1f} ms")


if __name__ == "__main__":
    main()
