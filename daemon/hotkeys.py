"""Global hotkeys (pynput): combos that switch presets, from any application.

pynput is imported only when the listener starts: without a usable display (a headless service,
Wayland without XWayland, no accessibility permission on macOS) its import fails, and the daemon
carries on without hotkeys after one log line.
"""

from __future__ import annotations

import re

#: Special key names pynput understands inside ``<...>`` (its ``Key`` members), plus ``<NNN>``
#: virtual key codes. Checked here, without importing pynput, so a config error shows at once.
_SPECIAL_KEYS = frozenset(
    """alt alt_l alt_r alt_gr backspace caps_lock cmd cmd_l cmd_r ctrl ctrl_l ctrl_r delete down
    end enter esc home left page_down page_up right shift shift_l shift_r space tab up insert
    menu num_lock pause print_screen scroll_lock media_play_pause media_volume_mute
    media_volume_down media_volume_up media_previous media_next""".split()
    + [f"f{i}" for i in range(1, 21)]
)
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
