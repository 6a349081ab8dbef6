"""The compiled engine (torch.compile, inductor on the CPU) against the eager one, on the tiny
model at 64x64: one warm-up of the controller's step range, then 100 frames with bank updates,
a prompt switch, a preset blend, reset_bank, step changes and the bank off and on, with
recompiling made an error.

Compiling costs tens of seconds on this CPU: this module compiles once (module fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from streamv2v import BankConfig, EngineConfig, StreamV2V

# One worker runs the compile tests one after another, on the run's inductor cache
# (tests/conftest.py): the graphs they share (encode, decode, the plain UNet) compile once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compile")]

#: Max |compiled - eager| on the x0 latents (float32). Inductor reorders float reductions (~1e-6
#: per op); the bank carries state over frames, so allow a few ulps' growth, far below any
#: visible change (latents are O(1); a uint8 step is ~1e-2 of their range).
TOLERANCE = 1e-4

STEP_RANGE = (1, 2)


@pytest.fixture(scope="module")
def engines(tiny_model, cheap_inductor):
    return build(tiny_model)


def build(tiny_model):
    cfg = EngineConfig(vae="model", width=64, height=64, steps=2, bank=BankConfig(interval=2))
    eager = StreamV2V.from_pretrained(tiny_model, config=cfg, device="cpu")
    compiled = StreamV2V.from_pretrained(
        tiny_model, config=cfg.model_copy(update={"compile": "on"}), device="cpu"
    )
    warmed = compiled.warmup(STEP_RANGE, progress=False)
    # The bank-off variant is a graph of its own, warmed at load too (here for one step only:
    # each graph costs tens of seconds to compile on this CPU).
    warmed += compiled.warmup([1], bank_off=True, progress=False)
    return eager, compiled, warmed


def test_compile_is_off_by_default_on_the_cpu(engines):
    eager, compiled, _ = engines
    assert not eager.compiled and compiled.compiled
    assert EngineConfig().compile == "auto"


def test_every_step_count_of_the_range_is_warmed_at_load(engines):
    _, compiled, warmed = engines
    assert [(c.steps, c.bank.enabled) for c in warmed] == [
        (1, True),
        (2, True),
        (1, True),
        (1, False),
    ]
    assert compiled.config.steps == 2  # the configuration in use is restored


def test_compiled_equals_eager_over_100_frames_without_a_recompile(engines):
    eager, compiled, _ = engines
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(8)]
    a, b = eager.encode_prompt("the cat"), eager.encode_prompt("a dog and a cat")
    graphs = counters["stats"]["unique_graphs"]
    worst, compared = 0.0, 0
    steps = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(100):
            for engine in (eager, compiled):
                if i == 0:
                    engine.set_prompt_embeds(a)
                if i == 30:  # a prompt switch
                    engine.set_prompt_embeds(b)
                if 50 <= i < 60:  # a preset blend: lerped embeddings, frame by frame
                    engine.set_prompt_embeds(torch.lerp(a, b, (i - 49) / 10))
                if i == 70:
                    engine.reset_bank()
                if i in (80, 90):  # the latency controller changes the steps, and back
                    update = {"steps": 1 if i == 80 else 2}
                    engine.set_config(engine.config.model_copy(update=update))
                if i in (84, 87):  # the bank off and on again (its graph was warmed too)
                    bank = engine.config.bank.model_copy(update={"enabled": i == 87})
                    engine.set_config(engine.config.model_copy(update={"bank": bank}))
            want = eager(frames[i % 8], output_type="latent")
            got = compiled(frames[i % 8], output_type="latent")
            assert (want is None) == (got is None)
            if want is not None:
                worst = max(worst, (want - got).abs().max().item())
                compared += 1
            steps.append(compiled.config.steps)
            if i == 40:  # the bank has been updated (interval 2) many times by now
                assert compiled.stats()["fused_fraction"] is not None
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new was compiled
    assert compared >= 95 and set(steps) == {1, 2}
    assert worst <= TOLERANCE, worst
    # The outputs do move with the inputs (not a constant that trivially matches).
    assert not torch.equal(
        eager(frames[0], output_type="latent"), eager(frames[1], output_type="latent")
    )
