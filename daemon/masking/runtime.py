"""Can the person mask run here? The shipped model file and the optional runtime (extra ``mask``).

Light on purpose (no OpenCV, no runtime import at module level): preset validation, ``doctor``
and the CLI ask it.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

MODEL_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"
EXTRA_HINT = "install the extra: pip install 'streamv2v[mask]'"


class MaskUnavailable(RuntimeError):
    """The segmenter cannot run here (its runtime is missing or the model file is damaged)."""


def model_path() -> Path:
    """The shipped model file (MediaPipe's selfie segmentation; see models/SOURCE.md)."""
    return Path(str(resources.files("daemon.masking") / "models" / "selfie_segmentation.tflite"))


def runtime_version() -> str | None:
    """The installed ai-edge-litert version, or None."""
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def runtime_problem() -> str | None:
    """None when the segmenter can run; else one line naming the problem and the fix."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return f"a person mask needs ai-edge-litert, which is not installed; {EXTRA_HINT}"
    path = model_path()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        return f"the person-mask model is missing ({err}); reinstall streamv2v"
    if digest != MODEL_SHA256:
        return f"the person-mask model {path} is damaged (sha256 {digest[:12]}...); reinstall"
    return None
