"""streamv2v: the StreamV2V engine (stream-batch img2img + feature bank), frames in, frames out.

This package imports torch, diffusers and numpy only: no OpenCV, no sockets, no threads.
"""

from streamv2v.config import BankConfig, EngineConfig, LoraSpec
from streamv2v.engine import StreamV2V
from streamv2v.errors import ModelLoadError, StreamV2VError, UnsafeWeightsError

__all__ = [
    "BankConfig",
    "EngineConfig",
    "LoraSpec",
    "ModelLoadError",
    "StreamV2V",
    "StreamV2VError",
    "UnsafeWeightsError",
]
__version__ = "0.1.0"
