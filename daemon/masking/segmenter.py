"""MediaPipe's selfie segmentation model (shipped in ``models/``) run with ai-edge-litert.

ai-edge-litert is the optional extra ``mask``: only presets with a mask need it, and a preset
asking for one without it is refused with ``runtime.EXTRA_HINT`` (the others keep working).
"""

from __future__ import annotations

import cv2
import numpy as np

from daemon.masking.runtime import MaskUnavailable, model_path, runtime_problem

#: The model's square input (and output) side.
SIDE = 256


class PersonSegmenter:
    """RGB uint8 frames in, the person probability (float32 ``SIDE`` x ``SIDE``, 0..1) out.

    One interpreter, its input filled in place: no allocation per frame. Not thread-safe: one
    thread owns it (the mask worker's).
    """

    def __init__(self, threads: int = 1) -> None:
        problem = runtime_problem()
        if problem is not None:
            raise MaskUnavailable(problem)
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(model_path()), num_threads=threads)
        self._interpreter.allocate_tensors()
        (inp,) = self._interpreter.get_input_details()
        (out,) = self._interpreter.get_output_details()
        if tuple(inp["shape"]) != (1, SIDE, SIDE, 3) or tuple(out["shape"]) != (1, SIDE, SIDE, 1):
            raise MaskUnavailable(f"unexpected model tensors {inp['shape']} -> {out['shape']}")
        self._in, self._out = inp["index"], out["index"]
        self._small = np.empty((SIDE, SIDE, 3), np.uint8)
        self._input = np.empty((1, SIDE, SIDE, 3), np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The person probability of ``image`` (HxWx3 uint8 RGB, any size: squeezed to the
        square input, so the mask maps back onto the same frame). A new array each call."""
        h, w = image.shape[:2]
        interpolation = cv2.INTER_AREA if w > SIDE or h > SIDE else cv2.INTER_LINEAR
        cv2.resize(image, (SIDE, SIDE), dst=self._small, interpolation=interpolation)
        np.multiply(self._small, np.float32(1 / 255), out=self._input[0])
        self._interpreter.set_tensor(self._in, self._input)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._out)[0, :, :, 0].copy()
