"""An NDI sender or receiver in a process of its own, for tests/test_ndi.py (real NDI over
127.0.0.1 with the runtime cyndilib bundles; discovery through NDI_CONFIG_DIR's extra IPs).

    python tests/ndi_peer.py send NAME SECONDS R G B   frames of one colour, 20 per second
    python tests/ndi_peer.py recv NAME SECONDS [N]     prints {"frames", "size", "mean"} (JSON),
                                                       once N frames came (or SECONDS passed)
"""

from __future__ import annotations

import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def send(name: str, seconds: float, colour: tuple[int, int, int]) -> None:
    from cyndilib.sender import Sender
    from cyndilib.video_frame import VideoSendFrame
    from cyndilib.wrapper.ndi_structs import FourCC

    frame = VideoSendFrame()
    frame.set_resolution(128, 96)
    frame.set_frame_rate(Fraction(20, 1))
    frame.set_fourcc(FourCC.RGBX)
    sender = Sender(name, clock_video=False)  # paced here
    sender.set_video_frame(frame)
    image = np.full((96, 128, 4), 255, np.uint8)
    image[..., :3] = colour
    end = time.monotonic() + seconds
    with sender:
        print("sending", flush=True)
        due = time.monotonic()
        while time.monotonic() < end:
            sender.write_video_async(image.reshape(-1))
            due += 0.05
            time.sleep(max(0.0, due - time.monotonic()))


def recv(name: str, seconds: float, want: int | None = None) -> None:
    from daemon.dataplane.ndi import open_ndi

    capture = None
    end = time.monotonic() + seconds
    while capture is None and time.monotonic() < end:
        capture = open_ndi(f"ndi:{name}")
    frames, size, mean = 0, None, None
    while capture is not None and time.monotonic() < end and (want is None or frames < want):
        ok, bgr = capture.read()
        if ok:
            frames += 1
            size = [bgr.shape[1], bgr.shape[0]]
            mean = [float(v) for v in bgr[..., ::-1].reshape(-1, 3).mean(0)]
    found = capture.name if capture is not None else None
    print(json.dumps({"frames": frames, "size": size, "mean": mean, "source": found}), flush=True)
    if capture is not None:
        capture.release()


if __name__ == "__main__":
    role, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if role == "send":
        send(name, seconds, tuple(int(v) for v in sys.argv[4:7]))
    else:
        recv(name, seconds, int(sys.argv[4]) if len(sys.argv) > 4 else None)
