"""Style LoRAs switched in place under torch.compile (inductor on the CPU): 200 frames with a
switch every 10 frames and blends in between, recompiling made an error, against the eager
engine. One compiled shape (64x64, 1 step): compiling costs tens of seconds on this CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from test_compile import TOLERANCE
from torch._dynamo.utils import counters

from streamv2v import BankConfig, EngineConfig, StreamV2V
from tests.lora_helpers import lora_factors, write_diffusers

# One worker runs the compile tests one after another, on the run's inductor cache
# (tests/conftest.py): the graphs they share (encode, decode, the plain UNet) compile once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compile")]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory, cheap_inductor):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    folder = tmp_path_factory.mktemp("loras")
    files = {n: write_diffusers(folder / f"{n}.safetensors", lora_factors(unet, seed=i))
             for i, n in enumerate(("a", "b", "c"), start=21)}  # fmt: skip
    cfg = EngineConfig(vae="model", width=64, height=64, steps=1, bank=BankConfig(interval=2))
    out = []
    for mode in ("off", "on"):
        engine = StreamV2V.from_pretrained(
            tiny_model, config=cfg.model_copy(update={"compile": mode}), device="cpu"
        )
        for name, path in files.items():
            engine.adapters.load(name, path)
        engine.set_prompt("a cat")
        out.append(engine)
    graphs = counters["stats"]["unique_graphs"]
    out[1].warmup([1], progress=False)
    return (*out, counters["stats"]["unique_graphs"] - graphs)


def test_switches_and_blends_for_200_frames_without_a_recompile(engines):
    eager, compiled, warmed_graphs = engines
    # It did compile at the warm-up: the encoder, the UNet and the decoder, one graph each when
    # this module runs alone (3); after the compile group's other modules in this process,
    # dynamo reuses the graphs of their encoder and decoder (same classes, shapes, guards), so
    # at least the UNet with its LoRA-rewritten weights is new. Uncompiled: 0.
    assert compiled.compiled and not eager.compiled
    assert 1 <= warmed_graphs <= 3, warmed_graphs
    graphs = counters["stats"]["unique_graphs"]
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    targets = [{"a": 1.0}, {"b": 0.7}, {}, {"a": 0.4, "c": 0.9}, {"c": -0.6}]
    worst, rewrites, current = 0.0, 0, {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(200):
            if i % 10 == 0:  # a switch, blended over the next 4 frames
                start, target = current, targets[(i // 10) % len(targets)]
            if i % 10 < 4:
                w = (i % 10 + 1) / 4
                names = start.keys() | target.keys()
                current = {n: (1 - w) * start.get(n, 0.0) + w * target.get(n, 0.0) for n in names}
                current = {n: s for n, s in current.items() if s != 0.0}
            frame = np.roll(base, i, axis=1)
            outs = []
            for engine in (eager, compiled):
                rewrites += engine.set_loras(current)
                outs.append(engine(frame, output_type="latent"))
            if outs[0] is not None:
                worst = max(worst, float((outs[0] - outs[1]).abs().max()))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new was compiled
    assert rewrites > 100
    assert worst <= TOLERANCE, worst
    # The LoRAs really changed the output: the last frame differs from one without them.
    for engine in (eager, compiled):
        engine.set_loras({})
    plain = [e(np.roll(base, 199, axis=1), output_type="latent") for e in (eager, compiled)]
    assert float((plain[1] - outs[1]).abs().max()) > 1e-3
