"""``streamv2v obs-script``: where the OBS script is, and a copy of it where OBS keeps its own
files, with the steps that add it to OBS.

The script is two files (streamv2v_obs.py, the one OBS loads, and streamv2v_obs_client.py next
to it) shipped in this package. A copy does not follow upgrades of streamv2v; the path in the
package does, so ``obs-script`` without ``--install`` is the default advice.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from daemon.errors import UserError

SCRIPT_FILES = ("streamv2v_obs.py", "streamv2v_obs_client.py")
FLATPAK_OBS = Path(".var") / "app" / "com.obsproject.Studio" / "config" / "obs-studio"


def script_path() -> Path:
    """The script OBS loads, inside the installed package."""
    return Path(__file__).with_name(SCRIPT_FILES[0])


def obs_config_dir(
    env: dict[str, str] | None = None, platform: str = sys.platform, home: Path | None = None
) -> Path:
    """OBS Studio's own config folder: %APPDATA%\\obs-studio, ~/Library/Application
    Support/obs-studio, or on Linux $XDG_CONFIG_HOME (~/.config)/obs-studio, the Flatpak's
    when only that one exists."""
    env = os.environ if env is None else env
    home = home or Path.home()
    if platform == "win32":
        return Path(env.get("APPDATA") or home / "AppData" / "Roaming") / "obs-studio"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "obs-studio"
    xdg = env.get("XDG_CONFIG_HOME", "")
    native = (Path(xdg) if os.path.isabs(xdg) else home / ".config") / "obs-studio"
    flatpak = home / FLATPAK_OBS
    return flatpak if flatpak.is_dir() and not native.is_dir() else native


def install(folder: Path | None = None) -> Path:
    """Copy the script's files into ``folder`` (default: scripts/streamv2v in OBS's config
    folder); returns the path to pick in Tools -> Scripts."""
    folder = folder or obs_config_dir() / "scripts" / "streamv2v"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in SCRIPT_FILES:
            shutil.copyfile(script_path().with_name(name), folder / name)
    except OSError as err:
        raise UserError(
            f"cannot copy the OBS script into {folder} ({err.strerror or err}); pick the file "
            f"in place instead: {script_path()}"
        ) from None
    return folder / SCRIPT_FILES[0]


def how_to_add(path: Path) -> str:
    """The three steps that put the script to work in OBS."""
    return (
        f"In OBS Studio (with the daemon running: streamv2v run):\n"
        f"  1. Tools -> Scripts, click +, and pick {path}\n"
        "  2. Settings -> Hotkeys: bind keys to 'streamv2v: preset NAME', 'next preset',\n"
        "     'previous preset' and 'passthrough on/off'\n"
        "  3. In the script's panel, click 'Add / fix the output source' to put the styled\n"
        "     camera in the current scene"
    )
