"""streamv2v: the StreamV2V engine (stream-batch img2img + feature bank), frames in, frames out.

This package imports torch, diffusers and numpy only: no OpenCV, no sockets, no threads. The
engine (and with it torch and diffusers) is imported on first use of ``StreamV2V``, so reading
and validating settings (``EngineConfig``) stays fast for a CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamv2v.config import BankConfig, ControlSpec, EngineConfig, LoraSpec
from streamv2v.errors import ModelLoadError, StreamV2VError, UnsafeWeightsError

if TYPE_CHECKING:
    from streamv2v.engine import StreamV2V

__all__ = [
    "BankConfig",
    "ControlSpec",
    "EngineConfig",
    "LoraSpec",
    "ModelLoadError",
    "StreamV2V",
    "StreamV2VError",
    "UnsafeWeightsError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "StreamV2V":
        from streamv2v.engine import StreamV2V

        return StreamV2V
    raise AttributeError(f"module 'streamv2v' has no attribute {name!r}")
