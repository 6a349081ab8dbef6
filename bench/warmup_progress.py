"""The daemon's warm-up progress on a GPU (issue 23): the engine worker's loop (one warmup() per
step choice, Readiness saying "compiling k of n, about T left") on CUDA with torch.compile, on
the shipped tiny style model. Prints the log lines, the estimate given before each configuration
and the time that was actually left, then the per-frame time of each step count (no compile).

    python bench/warmup_progress.py [cuda|cpu]      (writes $OUT/compile_progress.json if set)
"""

import json
import logging
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.getcwd())
import torch

from daemon.models.progress import Readiness  # stdlib only: no daemon dependencies
from streamv2v import EngineConfig, StreamV2V

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
compile_ = "on" if device == "cuda" else "off"
cfg = EngineConfig(width=128, height=128, steps=1, strength=0.5, vae="model", compile=compile_)
t0 = time.monotonic()
engine = StreamV2V.from_pretrained("streamv2v/models/tiny-styles", config=cfg, device=device)
load_s = time.monotonic() - t0
choices = [(1, True), (2, True), (3, True), (4, True)]
ready = Readiness()
started = time.monotonic()
marks = []
for done, choice in enumerate(choices):  # as daemon/dataplane/engine_worker.py does
    ready.compiling(done, len(choices), started)
    snap = ready.snapshot()
    marks.append({"done": done, "at_s": time.monotonic() - started, "eta_s": snap["eta_s"]})
    engine.warmup([choice], progress=False)
total = time.monotonic() - started
for m in marks:
    m["actual_left_s"] = round(total - m["at_s"], 1)
    m["at_s"] = round(m["at_s"], 1)
# After the warm-up, every step count runs without compiling again.
frame = torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8).numpy()
after = {}
for steps, batch in choices:
    update = {"steps": steps, "stream_batch": batch}
    engine.set_config(EngineConfig.model_validate({**cfg.model_dump(), **update}))
    t = time.monotonic()
    for _ in range(8):
        engine(frame)
    after[steps] = round((time.monotonic() - t) / 8 * 1000, 2)
result = {
    "device": torch.cuda.get_device_name() if device == "cuda" else device,
    "torch": torch.__version__,
    "load_s": round(load_s, 1),
    "warmup_total_s": round(total, 1),
    "marks": marks,
    "ms_per_frame_after_warmup": after,
}
print(json.dumps(result, indent=1))
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "compile_progress.json"), "w") as f:
        json.dump(result, f, indent=1)
